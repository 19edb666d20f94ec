"""Codebook usage / perplexity / entropy / dead codes on hand-made indices (metrics-protocol.md §8, §13 #15, #17).

Oracles are closed forms written here: uniform counts ⇒ usage 1, PPL V, entropy log2 V; one code ⇒ PPL 1;
a grouped toy case with pooled / per-group / product values worked out by hand; numpy bincount for counts.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gsqbench.errors import UserError
from gsqbench.metrics.codebook import CodebookMetric


def _values(m: CodebookMetric) -> dict[str, float]:
    m.sync()
    return {v.name: v.value for v in m.compute()}


def test_uniform_counts_give_full_usage_and_ppl_v():
    v = 16
    idx = torch.arange(v).repeat(3).reshape(3, 4, 4, 1)  # every code exactly 3 times
    m = CodebookMetric(v, 1)
    m.update_indices(idx)
    out = _values(m)
    assert out["usage_pooled"] == out["usage_group_min"] == out["usage_product"] == 1.0
    assert out["ppl_pooled"] == pytest.approx(v, rel=1e-12)
    assert out["entropy_bits"] == pytest.approx(4.0, rel=1e-12)
    assert out["entropy_norm"] == pytest.approx(1.0, rel=1e-12)
    assert out["dead_codes"] == 0 and out["tokens_counted"] == 48


def test_single_code_gives_ppl_one():
    m = CodebookMetric(8, 1)
    m.update_indices(torch.full((2, 3, 3, 1), 5))
    out = _values(m)
    assert out["ppl_pooled"] == 1.0 and out["entropy_bits"] == 0.0
    assert out["usage_pooled"] == pytest.approx(1 / 8) and out["dead_codes"] == 7


def test_grouped_toy_case_pooled_group_and_product_keys():
    """V = 4, G = 2, one image of 2×2 tokens. Group 0 uses {0, 1} equally; group 1 uses only {2}.

    Pooled counts [2, 2, 4, 0] / 8 ⇒ usage 3/4, H = −(¼ln¼·2 + ½ln½) = 1.5 ln 2 ⇒ PPL 2^1.5, 1.5 bits.
    Per group: u = (1/2, 1/4) ⇒ mean 3/8, min 1/4, max 1/2, product 1/8; PPL (2, 1) ⇒ mean 1.5.
    """
    g0 = torch.tensor([[0, 1], [1, 0]])
    g1 = torch.full((2, 2), 2)
    idx = torch.stack([g0, g1], dim=-1)[None]  # (1, 2, 2, 2)
    m = CodebookMetric(4, 2)
    m.update_indices(idx)
    out = _values(m)
    expected = {"usage_pooled": 0.75, "usage_group_mean": 0.375, "usage_group_min": 0.25, "usage_group_max": 0.5,
                "usage_product": 0.125, "ppl_pooled": 2**1.5, "ppl_group_mean": 1.5, "entropy_bits": 1.5,
                "entropy_norm": 0.75, "dead_codes": 1.0, "tokens_counted": 8.0}
    assert out == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(m.code_counts(), [[2, 2, 0, 0], [0, 0, 4, 0]])


def test_counts_match_numpy_and_batching_is_irrelevant():
    rng = np.random.default_rng(0)
    v, g = 37, 3
    idx = torch.from_numpy(rng.integers(0, v, size=(6, 3, 5, g)))
    whole, single = CodebookMetric(v, g), CodebookMetric(v, g)
    whole.update_indices(idx)
    for i in range(6):
        single.update_indices(idx[i : i + 1])
    expected = np.stack([np.bincount(idx[..., k].numpy().ravel(), minlength=v) for k in range(g)])
    assert _values(whole) == _values(single)
    np.testing.assert_array_equal(whole.code_counts(), expected)
    np.testing.assert_array_equal(single.code_counts(), expected)
    assert whole.code_counts().dtype == np.int64


def test_usage_bounded_by_token_count():
    """Few tokens, huge V: usage ≤ T_g/V however diverse the codes are (LlamaGen #65-style caps stay visible)."""
    v = 4096
    idx = torch.arange(20).reshape(5, 2, 2, 1) * 100  # 20 distinct codes, T_g = 20
    m = CodebookMetric(v, 1)
    m.update_indices(idx)
    out = _values(m)
    assert out["usage_pooled"] == pytest.approx(20 / v)
    assert out["usage_pooled"] <= out["tokens_counted"] / v
    assert out["ppl_pooled"] == pytest.approx(20, rel=1e-12)


def test_shapes_and_values_refused():
    m = CodebookMetric(8, 1)
    with pytest.raises(UserError, match=r"\(b, h, w\) is refused"):
        m.update_indices(torch.zeros(2, 4, 4, dtype=torch.int64))  # §13 #17: no group axis
    with pytest.raises(UserError, match="groups"):
        m.update_indices(torch.zeros(2, 4, 4, 2, dtype=torch.int64))
    with pytest.raises(UserError, match=r"\[0, 8\)"):
        m.update_indices(torch.full((1, 2, 2, 1), 8))
    with pytest.raises(UserError, match="dtype"):
        m.update_indices(torch.zeros(1, 2, 2, 1))
    with pytest.raises(ValueError, match="qout"):
        m.update(None, None, ["a"], qout=None)


def test_unknown_or_huge_codebooks_report_unavailable():
    lazy = CodebookMetric()
    lazy.update_indices(torch.zeros(1, 2, 2, 1, dtype=torch.int64))
    rows = {v.name: v for v in (lazy.sync(), lazy.compute())[1]}
    assert rows["tokens_counted"].value == 4 and "codebook size unknown" in rows["usage_pooled"].unavailable
    huge = CodebookMetric(2**26, 1, levels=[2] * 26)  # LFQ with 26 bits: per-bit histograms only
    idx = torch.tensor([0, 1, 3, 2**25]).reshape(1, 2, 2, 1)
    huge.update_indices(idx)
    rows = {v.name: v for v in (huge.sync(), huge.compute())[1]}
    assert huge.code_counts() is None and math.isnan(rows["usage_pooled"].value)
    assert "2^24" in rows["ppl_pooled"].unavailable
    bits = huge.dimension_counts()
    assert bits[0].tolist() == [[2, 2]] and bits[1].tolist() == [[3, 1]] and bits[25].tolist() == [[3, 1]]


def test_for_quantizer_and_directions():
    class Q:
        codebook_size, groups, levels = 8, 2, None

    m = CodebookMetric.for_quantizer(Q())
    m.update(None, None, ["a"], qout=type("Out", (), {"indices": torch.zeros(1, 1, 1, 2, dtype=torch.int64)})())
    rows = {v.name: v.direction for v in (m.sync(), m.compute())[1]}
    assert rows["dead_codes"] == "lower" and rows["tokens_counted"] == "none"
    assert all(rows[k] == "higher" for k in rows if k.startswith(("usage", "ppl", "entropy")))


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 counts two batches, rank 1 has an empty shard (uneven sharding, §10): sync must still agree."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        m = CodebookMetric(8, 2)
        if rank == 0:
            for part in _ddp_indices().split(2):
                m.update_indices(part)
        m.sync()
        if rank == 0:
            np.save(out, m.code_counts())
            with open(out + ".json", "w") as f:
                json.dump({v.name: v.value for v in m.compute()}, f)
    finally:
        dist.destroy_process_group()


def _ddp_indices() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(4).integers(0, 8, size=(3, 2, 2, 2)))


@pytest.mark.slow
def test_two_process_gloo_sync_with_an_empty_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "counts.npy")
    # fork, like DataLoader workers: no re-import of torch (spawn costs ~10 s on a busy 2-core machine); the
    # children run single-threaded tiny ops only, so the parent's thread pools do not matter
    mp.start_processes(_ddp_worker, args=(port, out), nprocs=2, join=True, start_method="fork")
    idx = _ddp_indices().numpy()
    expected = np.stack([np.bincount(idx[..., g].ravel(), minlength=8) for g in range(2)])
    np.testing.assert_array_equal(np.load(out), expected)
    single = CodebookMetric(8, 2)
    single.update_indices(_ddp_indices())
    with open(out + ".json") as f:
        assert json.load(f) == _values(single)
