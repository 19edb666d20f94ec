"""The leaderboard part of a report: loaded subjects ranked under the pinned protocol, and per tokenizer the published
number beside what gsqbench reproduces under the tokenizer's own protocol (its compatibility mode) and under the
pinned `gsqbench` protocol. Pure Python, no torch.

Loaded subjects (published releases and checkpoints evaluated as released) are grouped by protocol card alone
(report.data.group_runs). The ranking reuses gsqbench.stats (GroupStats: intervals, paired differences,
Holm-corrected ★/☆ marks); rows are ordered by the mean of the ranking metric, and only the marks say which
differences are significant. Published numbers are data (`published.yaml` in this package, with their sources), shown
beside measured values and never ranked against them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

from gsqbench.errors import UserError
from gsqbench.report.data import LOADED_GROUP, Group, Run, finite
from gsqbench.stats import GroupStats, Unit

PUBLISHED_FILE = "published.yaml"
PINNED = "gsqbench"
#: ranking metric, in order of preference: the first one every ranked row has (rFID needs the Inception weights)
RANK_KEYS: tuple[tuple[str, str, str], ...] = (
    ("rfid@inception", "rFID", "f3"), ("lpips@alex", "LPIPS (alex)", "f4"), ("psnr", "PSNR (dB)", "f2"))
#: metrics of the published-vs-reproduced tables: (key, title, format)
PUBLISHED_KEYS: tuple[tuple[str, str, str], ...] = (
    ("rfid@inception", "rFID", "f2"), ("is@inception", "IS", "f1"), ("psnr", "PSNR (dB)", "f2"),
    ("ssim", "SSIM", "f3"), ("lpips@alex", "LPIPS (alex)", "f3"))


@dataclass(frozen=True)
class Published:
    """One subject's published numbers (gsqbench/report/published.yaml)."""

    subject: str
    tokenizer: str
    kind: str
    mode: str
    values: dict[str, float]
    source: str
    notes: str = ""


@dataclass
class PublishedTable:
    """The data file: its label and one entry per subject name."""

    label: str
    subjects: dict[str, Published] = field(default_factory=dict)


def load_published(text: Optional[str] = None) -> PublishedTable:
    """Parse published.yaml (the packaged file unless `text` is given); a malformed entry is a one-line UserError."""
    import yaml

    where = f"gsqbench/report/{PUBLISHED_FILE}"
    if text is None:
        text = resources.files("gsqbench.report").joinpath(PUBLISHED_FILE).read_text(encoding="utf-8")
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("subjects"), Mapping):
        raise UserError(f"{where}: expected a mapping with 'label' and 'subjects'")
    out = PublishedTable(str(raw.get("label") or "published"))
    keys = {k for k, _, _ in PUBLISHED_KEYS}
    for name, entry in raw["subjects"].items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("values"), Mapping):
            raise UserError(f"{where}: subject {name!r} needs a 'values' mapping")
        bad = [k for k, v in entry["values"].items() if k not in keys or not finite(v)]
        if bad:
            raise UserError(f"{where}: subject {name!r}: value {bad[0]!r} is not a finite number of a known metric "
                            f"({', '.join(sorted(keys))})")
        missing = [k for k in ("tokenizer", "kind", "mode", "source") if not entry.get(k)]
        if missing:
            raise UserError(f"{where}: subject {name!r} lacks {', '.join(missing)}")
        out.subjects[str(name)] = Published(
            subject=str(name), tokenizer=str(entry["tokenizer"]), kind=str(entry["kind"]), mode=str(entry["mode"]),
            values={k: float(v) for k, v in entry["values"].items()}, source=str(entry["source"]),
            notes=str(entry.get("notes") or ""))
    return out


# ----------------------------------------------------------------------------------------------- ranking
def group_mode(group: Group) -> str:
    """The eval mode of a group (every run of a group shares its card, hence its mode)."""
    card = group.runs[0].info.get("card") or {} if group.runs else {}
    return str(card.get("mode") or "")


def loaded_groups(groups: Sequence[Group]) -> list[int]:
    """Indices of the groups of loaded subjects."""
    return [i for i, g in enumerate(groups) if g.fairness_hash == LOADED_GROUP]


def rank_metric(stats: GroupStats) -> Optional[tuple[str, str, str]]:
    """The first of RANK_KEYS with a value (available and comparable) for every evaluated row; else the first with
    a value for any row (rows without one are listed last, unranked); None when no ranking metric was measured."""
    units = [u for u in stats.units if u.runs]

    def has(u: Unit, key: str) -> bool:
        c = stats.cell(u, key)
        return c is not None and c.estimate is not None and finite(c.estimate.mean)

    for key, title, kind in RANK_KEYS:
        if units and all(has(u, key) for u in units):
            return key, title, kind
    return next(((k, t, f) for k, t, f in RANK_KEYS if any(has(u, k) for u in units)), None)


def ranked_units(stats: GroupStats, key: str) -> list[tuple[Optional[int], Unit]]:
    """(position, unit) ordered by the mean of `key` in its better direction; units without a value last (None)."""
    better_high = stats.direction(key) == "higher"
    scored, rest = [], []
    for u in stats.units:
        c = stats.cell(u, key) if u.runs else None
        if c is not None and c.estimate is not None and finite(c.estimate.mean):
            scored.append((c.estimate.mean, u))
        else:
            rest.append(u)
    scored.sort(key=lambda t: -t[0] if better_high else t[0])
    return [(i + 1, u) for i, (_, u) in enumerate(scored)] + [(None, u) for u in rest]


def loaded_kind(run: Run) -> str:
    return str((run.info.get("loaded") or {}).get("kind") or "")


# ----------------------------------------------------------------------------------------------- published vs reproduced
def _value(stats: Optional[GroupStats], unit: Optional[Unit], key: str, fmt: Any) -> dict[str, Any]:
    """A measured cell: mean ± standard error, the interval in the title, `not comparable` said."""
    if stats is None or unit is None:
        return {"text": "not run", "na": True, "title": "no run of this subject under this protocol"}
    c = stats.cell(unit, key)
    if c is None:
        return {"text": "–", "na": True, "title": "not measured"}
    if c.estimate is None:
        return {"text": "n/a", "na": True, "title": c.unavailable or "value is NaN"}
    e = c.estimate
    bits = [f"95% interval [{e.ci_low:.6g}, {e.ci_high:.6g}]"] if finite(e.ci_low) and finite(e.ci_high) else []
    bits.append(e.method)
    out = {"text": fmt(e.mean), "pm": f"± {e.stderr:.2g}" if finite(e.stderr) else "", "title": "; ".join(bits),
           "mean": e.mean}
    if c.not_comparable:
        out["note"] = f"not comparable: {c.not_comparable}"
    return out


def _find(groups: Sequence[Group], all_stats: Sequence[GroupStats], subject: str,
          mode: str) -> tuple[Optional[GroupStats], Optional[Unit], Optional[Group]]:
    """The loaded subject's unit (first grid point) in the loaded group of eval mode `mode`."""
    for i in loaded_groups(groups):
        if group_mode(groups[i]) != mode:
            continue
        units = [u for u in all_stats[i].units if u.subject == subject and u.runs]
        if units:
            return all_stats[i], units[0], groups[i]
    return None, None, None


def comparison_tables(groups: Sequence[Group], all_stats: Sequence[GroupStats], published: PublishedTable,
                      fmt: Any) -> list[dict[str, Any]]:
    """One table per loaded subject of these groups: per metric the published value, the value reproduced under
    the subject's own protocol (its compatibility mode) and under the pinned gsqbench protocol. `fmt(value, kind)`
    formats numbers (render.fmt_value)."""
    subjects = sorted({u.subject for i in loaded_groups(groups) for u in all_stats[i].units if u.runs})
    tables = []
    for subject in subjects:
        entry = published.subjects.get(subject)
        pinned = _find(groups, all_stats, subject, PINNED)
        own_mode = entry.mode if entry is not None else ""
        own = _find(groups, all_stats, subject, own_mode) if own_mode else (None, None, None)
        runs = [r for _, u, _ in (pinned, own) if u is not None for r in u.runs]
        kinds = sorted({loaded_kind(r) for r in runs if loaded_kind(r)})
        table: dict[str, Any] = {"subject": subject, "kinds": ", ".join(kinds) or "?", "rows": [], "notes": []}
        if entry is None:
            table["notes"].append(f"no published numbers on file for '{subject}' ({PUBLISHED_FILE} is keyed by the "
                                  "subject names of configs/leaderboard/imagenet256.yaml)")
            tables.append(table)
            continue
        table.update(tokenizer=entry.tokenizer, source=entry.source, mode=entry.mode,
                     own_card=own[2].card_hash if own[2] is not None else "",
                     pinned_card=pinned[2].card_hash if pinned[2] is not None else "")
        if entry.notes:
            table["notes"].append(entry.notes)
        if kinds and entry.kind not in kinds:
            table["notes"].append(f"loaded from a {', '.join(kinds)} file, but the published numbers are for a "
                                  f"{entry.kind} release: not compared")
            tables.append(table)
            continue
        for key, title, kind in PUBLISHED_KEYS:
            if key not in entry.values:
                continue
            f = lambda v, k=kind: fmt(v, k)  # noqa: E731
            row = {"metric": title, "published": f(entry.values[key]),
                   "own": _value(own[0], own[1], key, f), "pinned": _value(pinned[0], pinned[1], key, f)}
            mean = row["own"].get("mean")
            row["delta"] = f"{mean - entry.values[key]:+.3g}" if mean is not None and finite(mean) else ""
            table["rows"].append(row)
        tables.append(table)
    return tables
