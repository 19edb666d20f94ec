"""Shared machinery of the benchmark scripts: timing (median/min/max of repeats), extra peak memory, the
side-by-side table with ratios against a reference row, machine facts (fp32 matmul throughput), and JSON output.

Peak memory is the extra memory a run needs above what was allocated before it: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the resident set sampled every millisecond by a background thread
(torch's CPU allocator returns large blocks to the OS, so RSS follows allocations; peaks shorter than ~1 ms can
be missed, which never happens for the GB-sized matrices this is meant to catch).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(REPO))

from gsqbench.io import atomic_write_json  # noqa: E402

log = logging.getLogger("gsqbench.benchmarks")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Row:
    """One measured (or skipped) implementation of one case."""

    case: str  # e.g. "F16 d=2 G=8 V=262144, 256 pos"
    impl: str  # e.g. "gsq (ours)", "straightforward"
    times_s: list[float] = field(default_factory=list)
    peak_mb: Optional[float] = None
    reference: bool = False  # the row the others in the case are compared with
    skipped: Optional[str] = None  # why it did not run
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats per row (default {repeats})")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch intra-op threads (default: torch's; use 1 on a CPU shared with other jobs: "
                             "multi-threaded ops stall at every barrier when another process holds a core)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected an integer >= 1")
    return int(text)


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: no sampling, peak reported as unknown
        return -1


class PeakMemory:
    """Context manager measuring the extra peak memory (MB) of the enclosed code on `device`."""

    def __init__(self, device: torch.device, interval_s: float = 0.001) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_mb: Optional[float] = None
        self._stop = threading.Event()
        self._base = self._max = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._max = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._max = max(self._max, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak_mb = None if self._base < 0 else max(0, self._max - self._base) / 2**20


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[list[float], float]:
    """Run fn warmup + repeats times; return the timed seconds and the largest extra peak memory (MB)."""
    for _ in range(warmup):
        fn()
    times, peak = [], 0.0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak_mb or 0.0)
    return times, peak


def run_row(case: str, impl: str, fn: Callable[[], Any], device: torch.device, repeats: int, *,
            warmup: int = 1, reference: bool = False, **info: Any) -> Row:
    """Measure one row, turning an out-of-memory failure into a skipped row instead of ending the script."""
    log.info("%s | %s ...", case, impl)
    try:
        times, peak = measure(fn, device, repeats, warmup)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(exc):
            raise  # only allocation failures are an expected outcome of a benchmark row
        return Row(case, impl, reference=reference, skipped=f"out of memory: {str(exc).splitlines()[0][:80]}",
                   info=info)
    return Row(case, impl, times, peak, reference, info=info)


def run_interleaved(case: str, impls: Sequence[tuple[str, Callable[[], Any]]], device: torch.device, repeats: int,
                    *, warmup: int = 1) -> list[Row]:
    """Measure several implementations round-robin (A B C A B C ...), so that a load change on a shared machine
    hits all of them alike and their ratio stays meaningful. The first is the reference."""
    for _, fn in impls:
        for _ in range(warmup):
            fn()
    rows = [Row(case, name, reference=i == 0, peak_mb=0.0) for i, (name, _) in enumerate(impls)]
    for _ in range(repeats):
        for row, (name, fn) in zip(rows, impls):
            log.info("%s | %s ...", case, name)
            times, peak = measure(fn, device, 1, warmup=0)
            row.times_s += times
            row.peak_mb = max(row.peak_mb or 0.0, peak)
    return rows


def skipped(case: str, impl: str, why: str, *, reference: bool = False, **info: Any) -> Row:
    return Row(case, impl, reference=reference, skipped=why, info=info)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory an implementation may use on `device` (CUDA free memory, or MemAvailable on Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown platform: assume a modest machine


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput of this machine (GFLOP/s), the roofline for the lookup's dot products."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times, _ = measure(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n**3 / min(times) / 1e9


def _fmt_time(s: float) -> str:
    return f"{s:.3f}" if s < 100 else f"{s:.0f}"


def _fmt_mb(mb: Optional[float]) -> str:
    if mb is None:
        return "?"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.1f} MB"


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table grouped by case; ratios against the case's reference row: speed-up (ref time / time,
    >1 = faster) and memory fraction (peak / ref peak, <1 = smaller)."""
    head = f"{'case':<40} {'implementation':<34} {'median s':>9} {'min':>8} {'max':>8} {'peak mem':>10} " \
           f"{'speed-up':>9} {'mem frac':>9}"
    lines = [head, "-" * len(head)]
    refs = {r.case: r for r in rows if r.reference and not r.skipped}
    for r in rows:
        if r.skipped:
            lines.append(f"{r.case:<40} {r.impl:<34} skipped: {r.skipped}")
            continue
        ref = refs.get(r.case)
        speed = f"{ref.median / r.median:.2f}x" if ref and r is not ref else ("ref" if ref is r else "")
        mem = ""
        if ref and r is not ref and r.peak_mb is not None and (ref.peak_mb or 0) >= 1.0:  # below: sampling noise
            mem = f"{r.peak_mb / ref.peak_mb:.3f}"
        lines.append(f"{r.case:<40} {r.impl:<34} {_fmt_time(r.median):>9} {_fmt_time(min(r.times_s)):>8} "
                     f"{_fmt_time(max(r.times_s)):>8} {_fmt_mb(r.peak_mb):>10} {speed:>9} {mem:>9}")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = os.getloadavg()[0]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Optional[Path], script: str, machine: dict[str, Any], rows: Sequence[Row],
               extra: Optional[dict[str, Any]] = None) -> None:
    if path is None:
        return
    payload = {"script": script, "machine": machine, "rows": [dict(asdict(r), median_s=r.median) for r in rows],
               **(extra or {})}
    atomic_write_json(path, json.loads(json.dumps(payload, default=str)))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
