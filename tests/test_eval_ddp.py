"""A 2-process gloo evaluation equals the single-process one (metrics-protocol.md §10, §13 #14).

N = 5 images on world size 2 (uneven shards 3 + 2, no padding). PSNR, SSIM, code counts and code agreement must
be identical; FID statistics (μ, Σ) and rFID within 1e-6 relative, with a random-init Inception file created here
and registered through the weights manifest override (so the card says weights_conformant: false). The oracle is
the single-process run, whose own metric values are checked against independent oracles in test_evaluate.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gsqbench.quantizer import QuantizerOutput

N, SIZE, WORLD = 5, 32, 2


class _Quantizer(nn.Module):
    dim, groups, codebook_size = 3, 3, 8

    def __init__(self):
        super().__init__()
        self.lookup_precision = "exact"

    def forward(self, z):
        zz = z.to(torch.bfloat16).float() if self.lookup_precision == "bf16" else z.float()
        idx = torch.round((zz.clamp(-1, 1) + 1) * 3.5).long().permute(0, 2, 3, 1).contiguous()
        return QuantizerOutput(self.indices_to_codes(idx), idx)

    def indices_to_codes(self, indices):
        return indices.permute(0, 3, 1, 2).float() / 3.5 - 1


class _Tokenizer(nn.Module):
    """Exactly per-image stand-in (pool → scalar codes → nearest upsample), so shards cannot change values."""

    def __init__(self):
        super().__init__()
        self.quantizer = _Quantizer()

    def encode(self, x):
        return self.quantizer(F.avg_pool2d(x, 4))

    def decode(self, z_q):
        return torch.tanh(1.5 * F.interpolate(z_q, scale_factor=4, mode="nearest"))


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        rng = np.random.default_rng(7)
        self.images = rng.integers(0, 256, size=(N, 3, SIZE, SIZE), dtype=np.uint8)
        self.ids = [f"im{i:02d}" for i in (4, 1, 3, 0, 2)]

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.ids[i], torch.from_numpy(self.images[i])


def _random_inception(path) -> None:
    """torch-fidelity's InceptionV3 layout with random init (fp16 to keep the file small), no download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # skip loading: we want the init
    try:
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, path)


def _setup_weights(tmp, monkeypatch) -> dict[str, str]:
    """A random Inception file registered through the manifest override; the env for the workers."""
    inc = tmp / "inception-random.pth"
    _random_inception(inc)
    manifest = {"inception-fid": {"filename": inc.name, "sha256": hashlib.sha256(inc.read_bytes()).hexdigest()}}
    env = {"GSQBENCH_HOME": str(tmp / "home"), "TORCH_HOME": str(tmp / "torch"),
           "GSQBENCH_WEIGHTS_MANIFEST": json.dumps(manifest)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from gsqbench import weights

    weights.import_file(inc, "inception-fid")
    return env


def _evaluate_and_dump(out_path: str, batch_size: int) -> None:
    """Evaluate the stand-in with the default metric set; dump values, per-image table and FID statistics."""
    from gsqbench import distributed as ddp
    from gsqbench.evaluate import EvalSettings, build_metrics, evaluate
    from gsqbench.metrics.fid import FIDMetric

    # LPIPS shares PSNR/SSIM's per-image gather (and is batch-checked in test_evaluate.py): left out to save time
    settings = EvalSettings(batch_size=batch_size, progress=False, metrics=("pixel", "codebook"), lookup="bf16")
    # FID at the 64-d feature layer: the same streaming sums and reduction as 2048-d, without a 2048² eig per rank
    tok = _Tokenizer().eval()
    metrics = build_metrics(settings, torch.device("cpu"), tok) + [FIDMetric("cpu", required=True, feature_layer="64")]
    res = evaluate(tok, _Images(), settings, device="cpu", metrics=metrics)
    if not ddp.is_main():
        return
    fid = next(m for m in metrics if isinstance(m, FIDMetric))
    mu_r, sigma_r = fid.real.mean_cov()
    mu_f, sigma_f = fid.fake.mean_cov()
    dump = {"metrics": {m.name: m.value for m in res.metrics if m.unavailable is None},
            "per_image": res.per_image, "counts": None if res.code_counts is None else res.code_counts.tolist(),
            "card_hash": res.card_hash, "conformant": res.card["weights_conformant"],
            "world": res.card["runtime"]["world_size"],
            "fid_stats": [a.tolist() for a in (mu_r, sigma_r, mu_f, sigma_f)]}
    with open(out_path, "w") as f:
        json.dump(dump, f)


def _worker(rank: int, port: int, env: dict, out_path: str, batch_size: int) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    from gsqbench import distributed as ddp

    assert ddp.init_from_env(timeout_s=120) and ddp.world_size() == WORLD
    try:
        _evaluate_and_dump(out_path, batch_size)
    finally:
        ddp.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path, monkeypatch):
    env = _setup_weights(tmp_path, monkeypatch)
    # single process in one batch of 5; ranks in batches of 2 over shards of 3 and 2 (batches 2+1 and 2):
    # world size and batch composition both differ, so both must not matter
    _evaluate_and_dump(str(tmp_path / "single.json"), batch_size=N)
    mp.start_processes(_worker, args=(_free_port(), env, str(tmp_path / "ddp.json"), 2), nprocs=WORLD,
                       join=True, start_method="spawn")
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ddp.json").read_text())
    assert one["world"] == 1 and two["world"] == WORLD
    assert two["per_image"]["image_id"] == sorted(_Images().ids)  # every image exactly once, sorted by id
    for key in ("psnr", "psnr_pooled", "ssim", "code_agreement"):
        assert two["metrics"][key] == one["metrics"][key], key
    for key in [k for k in one["metrics"] if k.startswith(("usage_", "ppl_", "entropy_", "dead_", "tokens_"))]:
        assert two["metrics"][key] == one["metrics"][key], key
    assert two["per_image"]["psnr"] == one["per_image"]["psnr"]
    assert two["per_image"]["ssim"] == one["per_image"]["ssim"]
    assert two["counts"] == one["counts"] and one["counts"] is not None
    for a, b in zip(one["fid_stats"], two["fid_stats"]):
        a, b = np.array(a), np.array(b)
        assert np.abs(b - a).max() <= 1e-6 * np.abs(a).max()  # relative to the statistic's scale
    assert two["metrics"]["rfid@inception"] == pytest.approx(one["metrics"]["rfid@inception"], rel=1e-6)
    # IS needs more images than its 10 splits: with N = 5 both runs must agree that it is unavailable
    assert ("is@inception" in two["metrics"]) == ("is@inception" in one["metrics"])
    assert two["card_hash"] == one["card_hash"]  # world size is run-specific, not protocol
    assert one["conformant"] is False
