"""`gsqbench compare`: every other subject against one reference subject, metric by metric, with a 95 % interval
and a verdict (better / worse / no detectable difference); the question "is my variant worse than GSQ?".

The statistics are gsqbench.stats (docs/metrics-protocol.md §15): differences are subject − reference, paired by
image id for per-image metrics (bootstrap over images, plus the seed spread with Welch's t when both have >= 2 seeds),
Welch's t over seeds for set-level metrics (no interval with one seed). Intervals are per comparison (no multiplicity
correction: a gate asks one question per subject and metric). Only runs of one comparison group (suite, fairness
hash, protocol card hash) are compared; anything else is refused with one line.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from gsqbench.errors import UserError, did_you_mean
from gsqbench.io import atomic_write_json, atomic_write_text, safe_child
from gsqbench.regress import Tolerance, parse_tolerance
from gsqbench.report.data import Group, finite, group_runs, runs_from_frame
from gsqbench.results import load_results, rows_to_csv
from gsqbench.stats import MACHINE_DEPENDENT, GroupStats, Unit, format_number, verdict

#: shown first, in this order; every other directional metric follows alphabetically
HEADLINE = ("psnr", "ssim", "lpips@alex", "lpips@vgg", "rfid@inception", "is@inception", "usage_pooled", "ppl_pooled")
FIELDS = ("suite", "fairness_hash", "card_hash", "reference", "subject", "grid", "metric", "direction",
          "reference_mean", "reference_seeds", "mean", "seeds", "difference", "ci_low", "ci_high", "p_value",
          "verdict", "method", "note", "diverged")


@dataclass
class ComparisonRow:
    """One subject × metric against the reference: difference = subject − reference."""

    suite: str
    fairness_hash: str
    card_hash: str
    reference: str
    subject: str
    grid: str
    metric: str
    direction: str
    reference_mean: float
    reference_seeds: int
    mean: float
    seeds: int
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    method: str
    note: str
    diverged: str = ""  # the subject's divergence note when any of its seeds diverged (the gate fails on it)


@dataclass
class Comparison:
    """The rows plus what the command prints around them."""

    suite: str
    fairness_hash: str
    card_hash: str
    reference: str
    reference_seeds: int
    rows: list[ComparisonRow]
    notes: list[str]


# ----------------------------------------------------------------------------------------------- selecting
def select_group(results_dirs: Sequence[str | os.PathLike], reference: str, suite: str | None = None) -> Group:
    """The one comparison group the results hold (after `--suite`); a mix of groups or an unknown reference is a
    UserError naming what was found."""
    runs = runs_from_frame(load_results(*results_dirs))
    suites = group_runs(runs)
    if suite is not None:
        if suite not in suites:
            raise UserError(f"--suite {suite!r}: not in these results{did_you_mean(suite, suites)}")
        suites = {suite: suites[suite]}
    groups = [g for gs in suites.values() for g in gs]
    if len(groups) > 1:
        desc = "; ".join(f"suite {g.suite} fairness {g.fairness_hash[:8]}… card {g.card_hash[:8]}…: "
                         f"{', '.join(sorted({r.subject for r in g.runs}))}" for g in groups)
        raise UserError(f"results mix {len(groups)} comparison groups ({desc}); compare needs runs of one suite with "
                        "one fairness hash and protocol card hash (pass --suite, or give only the matching folders)")
    group = groups[0]
    subjects = sorted({r.subject for r in group.runs})
    if reference not in subjects:
        raise UserError(f"--reference {reference!r}: no such subject in these results"
                        f"{did_you_mean(reference, subjects)}")
    return group


def _check_copies(stats: GroupStats) -> None:
    for u in stats.units:
        if u.copy:
            first = next(v for v in stats.units if v.subject == u.subject and v.grid_key == u.grid_key and not v.copy)
            dirs = sorted({str(r.run_dir) for r in first.all_runs + u.all_runs})
            raise UserError(f"subject {u.subject!r} has the same seed in several results folders ({', '.join(dirs)}); "
                            "give each run once")


def default_metrics(stats: GroupStats) -> list[str]:
    """Every metric with a direction that is not a machine-dependent cost figure, headline metrics first."""
    names = [m for m in stats.metrics() if stats.direction(m) in ("lower", "higher") and m not in MACHINE_DEPENDENT]
    return [m for m in HEADLINE if m in names] + sorted(m for m in names if m not in HEADLINE)


def check_metrics(stats: GroupStats, metrics: Iterable[str]) -> list[str]:
    valid = default_metrics(stats)
    out = []
    for m in metrics:
        if m in MACHINE_DEPENDENT:
            raise UserError(f"metric {m!r} is a cost figure measured on a possibly shared machine and is never "
                            "compared; speed claims come from the scripts in benchmarks/")
        if m not in valid:
            raise UserError(f"metric {m!r}: not a comparable metric of these results{did_you_mean(m, valid)}")
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------------- comparing
def compare_to_reference(group: Group, reference: str, metrics: Sequence[str] | None = None,
                         stats: GroupStats | None = None) -> Comparison:
    """Every other unit (at the reference's grid points) × metric, against the reference unit."""
    stats = stats or GroupStats(group.runs)
    _check_copies(stats)
    metrics = check_metrics(stats, metrics) if metrics else default_metrics(stats)
    refs = {u.grid_key: u for u in stats.units if u.subject == reference}
    notes: list[str] = []
    rows: list[ComparisonRow] = []
    unavailable: set[str] = set()
    for ref in refs.values():
        if ref.all_diverged:
            raise UserError(f"--reference {reference!r}{_at(ref)}: {ref.divergence_note}; nothing to compare against")
        if ref.diverged:
            notes.append(f"reference {reference}{_at(ref)}: {ref.divergence_note}; compared over its finished seeds")
    for unit in stats.units:
        if unit.subject == reference:
            continue
        ref = refs.get(unit.grid_key)
        if ref is None:
            notes.append(f"{unit.label}{_at(unit)}: no {reference} run at this grid point, not compared")
            continue
        if unit.all_diverged:
            rows += [_row(group, stats, ref, unit, m, diverged=unit.divergence_note) for m in metrics]
            continue
        if unit.diverged:
            notes.append(f"{unit.label}{_at(unit)}: {unit.divergence_note}; compared over its finished seeds")
        for m in metrics:
            row = _row(group, stats, ref, unit, m)
            if row is None:
                unavailable.add(m)
            else:
                rows.append(row)
    if unavailable:
        notes.append(f"not compared (unavailable for the reference and the subjects): {', '.join(sorted(unavailable))}")
    id_note = stats.image_id_note()
    if id_note:
        notes.append(f"runs {id_note}")
    n_ref = max((len(r.runs) for r in refs.values()), default=0)
    return Comparison(group.suite, group.fairness_hash, group.card_hash, reference, n_ref, rows, notes)


def _at(unit: Unit) -> str:
    return f" at {unit.grid_label}" if unit.grid else ""


def _row(group: Group, stats: GroupStats, ref: Unit, unit: Unit, metric: str,
         diverged: str = "") -> ComparisonRow | None:
    rc, uc = stats.cell(ref, metric), stats.cell(unit, metric)
    r_est = rc.estimate if rc else None
    u_est = uc.estimate if uc else None
    direction = stats.direction(metric)
    base = dict(suite=group.suite, fairness_hash=group.fairness_hash, card_hash=group.card_hash,
                reference=ref.subject, subject=unit.label, grid=unit.grid_label, metric=metric, direction=direction,
                reference_mean=r_est.mean if r_est else math.nan, reference_seeds=len(ref.runs),
                mean=u_est.mean if u_est else math.nan, seeds=len(unit.runs))
    nan = dict(difference=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan)
    if diverged:
        return ComparisonRow(**base, **nan, verdict="diverged", method="", note=diverged, diverged=diverged)
    if r_est is None and u_est is None:
        return None
    if r_est is None or u_est is None:
        why = (rc.unavailable if rc and r_est is None else uc.unavailable if uc else "") or "not measured"
        return ComparisonRow(**base, **nan, verdict="unavailable", method="", note=why)
    nc = (uc.not_comparable if uc else "") or (rc.not_comparable if rc else "") or stats.size_mismatch(metric,
                                                                                                     [ref, unit])
    if nc:
        return ComparisonRow(**base, **nan, verdict="not comparable", method="", note=nc)
    d = stats.difference(unit, ref, metric)
    return ComparisonRow(**base, difference=d.value, ci_low=d.ci_low, ci_high=d.ci_high, p_value=d.p_value,
                         verdict=verdict(d, direction), method=d.method, note=d.note, diverged=unit.divergence_note)


# ----------------------------------------------------------------------------------------------- gating
def parse_fail_if_worse(items: Iterable[str]) -> list[tuple[str, Tolerance]]:
    """`["psnr", "lpips@alex=0.01", "rfid@inception=5%"]` → [(metric, margin)] (margin 0 when not given)."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not name:
            raise UserError(f"--fail-if-worse {item!r}: expected METRIC or METRIC=MARGIN, e.g. psnr=0.1 or "
                            "rfid@inception=5%")
        out.append((name, parse_tolerance(value, f"--fail-if-worse {name}") if sep else Tolerance(0.0)))
    return out


def gate(comparison: Comparison, rules: Sequence[tuple[str, Tolerance]]) -> list[str]:
    """One line per subject that is worse than the reference on a gated metric by more than its margin, with 95 %
    confidence (the interval's bound nearest zero lies beyond the margin on the worse side), or whose runs diverged
    (on any seed). A gated metric whose
    verdict cannot be decided (no interval, not comparable, unavailable) is a UserError: a gate must not pass
    silently on what it could not check."""
    failures = []
    for metric, margin in rules:
        rows = [r for r in comparison.rows if r.metric == metric]
        if not rows:
            raise UserError(f"--fail-if-worse {metric}: no subject other than the reference was compared on it")
        for r in rows:
            if r.diverged:  # a variant that diverges (on any seed) is worse, whatever its finished seeds say
                failures.append(f"FAIL {r.subject} {metric}: {r.diverged}")
                continue
            if r.verdict in ("no interval", "not comparable", "unavailable"):
                raise UserError(f"--fail-if-worse {metric}: cannot decide for {r.subject}: {r.verdict}"
                                f"{f' ({r.note})' if r.note else ''}")
            allowed = margin.allowed(r.reference_mean)
            worse_by = r.ci_low if r.direction == "lower" else -r.ci_high  # the bound nearest zero, signed "worse"
            if r.verdict == "worse" and worse_by > allowed:
                failures.append(f"FAIL {r.subject} {metric}: worse than {comparison.reference} by "
                                f"{abs(r.difference):.4g} (95 % interval {_interval(r)}) > margin {margin}")
    return failures


# ----------------------------------------------------------------------------------------------- output
def _interval(r: ComparisonRow) -> str:
    return f"[{format_number(r.ci_low)}, {format_number(r.ci_high)}]" if finite(r.ci_low) else "—"


def _signed(x: float) -> str:
    return "" if not finite(x) else f"{x:+.4g}"


def format_table(comparison: Comparison) -> str:
    """The terminal table: subject, grid, metric, reference, value, difference, 95 % interval, verdict."""
    has_grid = any(r.grid for r in comparison.rows)
    header = ["subject", *(["grid"] if has_grid else []), "metric", comparison.reference, "value",
              "difference", "95% interval", "verdict"]
    body = []
    for r in comparison.rows:
        verdict_text = r.verdict + (f" ({r.note})" if r.note and r.verdict in ("not comparable", "unavailable",
                                                                              "no interval", "diverged") else "")
        body.append([r.subject, *([r.grid] if has_grid else []), r.metric, format_number(r.reference_mean),
                     format_number(r.mean), _signed(r.difference), _interval(r), verdict_text])
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    right = {len(header) - 5, len(header) - 4, len(header) - 3}
    lines = [f"compare: suite {comparison.suite}, reference {comparison.reference} "
             f"({comparison.reference_seeds} seed{'s' if comparison.reference_seeds != 1 else ''}), "
             f"fairness {comparison.fairness_hash[:8]}…, card {comparison.card_hash[:8]}…"]
    lines += ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
              for row in [header] + body]
    counts: dict[str, int] = {}
    for r in comparison.rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    lines.append(", ".join(f"{k} {v}" for k, v in counts.items()) or "nothing compared")
    lines.append("difference = subject − reference. Interval: per-image metrics paired over images (percentile "
                 "bootstrap; + seed spread, Welch t, with ≥ 2 seeds each); set-level metrics Welch t over seeds, "
                 "none with 1 seed. docs/metrics-protocol.md §15.")
    lines += [f"note: {n}" for n in comparison.notes]
    return "\n".join(lines)


def _csv_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if finite(v) else ""
    return str(v)


def write_outputs(comparison: Comparison, out_dir: str | os.PathLike) -> list[Path]:
    """compare.csv (FIELDS) and compare.json (rows + header facts) in `out_dir`; the HTML is report.render_compare."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in comparison.rows]
    csv_path = atomic_write_text(safe_child(out, "compare.csv"),
                                 rows_to_csv([{k: _csv_value(v) for k, v in r.items()} for r in rows], FIELDS))
    json_path = atomic_write_json(safe_child(out, "compare.json"), {
        "suite": comparison.suite, "fairness_hash": comparison.fairness_hash, "card_hash": comparison.card_hash,
        "reference": comparison.reference, "reference_seeds": comparison.reference_seeds, "notes": comparison.notes,
        "rows": [{k: (None if isinstance(v, float) and not finite(v) else v) for k, v in r.items()} for r in rows],
    })
    return [csv_path, json_path]
