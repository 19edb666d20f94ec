"""rFID / IS against torch-fidelity and closed forms (metrics-protocol.md §6, §7, §13 #11–#13, #18).

Oracles: torch-fidelity's own `calculate_metrics` (fid + isc) on the same PNG folders with the same locally created
Inception weight file; scipy.linalg.sqrtm (the pytorch-fid matrix form, independent of the eigenvalue form) and
the diagonal closed form for the Fréchet distance; numpy float64 mean/cov for the streaming statistics.

The Inception weights are random (no download): BatchNorm running statistics are calibrated on the test images in
train mode (momentum=None) so the features are not degenerate. To fit the CPU budget the network input size is
shrunk from 299 to 107 for this module on torch-fidelity's class, which both our metric and the oracle use, so the
comparison still covers the TF1 resize, features, statistics, distance and IS end to end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import skimage.data
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from unittest import mock

from gsqbench.errors import UserError
from gsqbench.metrics.fid import (
    FIDMetric,
    FeatureStats,
    build_inception,
    frechet_distance,
    inception_score,
    load_reference_stats,
)

SMALL_INPUT = 107  # ≥ 75, the smallest size the InceptionV3 stem accepts
LAYER = "192"  # a 192² eigenproblem instead of 2048² (~15 s on 2 cores); the layer is only a name in the extractor
N = 10
REF = {"dataset": "sample-photos", "split": "val", "crop": "gsq-64", "n": 3, "ids_hash": "i" * 8,
       "originals_hash": "o" * 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def _photos() -> tuple[np.ndarray, np.ndarray]:
    """N 64-px crops of bundled photos at two distortion levels (real: mild noise; fake: blur + strong noise)."""
    rng = np.random.default_rng(3)
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
               skimage.data.immunohistochemistry()]
    crops = [src[y : y + 64, x : x + 64] for src in sources for y, x in ((40, 60), (200, 250))]
    base = np.stack(crops).astype(np.float64)
    real = base + rng.normal(0, 3, base.shape)
    blurred = (base + np.roll(base, 1, axis=1) + np.roll(base, 1, axis=2) + np.roll(base, (1, 1), axis=(1, 2))) / 4
    fake = blurred + rng.normal(0, 12, base.shape)
    to_u8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(real), to_u8(fake)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def small_inception():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", SMALL_INPUT)
        yield


@pytest.fixture(scope="module")
def setup(small_inception, tmp_path_factory):
    """Random-init Inception weight file (BN calibrated on the photos) and the two PNG folders."""
    root = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    empty = root / "empty.pth"
    torch.save({}, empty)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # build without any weights
        net = FeatureExtractorInceptionV3("inception-v3-compat", [LAYER, "logits_unbiased"],
                                          feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    real, fake = _photos()
    net.train()
    with torch.no_grad():
        net(_tensor(real))
    with torch.no_grad():
        net.fc.weight.mul_(40.0)  # sharper class posteriors, so IS is well above its floor of 1
    weights = root / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.eval().state_dict(), weights)
    dirs = {}
    for side, images in (("real", real), ("fake", fake)):
        dirs[side] = root / side
        dirs[side].mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(dirs[side] / f"{i:02d}.png")
    extractor = build_inception(weights, "cpu", LAYER)
    return {"weights": weights, "dirs": dirs, "real": _tensor(real), "fake": _tensor(fake), "extractor": extractor}


def test_matches_torch_fidelity_end_to_end(setup):
    import torch_fidelity

    real, fake = setup["real"], setup["fake"]
    with torch.no_grad():
        feats = setup["extractor"](real)[0]
    assert torch.isfinite(feats).all() and feats.std(dim=0).mean() > 1e-3 * feats.abs().mean()  # not degenerate

    metric = FIDMetric(weights_path=setup["weights"], feature_layer=LAYER, is_splits=2, extractor=setup["extractor"])
    ids = [f"{i:02d}" for i in range(N)]
    for lo, hi in ((0, 1), (1, 4), (4, N)):  # uneven streaming batches vs the oracle's single batch
        metric.update(real[lo:hi], fake[lo:hi], ids[lo:hi])
    metric.sync()
    values = {v.name: v for v in metric.compute()}

    expected = torch_fidelity.calculate_metrics(
        input1=str(setup["dirs"]["fake"]), input2=str(setup["dirs"]["real"]), cuda=False, fid=True, isc=True,
        feature_layer_fid=LAYER, isc_splits=2, feature_extractor_weights_path=str(setup["weights"]), cache=False,
        verbose=False, save_cpu_ram=True, batch_size=N,
    )
    fid = expected["frechet_inception_distance"]
    assert fid > 1.0  # the two distortion levels are far apart under these features
    assert values["rfid@inception"].value == pytest.approx(fid, rel=1e-6)  # measured 5e-8
    assert expected["inception_score_mean"] > 1.2
    assert values["is@inception"].value == pytest.approx(expected["inception_score_mean"], rel=1e-5)  # 5e-7
    assert metric.is_std == pytest.approx(expected["inception_score_std"], rel=1e-4, abs=1e-9)
    assert values["rfid@inception"].direction == "lower" and values["is@inception"].direction == "higher"
    assert values["rfid@inception"].n == N


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    diag = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(diag, rel=1e-12)
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    sqrtm = scipy.linalg.sqrtm(s1 @ s2).real
    general = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(general, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_streaming_stats_float64_self_fid_and_batch_independence():
    """§13 #13: features far from the origin break a float32 Σffᵀ − Nμμᵀ; float64 streaming keeps self-FID ≈ 0."""
    rng = np.random.default_rng(1)
    feats = 100.0 + rng.normal(0, 0.1, size=(10_000, 32)) @ rng.normal(size=(32, 32))
    t = torch.from_numpy(feats).float()  # the extractor hands over float32 features
    whole, single = FeatureStats(32), FeatureStats(32)
    whole.update(t)
    for row in t.split(1):
        single.update(row)
    mu_w, sig_w = whole.mean_cov()
    mu_s, sig_s = single.mean_cov()
    ref = t.double().numpy()
    np.testing.assert_allclose(mu_w, ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sig_w, np.cov(ref, rowvar=False), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(sig_s, sig_w, rtol=1e-9, atol=1e-12)
    assert abs(frechet_distance(mu_w, sig_w, mu_s, sig_s)) < 1e-6
    # the same recipe accumulated in float32 fails the bound, so this test can catch that bug
    s32, o32 = t.sum(0), t.T @ t
    mu32 = (s32 / len(t)).double().numpy()
    sig32 = ((o32 - len(t) * torch.outer(s32 / len(t), s32 / len(t))) / (len(t) - 1)).double().numpy()
    assert abs(frechet_distance(mu_w, sig_w, mu32, sig32)) > 1e-4


def test_inception_score_matches_torch_fidelity_formula():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(53, 1008, generator=torch.Generator().manual_seed(5)) * 3
    mean, std, scores = inception_score(logits, splits=10, seed=2020)
    expected = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-9)
    assert inception_score(logits)[0] == mean  # §13 #18: seeded, identical across runs
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(logits[:9])


class _StubExtractor(torch.nn.Module):
    """Cheap stand-in with the extractor's call signature (64-d features, 1008 logits): the cache logic under test
    does not depend on Inception, and a fixed linear map keeps features a deterministic function of the pixels."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.proj = torch.randn(3 * 8 * 8, 64 + 1008, generator=g)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1)
        out = pooled @ self.proj
        return out[:, :64], out[:, 64:]


@pytest.fixture()
def stub(tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"  # hashed into the key, never loaded
    torch.save({"w": torch.arange(3.0)}, weights)
    real, fake = (_tensor(a)[:3] for a in _photos())
    return {"weights": weights, "real": real, "fake": fake, "extractor": _StubExtractor()}


def _run(stub, **kwargs) -> tuple[FIDMetric, float]:
    m = FIDMetric(weights_path=stub["weights"], feature_layer="64", extractor=stub["extractor"], **kwargs)
    m.update(stub["real"], stub["fake"], ["a", "b", "c"])
    m.sync()
    return m, m.compute()[0].value


def test_reference_cache_skips_real_pass_and_is_verified(stub, tmp_path):
    cache = tmp_path / "cache"
    first, fid1 = _run(stub, reference=REF, cache_dir=cache)
    assert stub["extractor"].images == 6 and not first.uses_cached_reference and fid1 > 0
    (cache_file,) = cache.glob("fid-ref-*.npz")
    assert first.lookup_sha in cache_file.name and first.key["feature_layer"] == "64"  # key minus originals_hash
    assert first.key["dataset"] == "sample-photos" and len(first.key["weights_sha256"]) == 64

    stub["extractor"].images = 0
    second, fid2 = _run(stub, reference=REF, cache_dir=cache)
    assert second.uses_cached_reference and stub["extractor"].images == 3  # real-side pass skipped
    assert fid2 == pytest.approx(fid1, rel=1e-12)
    assert second.card()["fid_reference_source"].startswith("cache:")

    other = {**REF, "crop": "adm-64"}  # §13 #12: another crop is another key, never a cache hit
    third, _ = _run(stub, reference=other, cache_dir=cache)
    assert not third.uses_cached_reference and len(list(cache.glob("fid-ref-*.npz"))) == 2
    with pytest.raises(UserError, match="'crop'"):
        load_reference_stats(cache_file, {**first.key, "crop": "adm-64"})
    with pytest.raises(UserError, match="missing field"):
        _run(stub, reference={"dataset": "x"}, cache_dir=cache)
    cache_file.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        _run(stub, reference=REF, cache_dir=cache)


def test_precomputed_reference_npz(stub, tmp_path):
    first, fid1 = _run(stub)
    mu, sigma = first.real.mean_cov()
    good = tmp_path / "ref.npz"
    np.savez(good, mu=mu, sigma=sigma, n=3)
    stub["extractor"].images = 0
    _, fid2 = _run(stub, reference_stats=good)
    assert stub["extractor"].images == 3 and fid2 == pytest.approx(fid1, rel=1e-12)
    wrong_n = tmp_path / "wrong_n.npz"
    np.savez(wrong_n, mu=mu, sigma=sigma, n=50_000)
    with pytest.raises(UserError, match="N=50000"):
        _run(stub, reference_stats=wrong_n)
    wrong_dim = tmp_path / "wrong_dim.npz"
    np.savez(wrong_dim, mu=mu[:5], sigma=sigma[:5, :5])
    with pytest.raises(UserError, match="64"):
        _run(stub, reference_stats=wrong_dim)
    keyed = tmp_path / "keyed.npz"
    np.savez(keyed, mu=mu, sigma=sigma, n=3, key_json=np.array(json.dumps({**REF, "split": "train"})))
    with pytest.raises(UserError, match="'split'"):
        _run(stub, reference_stats=keyed, reference=REF)


def test_missing_weights_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    metric = FIDMetric()
    metric.update(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"])
    metric.sync()
    rows = metric.compute()
    assert [r.name for r in rows] == ["rfid@inception", "is@inception"]
    assert all(math.isnan(r.value) and "gsqbench weights" in r.unavailable for r in rows)
    with pytest.raises(UserError, match="inception-fid"):
        FIDMetric(required=True)
    garbage = Path(tmp_path) / "x.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"^Inception weights: .*x\.pth: not a readable PyTorch checkpoint"):
        build_inception(garbage)
    torch.save({"fc.weight": torch.zeros(2)}, garbage)
    with pytest.raises(UserError, match="InceptionV3"):
        build_inception(garbage)
    with pytest.raises(UserError, match="feature layer"):
        build_inception(garbage, feature_layer="1000")
