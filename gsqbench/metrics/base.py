"""The streaming metric contract: every metric sees the same uint8 (real, fake) pairs, once.

A metric accumulates sums (reduced across DDP ranks) or per-image values (gathered and sorted by image id), and
`compute()` returns MetricValue rows. Per-image metrics report the mean over images with a standard error and a
bootstrap 95 % interval (metrics-protocol.md §3–§5, §10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

Direction = Literal["lower", "higher", "none"]


@dataclass
class MetricValue:
    """One result row. `unavailable` holds the reason (with the fix command) when the value could not be computed."""

    name: str
    value: float
    stderr: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    direction: Direction = "none"
    n: Optional[int] = None
    unavailable: Optional[str] = None

    @classmethod
    def missing(cls, name: str, reason: str, direction: Direction = "none") -> "MetricValue":
        return cls(name=name, value=float("nan"), direction=direction, unavailable=reason)


class Metric:
    """Base class: `update` per batch, `sync` across ranks (no-op on one process), then `compute`."""

    #: metric keys this metric produces
    keys: tuple[str, ...] = ()

    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def sync(self) -> None:
        """All-reduce sums / gather per-image values when torch.distributed is initialised."""

    def compute(self) -> list[MetricValue]:  # pragma: no cover - abstract
        raise NotImplementedError

    def per_image(self) -> dict[str, list[float]]:
        """Per-image values keyed by metric name, in the order of `image_ids` seen (after sync: sorted by id)."""
        return {}


def mean_with_interval(
    values: Sequence[float], name: str, direction: Direction, *, n_boot: int = 1000, seed: int = 0
) -> MetricValue:
    """Mean of per-image values with its standard error and a seeded percentile-bootstrap 95 % interval."""
    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return MetricValue.missing(name, "no images evaluated", direction)
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    rng = np.random.default_rng(seed)
    boots = arr[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return MetricValue(name, mean, stderr, float(lo), float(hi), direction, n)
