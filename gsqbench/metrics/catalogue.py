"""The metric catalogue: the registered metric classes in display order, and name resolution for `eval.metrics`,
`--require` and up-front weight checks (docs/contracts.md "Metrics")."""
from __future__ import annotations

from typing import Optional, Sequence

from gsqbench.errors import UserError, did_you_mean
from gsqbench.metrics.base import Metric

#: display and row order of the built-in families; plugin families follow, by registration order
FAMILY_ORDER = ("pixel", "lpips", "fid", "rfd", "kid", "prc", "codebook", "cost")


def metric_catalogue() -> list[type[Metric]]:
    """Every registered metric class, in family order (FAMILY_ORDER, then plugin families) then registration order."""
    from gsqbench.registry import METRICS, discover

    discover()
    classes = [METRICS.get(name) for name in METRICS.registration_order()]
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    order = {cls: i for i, cls in enumerate(classes)}
    return sorted(classes, key=lambda c: (rank.get(c.family, len(rank)), order[c]))


def class_for_key(key: str, classes: Sequence[type[Metric]]) -> Optional[type[Metric]]:
    return next((c for c in classes if key in c.outputs), None)


def resolve_metric_names(names: Sequence[str], classes: Sequence[type[Metric]], what: str) -> set[type[Metric]]:
    """Classes selected by family names, registered metric names or metric keys; UserError for an unknown name."""
    from gsqbench.registry import METRICS

    chosen: set[type[Metric]] = set()
    for name in names:
        by_family = {c for c in classes if c.family == name}
        by_key = class_for_key(name, classes)
        if by_family:
            chosen |= by_family
        elif name in METRICS:
            chosen.add(METRICS.get(name))
        elif by_key is not None:
            chosen.add(by_key)
        else:
            valid = sorted({c.family for c in classes} | {k for c in classes for k in c.outputs})
            raise UserError(f"{what}: unknown metric '{name}'{did_you_mean(name, valid)}")
    return chosen


def check_required_weights(require: Sequence[str]) -> None:
    """Fail before any compute when a required metric's weights are missing (one line, exit 2)."""
    from gsqbench.weights import WeightsUnavailable, weight_path

    classes = metric_catalogue()
    for key in require:
        cls = class_for_key(key, classes)
        for name in (cls.weights if cls is not None else ()):
            try:
                weight_path(name)
            except WeightsUnavailable as exc:
                raise UserError(f"required metric '{key}' is unavailable: {exc}") from None
