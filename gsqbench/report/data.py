"""Which runs a report shows and which may be compared: run directories read into `Run`s, grouped by suite,
fairness hash and protocol card hash (design.md "Fairness is checked, not promised"). Pure Python, no torch."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from gsqbench.results import read_run_info

if TYPE_CHECKING:
    import pandas as pd

_DIM_KEYS, _VOCAB_KEYS = {"dim", "latent_dim", "embedding_dim"}, {"codebook_size", "vocab_size", "vocab"}
_COMPRESSION_KEYS = {"preset", "downsample", "compression", "f"}


def finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; leaves (lists included) as compact JSON text."""
    if isinstance(obj, Mapping):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)}


@dataclass
class Run:
    """One run directory: its run.json and its metric rows keyed by metric name."""

    run_dir: Path
    info: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    suite: str
    run_id: str
    subject: str
    seed: str
    fairness_hash: str
    card_hash: str

    @property
    def label(self) -> str:
        return self.subject if self.subject == self.run_id else f"{self.subject} ({self.run_id})"


@dataclass
class Group:
    """Runs that may be compared: same suite, fairness hash and protocol card hash."""

    suite: str
    fairness_hash: str
    card_hash: str
    runs: list[Run] = field(default_factory=list)


def runs_from_frame(df: "pd.DataFrame") -> list[Run]:
    runs = []
    for run_dir, rows in df.groupby("run_dir", sort=True):
        first = rows.iloc[0]
        info = read_run_info(run_dir)
        runs.append(Run(
            run_dir=Path(run_dir), info=info, metrics={r["metric"]: r for r in rows.to_dict("records")},
            suite=str(first["suite"] or info.get("suite", "")), run_id=str(first["run"] or info.get("run_id", "")),
            subject=str(first["subject"] or info.get("subject", "")), seed=str(first["seed"]),
            fairness_hash=str(first["fairness_hash"]), card_hash=str(first["card_hash"]),
        ))
    return runs


#: the fairness key of a group of loaded subjects: each run's own hash records its file; the card decides
LOADED_GROUP = "loaded"


def is_loaded(run: Run) -> bool:
    """A loaded subject (suite `load: PATH`, or `gsqbench eval` of a checkpoint gsqbench did not train)."""
    return bool(run.info.get("loaded"))


def group_runs(runs: Iterable[Run]) -> dict[str, list[Group]]:
    """suite → groups (by fairness hash, then card hash), in a stable order.

    A run that diverged was never evaluated, so it has no protocol card (card hash ""): it joins the group of its
    suite and fairness hash (it trained under the same spec), where it is shown as diverged, never ranked.
    Loaded subjects (published releases, checkpoints evaluated as released) were not trained here: each one's
    fairness hash records its own file, so they are grouped by protocol card alone (fairness key `LOADED_GROUP`),
    and rank beside each other only under the same card hash.
    """
    suites: dict[str, dict[tuple[str, str], Group]] = {}
    ordered = sorted(runs, key=lambda r: (r.suite, r.fairness_hash, r.card_hash, r.subject, r.run_id))
    for run in [r for r in ordered if not _cardless_diverged(r)]:
        key = (LOADED_GROUP if is_loaded(run) else run.fairness_hash, run.card_hash)
        suites.setdefault(run.suite, {}).setdefault(key, Group(run.suite, *key)).runs.append(run)
    for run in [r for r in ordered if _cardless_diverged(r)]:
        groups = suites.setdefault(run.suite, {})
        home = next((g for (fair, _), g in groups.items() if fair == run.fairness_hash), None)
        if home is None:
            home = groups.setdefault((run.fairness_hash, ""), Group(run.suite, run.fairness_hash, ""))
        home.runs.append(run)
    return {s: list(g.values()) for s, g in suites.items()}


def _cardless_diverged(run: Run) -> bool:
    return run.info.get("status") == "diverged" and not run.card_hash


def separation_reason(groups: Sequence[Group]) -> str | None:
    """Why a suite's rows are split into several tables (None when there is one group)."""
    if len(groups) < 2:
        return None
    parts = []
    fair = sorted({g.fairness_hash for g in groups if g.fairness_hash != LOADED_GROUP})
    cards = sorted({g.card_hash for g in groups})
    if len(fair) > 1:
        parts.append("fairness hashes differ: " + " vs ".join(f"{h[:8]}…" for h in fair))
    if len(cards) > 1:
        fields = differing_card_fields(groups)
        parts.append("protocol card hashes differ: " + " vs ".join(f"{h[:8]}…" for h in cards)
                     + (f" (card fields that differ: {', '.join(fields[:8])}{', …' if len(fields) > 8 else ''})"
                        if fields else ""))
    return "; ".join(parts) + "; rows are not comparable"


def differing_card_fields(groups: Sequence[Group]) -> list[str]:
    """Hashed card fields whose value differs between the groups' first runs: tells the user what split the table."""
    from gsqbench.card import hashable_view  # pure-Python module: no torch

    cards = [flatten(hashable_view(g.runs[0].info.get("card") or {})) for g in groups]
    keys = sorted(set().union(*cards)) if cards else []
    return [k for k in keys if k != "card_hash" and len({c.get(k, "∅") for c in cards}) > 1]


def metric_value(run: Run, key: str) -> float | None:
    m = run.metrics.get(key)
    if m is None or m.get("unavailable") or not finite(m.get("value")):
        return None
    return float(m["value"])


def grid_axes(run: Run) -> dict[str, float]:
    """Numeric scaling axes from the run's grid values: dim, codebook_size, groups, compression factor."""
    axes: dict[str, float] = {}
    for key, text in flatten(run.info.get("grid") or {}).items():
        leaf = key.rsplit(".", 1)[-1]
        raw = text.strip('"')
        if leaf in _COMPRESSION_KEYS:
            match = re.search(r"f(\d+)", raw) or re.fullmatch(r"(\d+)", raw)
            if match:
                axes["compression"] = float(match.group(1))
            continue
        name = "dim" if leaf in _DIM_KEYS else "codebook_size" if leaf in _VOCAB_KEYS else \
            "groups" if leaf == "groups" else None
        if name and finite(raw):
            axes[name] = float(raw)
    return axes


# ----------------------------------------------------------------------------------------------- every run folder
#: files that make a folder a run folder (results of `run`/`eval`, or the traces `train` leaves)
_RUN_MARKERS = ("metrics.csv", "run.json", "train_log.csv", "checkpoint/model.json", "checkpoint/train_state.pt")


@dataclass
class Unlisted:
    """A run folder the comparison tables cannot show, and why: `state` is 'not evaluated' (trained or training,
    no results yet) or 'unreadable' (a results file is damaged; `detail` names it)."""

    run_dir: Path
    suite: str
    run_id: str
    state: str
    detail: str


def run_folders(*roots: str | Path) -> list[Path]:
    """Every folder under `roots` (or a root itself) holding a results or training file, sorted, de-duplicated."""
    from gsqbench.results import find_run_dirs

    return find_run_dirs(*roots, markers=_RUN_MARKERS)


def _train_progress(run_dir: Path) -> str:
    """'trained 20 steps' from the training log / exported checkpoint, for a run without results."""
    from gsqbench.results import TRAIN_LOG_FILE, read_csv_rows

    steps = None
    try:
        rows = read_csv_rows(run_dir / TRAIN_LOG_FILE)
        steps = max((int(float(r["step"])) for r in rows if r.get("step")), default=None)
    except Exception:  # a damaged log only makes this description vaguer
        steps = None
    model = run_dir / "checkpoint" / "model.json"
    exported = model.is_file()
    if exported:
        try:
            steps = int(json.loads(model.read_text(encoding="utf-8")).get("meta", {}).get("step", steps))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    at = f" {steps} steps" if steps is not None else ""
    if exported:
        return f"trained{at}, checkpoint exported; no metrics.csv (evaluate it with gsqbench run or eval)"
    return f"training stopped or still running{f' (logged up to step {steps})' if steps is not None else ''}; " \
           "no metrics.csv"


def _names(run_dir: Path, info: Mapping[str, Any]) -> tuple[str, str]:
    return str(info.get("suite") or run_dir.parent.name), str(info.get("run_id") or run_dir.name)


def collect_runs(*roots: str | Path) -> tuple[list[Run], list[Unlisted]]:
    """Readable evaluated runs, plus every other run folder (not evaluated, or with a damaged file) as Unlisted,
    so that nothing under the given folders is left out of a report silently."""
    import pandas as pd

    from gsqbench.errors import UserError
    from gsqbench.results import METRICS_FILE, RUN_FILE, read_metrics

    runs: list[Run] = []
    unlisted: list[Unlisted] = []
    for run_dir in run_folders(*roots):
        try:
            info = read_run_info(run_dir)
        except UserError as exc:
            unlisted.append(Unlisted(run_dir, run_dir.parent.name, run_dir.name, "unreadable",
                                     f"{run_dir / RUN_FILE}: {_short(exc)}"))
            continue
        suite, run_id = _names(run_dir, info)
        if not (run_dir / METRICS_FILE).is_file():
            unlisted.append(Unlisted(run_dir, suite, run_id, "not evaluated", _train_progress(run_dir)))
            continue
        try:
            df = read_metrics(run_dir)
        except UserError as exc:
            unlisted.append(Unlisted(run_dir, suite, run_id, "unreadable", _short(exc)))
            continue
        if df.empty:
            unlisted.append(Unlisted(run_dir, suite, run_id, "unreadable",
                                     f"{run_dir / METRICS_FILE}: no metric rows"))
            continue
        df["run_dir"] = str(run_dir)
        runs += runs_from_frame(pd.DataFrame(df))
    if not runs and not unlisted:
        raise UserError(f"no results (metrics.csv) or run folders found under {', '.join(str(r) for r in roots)}")
    return runs, unlisted


def _short(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
