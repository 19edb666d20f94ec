"""Smoke and arithmetic checks of the benchmark scripts (benchmarks/): they run, write JSON, and their ratio
and memory columns mean what the header says.

Oracles: hand-computed ratios of given timings; a tensor of known byte size for the peak-memory sampler.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402


def test_table_speedup_and_memory_fraction_against_reference() -> None:
    rows = [C.Row("case", "ref", [2.0, 4.0, 3.0], 200.0, reference=True),
            C.Row("case", "fast", [1.0, 1.5, 0.5], 25.0),
            C.Row("case", "gone", skipped="needs ~48 GB, does not fit")]
    table = C.format_table(rows).splitlines()
    fast = next(line for line in table if " fast " in line)
    assert "3.00x" in fast and "0.125" in fast  # 3.0 s / 1.0 s median; 25 MB / 200 MB
    assert "skipped: needs ~48 GB" in next(line for line in table if " gone " in line)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS sampling needs Linux /proc")
def test_peak_memory_sees_a_transient_allocation() -> None:
    import mmap

    with C.PeakMemory(torch.device("cpu")) as mem:
        # 48 MiB of fresh anonymous pages, each touched: an allocator could serve a tensor from memory already
        # resident (freed by earlier tests), which RSS would not see
        buf = mmap.mmap(-1, 48 << 20)
        for offset in range(0, len(buf), mmap.PAGESIZE):
            buf[offset] = 1
        time.sleep(0.02)  # lives 20 ms: long enough for the 1 ms sampler even on a busy machine
        buf.close()
    assert 40 <= mem.peak_mb <= 200


def test_quantizer_benchmark_demo_section_writes_json(tmp_path: Path) -> None:
    import quantizers

    out = tmp_path / "q.json"
    assert quantizers.main(["--only", "demo", "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    impls = {r["impl"]: r for r in data["rows"]}
    assert set(impls) == {"straightforward full matrix", quantizers.EXACT_TRAIN, quantizers.EXACT_EVAL,
                          quantizers.EXPANDED, "search only, exact", "search only, fp32-expanded",
                          "vector-quantize-pytorch cosine"}
    assert all(r["skipped"] is None and len(r["times_s"]) == 1 and r["median_s"] > 0 for r in impls.values())
    assert impls["straightforward full matrix"]["reference"] and data["matmul_gflops"] > 0
    bound = data["lower_bounds"][0]
    # 2·N·V·d with N = positions × G: the demo's eval batch of 16 images at 64² through tiny-f4 (16×16), G = 2
    assert bound["dot_gflop"] == pytest.approx(2 * (16 * 16 * 16) * 2 * 64 * 4 / 1e9)


def test_lookup_precision_study_quick_run_writes_json(tmp_path: Path) -> None:
    import lookup_precision

    out = tmp_path / "lp.json"
    assert lookup_precision.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    kinds = [r["latents"] for r in data["results"]]
    assert kinds[0] == "random unit" and kinds[1].startswith("trained d=2")
    for r in data["results"]:
        assert r["d"] == 2 and r["V"] == 4096 and r["exact_codes_used"] >= 1 and r["tokens"] >= 256
        for mode in ("bf16", "fp32-expanded"):
            assert 0.0 <= r[mode]["agreement"] <= 1.0 and r[mode]["codes_used"] >= 1
            # the exact lookup picks the nearest code, so no mode's mean angle is smaller (up to float noise)
            assert r[mode]["mean_angle_deg"] >= r["exact_mean_angle_deg"] * (1 - 1e-6)


def test_scale_benchmark_build_section_writes_json(tmp_path: Path) -> None:
    """benchmarks/scale.py on a small folder: the build rows, the warm manifest reused, the goal line printed."""
    import scale

    out = tmp_path / "s.json"
    assert scale.main(["--n", "300", "--only", "build", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    impls = [r["impl"] for r in data["rows"]]
    assert impls[0].startswith("before") and "cold" in impls[1] and "warm" in impls[2]
    assert data["rows"][0]["reference"] and all(r["median_s"] > 0 for r in data["rows"])
    assert data["build_n"] == 300 and data["folder"]["n"] == 300
