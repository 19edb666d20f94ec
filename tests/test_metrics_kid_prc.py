"""`kid@inception` and `precision@vgg16` / `recall@vgg16` against torch-fidelity's own implementations.

Oracle: torch-fidelity 0.4's `kid_features_to_metric` and `prc_features_to_metric`, fed the features of
torch-fidelity's own extractors (`FeatureExtractorInceptionV3('inception-v3-compat')`, `FeatureExtractorVGG16`),
each loaded by torch-fidelity's own loader from the same weight file, on the same images in image-id order, rounded
to float16 as gsqbench stores them (a documented choice) and handed over in float64 (gsqbench's arithmetic).

The weight files are random-init state dicts saved under the official file names and installed through the weight
manager (manifest override, so results are non-conformant), kept small by tests/random_weights.py. To fit the CPU
budget the networks' input sizes are shrunk (Inception 299 → 75, its smallest, VGG 224 → 32) on torch-fidelity's
classes, which both our metrics and the oracle use.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from gsqbench.errors import UserError
from gsqbench.metrics.base import Facts
from gsqbench.metrics.features import FeatureStore
from gsqbench.metrics.kid import KIDMetric
from gsqbench.metrics.prc import PrecisionRecallMetric, knn_radii, precision_recall
from random_weights import inception_file, manifest, vgg16_file

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12
IDS = [f"img-{i:02d}" for i in (7, 3, 11, 0, 9, 1, 5, 10, 2, 8, 4, 6)]  # dataset order != id order
BATCHES = ((0, 5), (5, N))  # KID streams two uneven batches; the VGG16 side runs one (its fc6 dominates the time)


@contextmanager
def _no_init():
    """Skip torch's random parameter init while a module is built (its weights are loaded right after)."""
    names = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "constant_", "trunc_normal_")
    with mock.patch.multiple(torch.nn.init, **{n: (lambda t, *a, **k: t) for n in names}):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Random Inception and VGG16 files under their official names, installed through the weight manager."""
    root = tmp_path_factory.mktemp("kidprc")
    files = {"inception-fid": inception_file(root / "weights-inception-2015-12-05-6726825d.pth"),
             "vgg16": vgg16_file(root / "vgg16-397923af.pth")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GSQBENCH_HOME", str(root / "home"))
        mp.setenv("TORCH_HOME", str(root / "torch"))
        mp.setenv("GSQBENCH_WEIGHTS_MANIFEST", manifest(files))
        mp.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
        mp.setattr(FeatureExtractorVGG16, "INPUT_IMAGE_SIZE", 32)
        from gsqbench import weights

        for name, p in files.items():
            weights.import_file(p, name)
        yield {"files": files, "root": root}


def _images(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(N, 3, 4, 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)
    return (smooth + torch.randn(N, 3, 32, 32, generator=g) * 25).round().clamp(0, 255).to(torch.uint8)


def _oracle_features(extractor, images: torch.Tensor, batches=BATCHES) -> torch.Tensor:
    """torch-fidelity's features in our batches, reordered by image id, float16-rounded, as float64."""
    with torch.no_grad():
        feats = torch.cat([extractor(images[lo:hi])[0] for lo, hi in batches])
    order = np.argsort(IDS)
    return feats[order].half().double()


def test_kid_and_precision_recall_match_torch_fidelity(env, tmp_path):
    from gsqbench.evaluate import EvalSettings, build_metrics

    real = _images(1)  # fake: half mild distortions of the real images, half unrelated images
    fake = torch.cat([(real[:6].int() + _images(2)[:6].int() // 4 - 32).clamp(0, 255).to(torch.uint8), _images(3)[6:]])
    settings = EvalSettings(metrics=("kid", "prc"), keep_features=True, progress=False)
    metrics = build_metrics(settings, torch.device("cpu"), out_dir=tmp_path / "run")
    kid, prc = (next(m for m in metrics if isinstance(m, c)) for c in (KIDMetric, PrecisionRecallMetric))
    small_kid = KIDMetric(weights_path=env["files"]["inception-fid"], subsets=10, subset_size=5,
                          extractor=kid.model)  # subsets really drawn (m < N)
    for lo, hi in BATCHES:
        for m in (kid, small_kid):
            m.update(real[lo:hi], fake[lo:hi], IDS[lo:hi])
    prc.update(real, fake, IDS)
    rows = {}
    for m in (kid, prc, small_kid):
        m.sync()
        rows[m] = {r.name: r for r in m.compute()}

    with _no_init():  # torch-fidelity's own loaders on the same files (the random init they overwrite is skipped)
        tf_inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(env["files"]["inception-fid"]))
        tf_vgg = FeatureExtractorVGG16("vgg16", ["fc2_relu"], feature_extractor_weights_path=str(env["files"]["vgg16"]))
    i_real, i_fake = _oracle_features(tf_inception, real), _oracle_features(tf_inception, fake)
    v_real, v_fake = _oracle_features(tf_vgg, real, [(0, N)]), _oracle_features(tf_vgg, fake, [(0, N)])
    assert i_real.std(0).mean() > 1e-3 and v_real.std(0).mean() > 1e-3  # features are not degenerate

    expected = kid_features_to_metric(i_fake, i_real, kid_subset_size=N, verbose=False)
    value = rows[kid]["kid@inception"]
    assert value.value == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-6)  # measured ~1e-13
    assert value.direction == "lower" and value.n == N and kid.used_subset_size == N
    expected_small = kid_features_to_metric(i_fake, i_real, kid_subsets=10, kid_subset_size=5, verbose=False)
    assert rows[small_kid]["kid@inception"].value == pytest.approx(expected_small["kernel_inception_distance_mean"],
                                                                   rel=1e-6)
    assert small_kid.std == pytest.approx(expected_small["kernel_inception_distance_std"], rel=1e-6)
    assert expected_small["kernel_inception_distance_std"] > 0  # subsets differ: the sampling order is exercised
    with pytest.raises(Exception, match="subset size"):  # torch-fidelity refuses N < 1000; gsqbench uses m = N
        kid_features_to_metric(i_fake, i_real, verbose=False)

    expected_prc = prc_features_to_metric(v_fake, v_real, verbose=False)
    assert 0 < expected_prc["precision"] < 1 or 0 < expected_prc["recall"] < 1  # not a trivial 0/1 case
    assert rows[prc]["precision@vgg16"].value == pytest.approx(expected_prc["precision"], rel=1e-6)
    assert rows[prc]["recall@vgg16"].value == pytest.approx(expected_prc["recall"], rel=1e-6)
    assert rows[prc]["recall@vgg16"].direction == "higher"

    # --keep-features: float16 (N, d) files in image-id order, equal to the oracle's float16 features
    kept = tmp_path / "run" / "features" / "kid_inception"
    assert json.loads((kept / "ids.json").read_text())["ids"] == sorted(IDS)
    np.testing.assert_array_equal(np.load(kept / "real.npy").astype(np.float64), i_real.numpy())
    for m in (kid, prc, small_kid):
        m.close()
    assert (kept / "fake.npy").is_file() and not (kept / ".parts").exists()  # kept, chunks gone
    assert not small_kid.store.root.exists()  # not kept: its temporary folder is removed


def test_blockwise_knn_equals_torch_fidelity_full_and_rules():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 6)), rng.normal(0.4, 1.2, size=(33, 6))
    expected = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), verbose=False)
    for block in (7, 64):  # blocks smaller and larger than N
        assert precision_recall(fake, real, block=block) == (pytest.approx(expected["precision"], rel=1e-6),
                                                             pytest.approx(expected["recall"], rel=1e-6))
    full = torch.cdist(torch.from_numpy(real), torch.from_numpy(real)).kthvalue(4).values
    torch.testing.assert_close(knn_radii(real, 3, block=7), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="k\\+1"):
        knn_radii(real[:3])
    assert KIDMetric.comparable("kid@inception", Facts(n_images=2)) is None  # unbiased at small N
    assert PrecisionRecallMetric.comparable("recall@vgg16", Facts(n_images=3)) is not None
    assert PrecisionRecallMetric.comparable("recall@vgg16", Facts(n_images=4)) is None


def test_feature_store_refuses_float16_overflow_and_missing_weights(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path / "f", ("real",), 2)
    with pytest.raises(UserError, match="float16"):
        store.add("real", ["a"], torch.tensor([[1e6, 0.0]]))
    store.remove()
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    rows = KIDMetric().compute() + PrecisionRecallMetric().compute()
    assert all(math.isnan(r.value) for r in rows)
    assert "gsqbench weights download inception-fid" in rows[0].unavailable
    assert "gsqbench weights download vgg16" in rows[1].unavailable
    with pytest.raises(UserError, match="vgg16"):
        PrecisionRecallMetric(required=True)


def test_feature_store_state_round_trip_resumes_with_the_same_files(tmp_path):
    """A store restored from state_dict() (what a resumed evaluation would do) assembles what one store would."""
    rng = np.random.default_rng(4)
    feats = torch.from_numpy(rng.normal(size=(6, 3)).astype(np.float32))
    ids = ["c", "a", "f", "b", "e", "d"]
    one = FeatureStore(tmp_path / "one", ("real",), 3, chunk_rows=2)
    one.add("real", ids, feats)
    one.sync()
    first = FeatureStore(tmp_path / "two", ("real",), 3, chunk_rows=2)
    first.add("real", ids[:3], feats[:3])
    state = json.loads(json.dumps(first.state_dict()))  # plain lists: JSON-safe
    resumed = FeatureStore(tmp_path / "two", ("real",), 3, chunk_rows=2)
    resumed.load_state_dict(state)
    resumed.add("real", ids[3:], feats[3:])
    resumed.sync()
    assert resumed.ids == sorted(ids) and np.array_equal(resumed.open("real"), one.open("real"))
    np.testing.assert_array_equal(one.open("real"), feats.numpy()[np.argsort(ids)].astype(np.float16))
