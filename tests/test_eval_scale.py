"""The evaluation path at ImageNet scale (issue 16): O(N) bootstrap intervals equal to the O(B·N) reference,
one decode per image in `run` (no FID pre-pass), a stale FID cache detected after the single pass, metric states
that round-trip, a SIGKILLed evaluation that resumes bit-identically, and `gsqbench stats` reference files.

Oracles: the former bootstrap (the full B×N index matrix) restated in numpy; decode counts of the files written
here; uninterrupted passes (in the same process at one thread, or a fresh metric fed every batch); numpy
mean/covariance of the extractor's features; the originals-hash formula restated with hashlib.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsqbench.errors import UserError
from gsqbench.metrics.base import mean_with_interval

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def _reference_interval(values, n_boot=1000, seed=0):
    """The former implementation: one B×N index matrix (8·B·N bytes)."""
    arr = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    return tuple(np.percentile(boots, [2.5, 97.5]))


@pytest.mark.parametrize("n", [1, 2, 37, 5000])
def test_bootstrap_interval_equals_the_full_matrix_reference(n):
    values = np.random.default_rng(n).gamma(2.0, 3.0, size=n)
    got = mean_with_interval(values, "x", "higher")
    assert (got.ci_low, got.ci_high) == _reference_interval(values)  # same resamples, drawn in row blocks
    assert got.value == pytest.approx(values.mean(), rel=1e-15) and got.n == n


def test_bootstrap_memory_is_linear_in_n():
    n = 50_000  # the former B×N matrix: 400 MB of indices (+ 400 MB of gathered values)
    values = np.random.default_rng(0).normal(size=n)
    tracemalloc.start()
    try:
        got = mean_with_interval(values, "x", "higher", n_boot=200)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, peak  # ~16 MB of blocks; B·N·16 bytes would be 160 MB at B = 200
    assert (got.ci_low, got.ci_high) == _reference_interval(values, n_boot=200)


# ---------------------------------------------------------------------------------------------------------------
# One decode per image


def _jpegs(root: Path, n: int, size=(40, 48)) -> list[str]:
    rng = np.random.default_rng(1)
    (root / "cls").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / "cls" / f"{i}.jpg")
    return [f"cls/{i}.jpg" for i in range(n)]


def test_run_decodes_each_eval_image_once_without_inception_weights(tmp_path, monkeypatch):
    from test_train import tiny_raw

    from gsqbench import data
    from gsqbench.config import suite_from_dict
    from gsqbench.runner import run_suite

    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    ids = _jpegs(tmp_path / "eval", 5)
    decoded: list[str] = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda path: decoded.append(Path(path).name) or real_decode(path))
    raw = tiny_raw(steps=1, data={"eval": {"kind": "image-folder", "path": str(tmp_path / "eval"), "size": 32,
                                           "crop": "gsq"}, "num_workers": 0},
                   eval={"metrics": ["pixel", "fid"], "batch_size": 2})
    res = run_suite(suite_from_dict(raw), tmp_path / "results", progress=False)  # run sets an FID cache folder
    assert sorted(decoded) == sorted(Path(i).name for i in ids)  # each exactly once, no pre-pass
    rows = {r["metric"]: r for r in __import__("csv").DictReader(open(res.run_dirs[0] / "metrics.csv"))}
    assert rows["rfid@inception"]["unavailable"] and not rows["psnr"]["unavailable"]


# ---------------------------------------------------------------------------------------------------------------
# FID reference: cache looked up before the pass, verified after it


class _Stub(torch.nn.Module):
    """Cheap extractor with Inception's call signature (64-d features, 1008 logits), counting images."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3 * 4 * 4, 64 + 1008, generator=torch.Generator().manual_seed(3))
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        out = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj
        return out[:, :64], out[:, 64:]


def test_stale_fid_cache_is_detected_after_the_pass_and_recomputed(tmp_path, caplog):
    from test_evaluate import ListDataset, StandInTokenizer, _images

    from gsqbench.evaluate import EvalSettings, _reference_fields, evaluate
    from gsqbench.metrics.fid import FIDMetric

    weights = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1)}, weights)  # hashed into the key, never loaded (the stub extracts)
    stub = _Stub()
    settings = EvalSettings(metrics=("fid",), fid_cache_dir=str(tmp_path / "cache"), batch_size=2, progress=False)
    tok = StandInTokenizer().eval()

    def run(ds, cache=True):
        ref = _reference_fields(ds, settings)
        assert ref["originals_hash"] is None  # pending: known after the pass
        metric = FIDMetric(weights_path=weights, feature_layer="64", extractor=stub, reference=ref,
                           cache_dir=tmp_path / "cache" if cache else None)
        stub.images = 0
        res = evaluate(tok, ds, settings, device="cpu", metrics=[metric])
        return metric, res.value("rfid@inception"), stub.images

    ids = [f"im{i}" for i in range(6)]
    first, fid1, seen = run(ListDataset(_images(6, 16, seed=0), ids))
    assert seen == 12 and not first.uses_cached_reference and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    second, fid2, seen = run(ListDataset(_images(6, 16, seed=0), ids))
    assert seen == 6 and second.uses_cached_reference and fid2 == fid1  # real side from the cache
    other = ListDataset(_images(6, 16, seed=1), ids)  # same ids, other pixels: only the originals hash differs
    with caplog.at_level(logging.WARNING):
        third, fid3, seen = run(other)
    assert seen == 6 + 6  # fake side in the pass, then the real side read again once the cache proved stale
    assert any("does not match" in r.getMessage() for r in caplog.records)
    _, fresh, _ = run(other, cache=False)
    assert fid3 == fresh != fid1 and third.reference_source == "computed"
    stored = np.load(next((tmp_path / "cache").glob("*.npz")))
    assert json.loads(str(stored["key_json"]))["originals_hash"] == third.key["originals_hash"]  # rewritten


# ---------------------------------------------------------------------------------------------------------------
# Metric state round trip (the resumable-evaluation contract)


def _builtin_metrics(tmp_path):
    from test_evaluate import StandInTokenizer

    from gsqbench.metrics.codebook import CodeAgreementMetric, CodebookMetric
    from gsqbench.metrics.cost import CostMeter, CostMetric
    from gsqbench.metrics.fid import FIDMetric
    from gsqbench.metrics.pixel import PSNRMetric, SSIMMetric

    tmp_path.mkdir(parents=True, exist_ok=True)
    weights = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    tok = StandInTokenizer().eval()
    return tok, [PSNRMetric(), SSIMMetric(), CodebookMetric.for_quantizer(tok.quantizer),
                 CodeAgreementMetric(tok.quantizer), CostMetric(tok, CostMeter(torch.device("cpu"))),
                 FIDMetric(weights_path=weights, feature_layer="64", extractor=_Stub(), is_splits=2)]


def test_every_builtin_metric_state_round_trips_exactly(tmp_path):
    import io

    from test_evaluate import _images

    batches = [torch.from_numpy(_images(3, 16, seed=s)) for s in range(3)]
    ids = [[f"b{s}-{i}" for i in range(3)] for s in range(3)]

    def feed(tok, metrics, parts):
        with torch.no_grad():
            for k in parts:
                x = batches[k].float() / 127.5 - 1
                q = tok.encode(x)
                fake = torch.round((tok.decode(q.z_q).clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
                for m in metrics:
                    m.update(batches[k], fake, ids[k], q)

    def results(metrics):
        out = []
        for m in metrics:
            m.sync()
            out += [(r.name, r.value, r.ci_low, r.ci_high) for r in m.compute() if m.deterministic]
            out += sorted(m.per_image().items())
        return out

    tok, whole = _builtin_metrics(tmp_path / "a")
    feed(tok, whole, [0, 1, 2])
    tok, first = _builtin_metrics(tmp_path / "b")
    feed(tok, first, [0, 1])
    buf = io.BytesIO()
    torch.save([m.state_dict() for m in first], buf)  # what the evaluation state file holds
    states = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    tok, resumed = _builtin_metrics(tmp_path / "c")
    for m, s in zip(resumed, states):
        m.load_state_dict(s)
    feed(tok, resumed, [2])
    assert results(resumed) == results(whole)
    for m in (*whole, *first, *resumed):
        m.close()


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL and resume

def _resumable_job(out_dir: str, kill_at: int) -> dict:
    """Evaluate a tiny model on 12 synthetic images, saving state after every batch; SIGKILL itself when reading
    image `kill_at` (no cleanup, no atexit: as a killed job). Returns what must be bit-identical."""
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import EvalSettings, evaluate
    from gsqbench.models.tokenizer import build_tokenizer

    ds = build_dataset("synthetic", resolution=32, n=12, seed=4)
    load = ds.load

    def dying_load(i):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return load(i)

    ds.load = dying_load
    torch.manual_seed(0)
    tok = build_tokenizer({"preset": "tiny-f8", "latent_dim": 8},
                          {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}).eval()
    settings = EvalSettings(batch_size=2, samples=3, metrics=("pixel", "codebook"), num_workers=0,
                            checkpoint_every=1, progress=False)
    res = evaluate(tok, ds, settings, device="cpu", out_dir=out_dir)
    timings = ("encode_images_per_s", "decode_images_per_s", "peak_memory_mb")
    return {"metrics": [[m.name, m.value, m.stderr, m.ci_low, m.ci_high] for m in res.metrics
                        if m.name not in timings],
            "per_image": res.per_image, "counts": res.code_counts.tolist(), "card_hash": res.card_hash,
            "resumed": res.card["runtime"]["resumed_at_image"], "samples": res.samples}


_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from test_eval_scale import _resumable_job
json.dump(_resumable_job(sys.argv[1], int(sys.argv[3])), open(sys.argv[2], "w"))
"""


def test_sigkilled_evaluation_resumes_bit_identically(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"

    def job(dump: str, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _SCRIPT, str(out), str(tmp_path / dump), str(kill_at)],
                              env=env, capture_output=True, text=True, timeout=300)

    killed = job("killed.json", kill_at=7)  # batches of 2: images 0-5 done and saved, killed reading image 7
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (out / ".eval-state").iterdir()] == ["rank0-of-1.pt"]
    resumed = job("resumed.json", kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (out / ".eval-state").exists()  # removed once the evaluation completed
    a = json.loads((tmp_path / "resumed.json").read_text())
    b = json.loads(json.dumps(_resumable_job(str(tmp_path / "whole"), kill_at=-1)))  # uninterrupted, 1 thread
    assert a["resumed"] == 6 and b["resumed"] is None
    for key in ("metrics", "per_image", "counts", "card_hash", "samples"):
        assert a[key] == b[key], key
    assert len(a["per_image"]["image_id"]) == 12


# ---------------------------------------------------------------------------------------------------------------
# gsqbench stats


def test_stats_writes_the_key_an_evaluation_verifies(tmp_path, monkeypatch, caplog, capsys):
    from test_eval_ddp import _setup_weights
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from gsqbench.card import id_list_hash
    from gsqbench.cli import main
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import EvalSettings, _reference_fields
    from gsqbench.metrics.fid import build_inception, load_reference_stats
    from gsqbench.weights import weight_path

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 107)  # ≥ 75; keeps the CPU time small
    _setup_weights(tmp_path, monkeypatch)
    ids = _jpegs(tmp_path / "imgs", 4)
    out = tmp_path / "ref.npz"
    assert main(["stats", str(tmp_path / "imgs"), "--out", str(out), "--resolution", "32", "--no-progress",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    assert "N=4" in capsys.readouterr().out
    mu, sigma, n, key = load_reference_stats(out)
    ds = build_dataset("image-folder", path=tmp_path / "imgs", resolution=32)
    crops = torch.stack([ds[i][1] for i in range(4)])
    digests = "".join(hashlib.sha256(i.encode() + b"\0" + ds[k][1].numpy().tobytes()).hexdigest()
                      for k, i in enumerate(ids))
    expected = _reference_fields(ds, EvalSettings(metrics=("fid",)), ids, hashlib.sha256(digests.encode()).hexdigest())
    assert n == 4 and {k: key[k] for k in expected} == expected and key["ids_hash"] == id_list_hash(ids)
    with torch.no_grad():
        feats = build_inception(weight_path("inception-fid"))(crops)[0].double().numpy()
    assert np.allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-9)
    assert np.allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-9)
    with pytest.raises(UserError, match="'crop'"):
        load_reference_stats(out, {**expected, "crop": "adm"})
    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=mu, sigma=sigma)  # the ADM / torch-fidelity layout: no key fields
    with caplog.at_level(logging.WARNING):
        load_reference_stats(adm, expected)
    assert any("provenance is unknown" in r.getMessage() for r in caplog.records)
