"""A suite's subjects share the real-side FID statistics through the cache keyed by data + extractor
(metrics-protocol §6): the first run computes them, the next reuses them, and rFID equals a fresh computation."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from gsqbench.config import suite_from_dict
from gsqbench.runner import run_suite

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metric(run_dir: Path, key: str) -> float:
    with open(run_dir / "metrics.csv") as f:
        return next(float(r["value"]) for r in csv.DictReader(f) if r["metric"] == key)


@pytest.mark.slow
def test_second_subject_reuses_cached_real_statistics(tmp_path, monkeypatch):
    _load("test_eval_ddp")._setup_weights(tmp_path, monkeypatch)
    gsq = {"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}}
    raw = _load("test_train").tiny_raw(steps=1, subjects=[gsq, {**gsq, "name": "gsq-again"}],
                                       eval={"metrics": ["fid"]})
    res = run_suite(suite_from_dict(raw), tmp_path / "results", progress=False)
    first, second = res.run_dirs
    cache = tmp_path / "results" / "tiny" / ".fid-cache"
    assert len(list(cache.glob("*.npz"))) == 1
    sources = [json.loads((d / "run.json").read_text())["card"]["fid"]["fid_reference_source"] for d in (first, second)]
    assert sources[0] != sources[1] and "cache" in str(sources[1]), sources
    # the same subject twice: the cached reference must give exactly what the fresh one gave
    assert _metric(second, "rfid@inception") == pytest.approx(_metric(first, "rfid@inception"), rel=1e-9)
    # 4 images: far below the 2,048 FID needs, so the value is stored with its verdict (tests/test_fairness.py)
    with open(first / "metrics.csv") as f:
        rows = {r["metric"]: r for r in csv.DictReader(f)}
    assert rows["rfid@inception"]["not_comparable"].startswith("N = 4 images < 2,048: FID")
