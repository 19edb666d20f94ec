"""Constructed results folders for the statistics tests: run.json, metrics.csv and per_image.csv written with the
standard library (not with gsqbench's writer), per-image values chosen by the test so that the true differences are
known. Per-image metrics get metrics.csv value = mean and stderr = sd/√N of their column, like evaluate() does.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

COLUMNS = ["suite", "run", "subject", "seed", "metric", "value", "stderr", "ci_low", "ci_high", "direction", "n",
           "unavailable", "fairness_hash", "card_hash", "device", "not_comparable"]
FAIR, CARD = "f" * 64, "c" * 64
DIRECTIONS = {"psnr": "higher", "ssim": "higher", "lpips@alex": "lower", "usage_pooled": "higher",
              "ppl_pooled": "higher", "rfid@inception": "lower", "encode_images_per_s": "higher",
              "tokens_counted": "none", "bits_per_token": "none", "train_time_s": "lower"}


def write_run(root: Path, subject: str, seed: int, *, per_image: Mapping[str, Sequence[float]] | None = None,
              set_level: Mapping[str, float] | None = None, suite: str = "demo", fairness: str = FAIR,
              card: str = CARD, grid: Mapping | None = None, ids: Sequence[str] | None = None,
              not_comparable: Mapping[str, str] | None = None, divergence: Mapping | None = None) -> Path:
    """One run directory; `divergence` makes it a diverged run (status diverged, train_* rows only)."""
    grid = dict(grid or {})
    label = "-".join(f"{k.split('.')[-1]}{v}" for k, v in grid.items())
    run = f"{subject}-s{seed}" + (f"-{label}" if label else "")
    d = root / suite / run
    d.mkdir(parents=True)
    info = {"run_id": run, "suite": suite, "subject": subject, "seed": seed, "grid": grid, "spec": {},
            "fairness_hash": fairness, "card_hash": card, "card": {}, "provenance": {"device": "cpu"},
            "status": "diverged" if divergence else "done"}
    if divergence:
        info["divergence"] = dict(divergence)
    (d / "run.json").write_text(json.dumps(info))
    rows = []

    def row(metric: str, value: float, stderr: float | None = None, n: int | None = None) -> dict:
        ci = (value - 1.96 * stderr, value + 1.96 * stderr) if stderr is not None else None
        return {"suite": suite, "run": run, "subject": subject, "seed": seed, "metric": metric, "value": repr(value),
                "stderr": "" if stderr is None else repr(stderr), "ci_low": repr(ci[0]) if ci else "",
                "ci_high": repr(ci[1]) if ci else "", "direction": DIRECTIONS.get(metric, "higher"),
                "n": "" if n is None else n, "unavailable": "", "fairness_hash": fairness, "card_hash": card,
                "device": "cpu", "not_comparable": (not_comparable or {}).get(metric, "")}

    if divergence:
        rows.append(row("train_time_s", 12.5))
    else:
        for metric, values in (per_image or {}).items():
            xs = [float(repr(float(v))) for v in values]
            mean = math.fsum(xs) / len(xs)
            sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
            rows.append(row(metric, mean, sd / math.sqrt(len(xs)), len(xs)))
        for metric, value in (set_level or {}).items():
            rows.append(row(metric, float(value)))
        if per_image:
            n = len(next(iter(per_image.values())))
            ids = list(ids or [f"img{i:04d}" for i in range(n)])
            with (d / "per_image.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image_id", *per_image])
                for i, image_id in enumerate(ids):
                    w.writerow([image_id, *(repr(float(v[i])) for v in per_image.values())])
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return d
