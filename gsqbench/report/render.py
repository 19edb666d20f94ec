"""HTML comparison reports rendered from results files only (docs/contracts.md "Results"); never imports torch.

`render_report(results_dirs, out_dir)` writes a self-contained folder: index.html, one page per suite, style.css and
assets/ (plots and image panels), all linked relatively so it opens from disk without a server, CDN or JS.
Rows are compared only within one (suite, fairness hash, protocol card hash) group; a suite mixing hashes gets one
table per group and says why; loaded subjects (published releases evaluated as released) are grouped by card alone,
ranked in a leaderboard and set beside their published numbers (gsqbench/report/leaderboard.py). Each table row is a subject (× grid point) aggregated over its seeds, with intervals
and ★/☆ marks from gsqbench.stats (metrics-protocol.md §15); per-seed rows stay one click away, and each suite's
aggregated table is also written as CSV. `render_regress` and `render_compare` write the pages of `gsqbench regress
-o` and `gsqbench compare -o`, which the index links. User-given names are escaped by jinja2 (autoescape on) and
sanitised in file names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes, atomic_write_json, atomic_write_text, safe_child, safe_name
from gsqbench.report import paper_reference as paper
from gsqbench.report import plots
from gsqbench.report.data import (
    Group, Run, Unlisted, collect_runs, finite, flatten, grid_axes, group_runs, separation_reason,
)
from gsqbench.results import read_code_counts, read_per_image, read_train_log, rows_to_csv, sample_ids
from gsqbench.stats import (
    SUMMARY_FIELDS, Cell, GroupStats, Unit, divergence_text, is_diverged, rows_for_csv, summary_rows,
)

if TYPE_CHECKING:
    import pandas as pd

    from gsqbench.compare import Comparison

log = logging.getLogger(__name__)

#: summary table: (metric key, column title, formatter name)
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("bits_per_token", "bits/token", "g4"), ("rfid@inception", "rFID", "f3"), ("is@inception", "IS", "f1"),
    ("psnr", "PSNR (dB)", "f2"), ("ssim", "SSIM", "f4"), ("lpips@alex", "LPIPS (alex)", "f4"),
    ("usage_pooled", "usage", "pct"), ("ppl_pooled", "perplexity", "int"), ("tokens_counted", "tokens counted", "int"),
    ("params", "params", "params"), ("encode_images_per_s", "images/s (encode)", "f1"),
)
MARK_SYMBOL = {"best": "★", "tied": "☆"}
MARK_WORDS = {"best": "significantly best (Holm-corrected, 95 %)", "tied": "tied for best (no significant difference)"}
RD_METRICS = (("psnr", "PSNR (dB)"), ("lpips@alex", "LPIPS (alex)"), ("rfid@inception", "rFID"))
SCALING_METRICS = (("rfid@inception", "rFID"), ("lpips@alex", "LPIPS (alex)"), ("psnr", "PSNR (dB)"))


# ----------------------------------------------------------------------------------------------- formatting
def fmt_value(value: Any, kind: str) -> str:
    if not finite(value):
        return "n/a"
    v = float(value)
    if kind == "pct":  # two decimals: 99.98 % (a few dead codes) must not read as 100.0 %
        return f"{v * 100:.2f}%"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "params":
        return f"{v / 1e6:.2f} M" if abs(v) >= 1e5 else f"{v:,.0f}"
    if kind.startswith("f"):
        return f"{v:.{int(kind[1:])}f}"
    return f"{v:.{int(kind[1:] or 4)}g}"


def fmt_interval(row: Mapping[str, Any], kind: str) -> str:
    """'± stderr' (or ± half the CI width when only the interval is known), in the value's units."""
    err = row.get("stderr")
    if not finite(err) and finite(row.get("ci_low")) and finite(row.get("ci_high")):
        err = (float(row["ci_high"]) - float(row["ci_low"])) / 2
    if not finite(err):
        return ""
    scale, digits = (100.0, "f2") if kind == "pct" else (1.0, kind if kind.startswith("f") else "g2")
    e = float(err) * scale
    return f"± {e:.{int(digits[1:])}f}" if digits.startswith("f") else f"± {e:.2g}"


def _cell_title(row: Mapping[str, Any]) -> str:
    bits = []
    if finite(row.get("ci_low")) and finite(row.get("ci_high")):
        bits.append(f"95% CI [{float(row['ci_low']):.6g}, {float(row['ci_high']):.6g}]")
    if finite(row.get("stderr")):
        bits.append(f"stderr {float(row['stderr']):.3g}")
    if finite(row.get("n")):
        bits.append(f"n={int(float(row['n']))}")
    return "; ".join(bits)


def _slug(name: str) -> str:
    """A file-name-safe, collision-free form of a user-given name (hash suffix when sanitising changed it)."""
    clean = safe_name(name)
    if clean == name:
        return clean
    return f"{clean[:80]}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"


# ----------------------------------------------------------------------------------------------- tables
def _grid_columns(units: Sequence[Unit]) -> list[tuple[str, str]]:
    """(grid key, column title) for every grid axis of these units, in first-seen order; titles are the last
    dotted component (`quantizer.groups` → `groups`) unless two axes share it."""
    keys = list(dict.fromkeys(k for u in units for k in u.grid))
    leaves = [k.split(".")[-1] for k in keys]
    return [(k, leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)]


def _grid_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def summary_table(stats: GroupStats) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """One row per unit (subject × grid point) over its seeds, columns = grid axes, seeds and SUMMARY_COLUMNS.
    Cells show the mean over seeds ± its standard error and the sd across seeds; ★/☆ come from GroupStats.marks
    (significance, Holm-corrected). Unavailable and not-comparable values carry a footnote with the reason; rows of
    diverged runs are greyed and never marked."""
    footnotes: dict[str, int] = {}
    units = stats.units
    # a column no run measured at all (not even as n/a) is noise; unavailable metrics keep their column
    columns = [c for c in SUMMARY_COLUMNS if any(c[0] in r.metrics for u in units for r in u.runs)]
    grid_cols = _grid_columns(units)
    rows = []
    for u in units:
        row = {"label": u.label, "grid": [_grid_text(u.grid[k]) if k in u.grid else "–" for k, _ in grid_cols],
               "seeds": _seeds_text(u), "seeds_title": _seeds_title(u), "diverged": u.divergence_note,
               "greyed": u.all_diverged, "cells": []}
        for key, _title, kind in columns:
            if u.all_diverged:
                row["cells"].append({"text": "–", "na": True, "title": u.divergence_note})
                continue
            marks, _ = stats.marks(key)
            row["cells"].append(_cell(stats.cell(u, key), kind, marks.get(u.key), footnotes))
        rows.append(row)
    notes = {}
    for key, title, _ in columns:
        _, note = stats.marks(key)
        if note:
            notes[title] = note
    table = {"columns": [t for _, t, _ in columns], "keys": [k for k, _, _ in columns],
             "grid_columns": [t for _, t in grid_cols], "rows": rows,
             "column_notes": [notes.get(t, "") for _, t, _ in columns]}
    return table, sorted(((n, reason) for reason, n in footnotes.items()))


def ranked_table(stats: GroupStats) -> dict[str, Any] | None:
    """The leaderboard of one group of loaded subjects: rows ordered by the mean of the ranking metric
    (report.leaderboard.rank_metric: rFID, else LPIPS, else PSNR), its 95 % interval shown, ★/☆ from
    GroupStats.marks (paired, Holm-corrected), the other summary columns as in the summary table."""
    from gsqbench.report import leaderboard as lb

    metric = lb.rank_metric(stats)
    if metric is None:
        return None
    key, title, kind = metric
    footnotes: dict[str, int] = {}
    columns = [c for c in SUMMARY_COLUMNS if c[0] != key and any(c[0] in r.metrics for u in stats.units for r in u.runs)]
    rows = []
    for pos, u in lb.ranked_units(stats, key):
        c = stats.cell(u, key) if u.runs else None
        marks, _ = stats.marks(key)
        e = c.estimate if c is not None else None
        interval = f"[{fmt_value(e.ci_low, kind)}, {fmt_value(e.ci_high, kind)}]" \
            if e is not None and finite(e.ci_low) and finite(e.ci_high) else "–"
        cells = []
        for ckey, _t, ckind in columns:
            cmarks, _ = stats.marks(ckey)
            cells.append(_cell(stats.cell(u, ckey) if u.runs else None, ckind, cmarks.get(u.key), footnotes))
        rows.append({"pos": pos if pos is not None else "–", "label": u.label,
                     "kind": ", ".join(sorted({lb.loaded_kind(r) for r in u.runs if lb.loaded_kind(r)})) or "–",
                     "rank": _cell(c, kind, marks.get(u.key), footnotes), "interval": interval, "cells": cells})
    return {"metric": title, "key": key, "note": stats.marks(key)[1], "columns": [t for _, t, _ in columns],
            "rows": rows, "footnotes": sorted(((n, reason) for reason, n in footnotes.items()))}


def leaderboard_context(groups: Sequence[Group], group_stats: Sequence[GroupStats]) -> dict[str, Any] | None:
    """The suite page's leaderboard: a ranked table per group of loaded subjects evaluated under the pinned protocol,
    and per loaded subject the published vs reproduced (own protocol) vs gsqbench-protocol table; None when the
    suite has no loaded subject."""
    from gsqbench.report import leaderboard as lb

    idx = lb.loaded_groups(groups)
    if not idx:
        return None
    published = lb.load_published()
    ranked = []
    for i in idx:
        if lb.group_mode(groups[i]) != lb.PINNED:
            continue
        table = ranked_table(group_stats[i])
        if table is not None:
            ranked.append({"group": i, "card_hash": groups[i].card_hash, **table})
    return {"ranked": ranked, "label": published.label, "mark_words": MARK_WORDS,
            "tables": lb.comparison_tables(groups, group_stats, published, fmt_value)}


def _seeds_text(u: Unit) -> str:
    return str(len(u.runs)) + (f" (+{len(u.diverged)} diverged)" if u.diverged and u.runs else "")


def _seeds_title(u: Unit) -> str:
    done = ", ".join(r.seed for r in sorted(u.runs, key=lambda r: r.seed)) or "none"
    return f"seeds evaluated: {done}" + (f"; {u.divergence_note}" if u.diverged else "")


def _cell(c: Cell | None, kind: str, mark: str | None, footnotes: dict[str, int]) -> dict[str, Any]:
    if c is None:
        return {"text": "–", "na": True, "title": "not measured in this run"}
    if c.estimate is None:
        reason = c.unavailable or "value is NaN"
        n = footnotes.setdefault(f"n/a: {reason}", len(footnotes) + 1)
        return {"text": "n/a", "na": True, "title": reason, "fn": n}
    e = c.estimate
    ranked = c.direction in ("lower", "higher")  # counts and sizes (tokens, params, bits) carry no ± or sd
    out = {"text": fmt_value(e.mean, kind), "pm": fmt_interval({"stderr": e.stderr}, kind) if ranked else "",
           "sd": _fmt_sd(e.seed_std, kind) if e.n_seeds > 1 and ranked else "",
           "title": _estimate_title(e) if ranked else "", "mark": mark, "best": mark == "best", "tied": mark == "tied"}
    if c.not_comparable:
        out["fn"] = footnotes.setdefault(f"not comparable: {c.not_comparable}", len(footnotes) + 1)
        out["title"] = f"not comparable: {c.not_comparable}; " + out["title"]
        out["mark"] = out["best"] = out["tied"] = None
    return out


def _fmt_sd(sd: float, kind: str) -> str:
    if not finite(sd):
        return ""
    scale = 100.0 if kind == "pct" else 1.0
    return f"sd {sd * scale:.2f}" if kind in ("pct",) or kind.startswith("f") else f"sd {sd * scale:.2g}"


def _estimate_title(e: Any) -> str:
    bits = []
    if finite(e.ci_low) and finite(e.ci_high):
        bits.append(f"95% interval [{e.ci_low:.6g}, {e.ci_high:.6g}]")
    bits.append(e.method)
    if finite(e.stderr):
        bits.append(f"standard error {e.stderr:.3g}")
    if e.n_seeds > 1:
        bits.append(f"sd across seeds {e.seed_std:.3g} (n = {e.n_seeds} seeds)")
    if e.n_images:
        bits.append(f"{e.n_images} images")
    return "; ".join(bits)


def per_seed_table(stats: GroupStats, keys: Sequence[str]) -> dict[str, Any]:
    """Every run (seed) of the group on its own row with its within-run values (no marks): the detail behind the
    aggregated rows. Diverged runs are greyed and say where they diverged."""
    columns = [c for c in SUMMARY_COLUMNS if c[0] in keys]
    grid_cols = _grid_columns(stats.units)
    rows = []
    for u in stats.units:
        for r in u.all_runs:
            row = {"label": u.label, "run": r.run_id, "seed": r.seed,
                   "grid": [_grid_text(u.grid[k]) if k in u.grid else "–" for k, _ in grid_cols], "cells": [],
                   "diverged": divergence_text(r) if is_diverged(r) else ""}
            for key, _title, kind in columns:
                m = r.metrics.get(key)
                if row["diverged"] or m is None:
                    row["cells"].append({"text": "–", "na": True})
                elif m.get("unavailable") or not finite(m.get("value")):
                    row["cells"].append({"text": "n/a", "na": True, "title": str(m.get("unavailable") or "NaN")})
                else:
                    row["cells"].append({"text": fmt_value(m["value"], kind), "pm": fmt_interval(m, kind),
                                         "title": _cell_title(m)})
            rows.append(row)
    return {"columns": [t for _, t, _ in columns], "grid_columns": [t for _, t in grid_cols], "rows": rows}


def all_metrics_table(stats: GroupStats) -> dict[str, Any]:
    """Every metric (rows) × unit (columns), aggregated over seeds like the summary, for the collapsible listing."""
    units = [u for u in stats.units if u.runs]
    rows = []
    for name in stats.metrics():
        cells = []
        for u in units:
            c = stats.cell(u, name)
            if c is None:
                cells.append({"text": "–", "na": True})
            elif c.estimate is None:
                cells.append({"text": "n/a", "na": True, "title": c.unavailable})
            else:
                e = c.estimate
                cells.append({"text": fmt_value(e.mean, "g4"), "pm": fmt_interval({"stderr": e.stderr}, "g"),
                              "sd": _fmt_sd(e.seed_std, "g") if e.n_seeds > 1 else "",
                              "title": ((f"not comparable: {c.not_comparable}; " if c.not_comparable else "")
                                        + _estimate_title(e))})
        rows.append({"metric": name, "direction": stats.direction(name), "cells": cells})
    labels = [u.label + (f" · {u.grid_label}" if u.grid else "") for u in units]
    return {"runs": labels, "rows": rows}


def export_summary_csv(out: Path, suite: str, groups: Sequence[Group], group_stats: Sequence[GroupStats]) -> Path:
    """<suite page>.csv: the aggregated long table (stats.SUMMARY_FIELDS) of every group of one suite."""
    rows = []
    for g, st in zip(groups, group_stats):
        rows += summary_rows(suite, g.fairness_hash, g.card_hash, st)
    return atomic_write_text(safe_child(out, suite_page_name(suite).removesuffix(".html") + "-summary.csv"),
                             rows_to_csv(rows_for_csv(rows), SUMMARY_FIELDS))


#: effective values that are machine-specific paths: shown by their SHA-256 instead
_EFFECTIVE_HIDDEN = ("perceptual_trunk", "backbone_path")


def _under(key: str, prefixes: Mapping[str, str]) -> str | None:
    """The reason of the first `prefixes` entry that is `key` or a parent of it."""
    return next((why for p, why in prefixes.items() if key == p or key.startswith(p + ".")), None)


def effective_values(run: Run) -> dict[str, str]:
    """A run's spec as it ran, flattened: shared fields (marked when a fallback changed them, when they had no
    effect in this run, or when they cannot change a result and are not hashed), the effective values, and the
    subject's quantizer settings with its defaults filled in (run.json `effective`; older runs: their spec)."""
    spec, eff = run.info.get("spec") or {}, run.info.get("effective") or {}
    no_effect, result_free = eff.get("no_effect") or {}, eff.get("result_free") or {}
    fallback = {}
    for note in eff.get("fallbacks") or []:
        key, _, rest = str(note).partition(" ")
        fallback[key] = rest
    flat: dict[str, str] = {}
    for key, value in flatten(spec.get("shared") or {}, "shared").items():
        dotted = key[len("shared."):]
        if dotted in fallback:
            flat[key] = fallback[dotted]
        elif (why := _under(dotted, no_effect)) is not None:
            flat[key] = f"{value} (no effect: {why})"
        elif dotted in result_free:
            flat[key] = f"{value} (cannot change a result; not hashed)"
        else:
            flat[key] = value
    values = eff.get("values") or {}
    for key, value in values.items():
        if key not in _EFFECTIVE_HIDDEN:
            flat[f"effective.{key}"] = value if isinstance(value, str) else json.dumps(value)
    for note in eff.get("fallbacks") or []:  # fallbacks of parts with no spec field of their own (DINO backbone)
        if note.split(" ", 1)[0] not in {k[len("shared."):] for k in flat if k.startswith("shared.")}:
            flat["effective.backbone"] = f"{values.get('backbone')} ({note})"
    flat.update(flatten(eff.get("quantizer") or spec.get("quantizer") or {}, "quantizer"))
    flat.update(flatten(run.info.get("grid") or {}, "grid"))
    flat["seed"] = json.dumps(run.info.get("seed"))
    return flat


def spec_tables(runs: Sequence[Run]) -> dict[str, Any]:
    """Effective hyperparameters: those equal in every run once, the keys that differ as a run × key table (defaults
    included, so two subjects that are the same model show the same row), the runs' fallbacks, and runs whose
    exported checkpoints are byte-identical (same model.safetensors SHA-256)."""
    flat = [effective_values(r) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    shared, differing = [], []
    for k in keys:
        values = [f.get(k) for f in flat]
        (shared.append((k, values[0])) if len(set(values)) == 1 and values[0] is not None else differing.append(k))
    diff_rows = [{"label": r.label, "vals": [f.get(k, _absent(k)) for k in differing]} for r, f in zip(runs, flat)]
    fallbacks = [(r.label, note) for r in runs for note in (r.info.get("effective") or {}).get("fallbacks") or []]
    by_sha: dict[str, list[str]] = {}
    for r in runs:
        sha = r.info.get("checkpoint_sha256")
        if sha:
            by_sha.setdefault(str(sha), []).append(r.label)
    identical = [{"sha256": sha, "labels": labels} for sha, labels in by_sha.items() if len(labels) > 1]
    return {"shared": shared, "diff_keys": differing, "diff_rows": diff_rows, "fallbacks": fallbacks,
            "identical": identical}


def _absent(key: str) -> str:
    return "(no such parameter)" if key.startswith("quantizer.") else "(not set in this run)"


def card_table(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """The protocol card of the group, flattened: (field, value, whether the card hash covers it); fields that
    vary between runs say so (only run-specific ones may: hashed fields are equal within a group)."""
    from gsqbench.card import RUN_SPECIFIC

    cards = [flatten(r.info.get("card") or {}) for r in runs]
    keys = sorted(set().union(*cards)) if cards else []
    out = []
    for k in keys:
        values = {c.get(k, "—") for c in cards}
        hashed = "no (run-specific)" if k == "card_hash" or _under(k, dict.fromkeys(RUN_SPECIFIC, "")) is not None \
            else "yes"
        out.append((k, values.pop() if len(values) == 1 else "varies per run: " + ", ".join(sorted(values)), hashed))
    return out


def paper_tables() -> dict[str, Any]:
    def f(v: Any, kind: str = "g4") -> str:
        return "" if v is None else fmt_value(v, kind)

    group_rows = [[m, gd, f(rfid, "f2"), f(is_, "int"), f(lp, "g4"), f(ps, "f2"), f(ss, "f2"), f(us, "pct"),
                   f(ppl, "int"), note] for m, gd, rfid, is_, lp, ps, ss, us, ppl, note in paper.GROUP_DECOMPOSITION]
    sota_rows = [[m, str(fx), tok, d, v, f(r, "g4"), note] for m, fx, tok, d, v, r, note in paper.SOTA]
    dim_vocab = [[f"{v:,}"] + [f(x) for x in vals] for v, vals in paper.DIM_VOCAB_RFID.items()]
    spatial = [[f"F{fx}"] + [f(x) for x in vals] for fx, vals in paper.SPATIAL_RFID.items()]
    return {"label": paper.LABEL, "source": paper.SOURCE, "group_columns": paper.GROUP_COLUMNS,
            "group_rows": group_rows, "sota_columns": paper.SOTA_COLUMNS, "sota_rows": sota_rows,
            "sota_note": paper.SOTA_NOTE, "dim_vocab_header": ["V \\ D", *map(str, paper.DIM_VOCAB_D)],
            "dim_vocab": dim_vocab, "spatial_header": ["f \\ D", *map(str, paper.SPATIAL_D)], "spatial": spatial}


# ----------------------------------------------------------------------------------------------- figures
class Assets:
    """Writes files under out_dir/assets/<suite>/g<i>/ and hands back paths relative to the suite page."""

    def __init__(self, out_dir: Path, suite_slug: str, group_index: int):
        self.out_dir = out_dir
        self.parts = ("assets", suite_slug, f"g{group_index}")

    def path(self, *names: str) -> Path:
        return safe_child(self.out_dir, *self.parts, *names)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out_dir.resolve()).as_posix()


def _plotted_units(stats: GroupStats) -> tuple[list[Unit], list[str]]:
    """Units drawn in comparison plots (no diverged seed), and a note naming the ones left out."""
    keep = [u for u in stats.units if u.runs and not u.diverged]
    left = [u.label for u in stats.units if u.diverged]
    return keep, ([f"diverged runs are not plotted: {', '.join(left)}"] if left else [])


def _point(stats: GroupStats, unit: Unit, key: str) -> tuple[float | None, tuple[float, float] | None]:
    """(mean, (minus, plus) error bar to the 95 % interval) for a plot; None for values that are unavailable or not
    comparable (never drawn as a comparison)."""
    c = stats.cell(unit, key)
    if c is None or c.estimate is None or c.not_comparable:
        return None, None
    e = c.estimate
    err = (e.mean - e.ci_low, e.ci_high - e.mean) if finite(e.ci_low) and finite(e.ci_high) else None
    return e.mean, err


def group_plots(group: Group, assets: Assets, stats: GroupStats) -> tuple[list[dict[str, str]], list[str]]:
    figures, notes = [], []
    units, skipped = _plotted_units(stats)
    notes += skipped
    runs = [r for u in units for r in u.runs]
    logs = {r.label: df for r in runs if (df := read_train_log(r.run_dir)) is not None and len(df)}
    if logs and (p := plots.training_curves(logs, assets.path("train_curves.png"))):
        figures.append({"src": assets.rel(p), "caption": "Training curves (train_log.csv), one line per run"})
    elif not logs:
        notes.append("no train_log.csv in these runs: training curves not drawn")
    points = []
    for u in units:
        point = {"label": u.label + (f" · {u.grid_label}" if u.grid else ""),
                 "bits": _point(stats, u, "bits_per_token")[0]}
        for k, _ in RD_METRICS:
            point[k], point[f"{k}:err"] = _point(stats, u, k)
        points.append(point)
    p, rd_notes = plots.rate_distortion(points, RD_METRICS, assets.path("rate_distortion.png"))
    notes += rd_notes
    if p:
        figures.append({"src": assets.rel(p), "caption": "Rate–distortion: bits/token vs quality; mean over seeds, "
                        "error bars to the 95 % interval of the mean (none where there is no interval)"})
    counts = {r.label: c for r in runs if (c := read_code_counts(r.run_dir)) is not None}
    if counts:
        p = plots.code_usage(counts, assets.path("code_usage.png"))
        figures.append({"src": assets.rel(p),
                        "caption": "Code usage per group and rank–frequency (codes.npz), per run"})
    missing = [r.label for r in runs if r.label not in counts]
    if missing:
        notes.append(f"no codes.npz (V too large to store, or not evaluated) for: {', '.join(missing)}")
    return figures, notes


def scaling_plots(group: Group, assets: Assets, stats: GroupStats) -> tuple[list[dict[str, str]], list[str]]:
    """Paper-style scaling plots when the units' grid varies along (dim × vocabulary) or (compression × groups):
    one point per grid point at the mean over seeds, with error bars to the 95 % interval of that mean."""
    units, _ = _plotted_units(stats)
    axes = [grid_axes(u.runs[0]) for u in units]
    varies = {a for a in ("dim", "codebook_size", "groups", "compression")
              if len({ax.get(a) for ax in axes if a in ax}) > 1 and all(a in ax for ax in axes)}
    if not varies:
        return [], []
    metric = next(((k, t) for k, t in SCALING_METRICS if all(_point(stats, u, k)[0] is not None for u in units)), None)
    if metric is None:
        return [], ["scaling plots skipped: no quality metric is available (and comparable) for every grid point"]
    key, title = metric
    points = []
    for u, ax in zip(units, axes):
        y, err = _point(stats, u, key)
        points.append({**ax, "y": y, "err": err})
    figures = []
    # (x axis, series axis, file, paper figure): x falls back to the series axis when only that one varies
    for x_key, s_key, filename, paper in (
        ("codebook_size", "dim", "scaling_dim_vocab.png", "latent dim × vocabulary"),
        ("groups", "compression", "scaling_compression_groups.png", "spatial compression × groups"),
    ):
        if x_key not in varies and s_key not in varies:
            continue
        x, s = (x_key, s_key) if x_key in varies else (s_key, None)
        s = s if s in varies else None
        p = plots.scaling(points, x, s, title, assets.path(filename), log_x=True)
        figures.append({"src": assets.rel(p), "caption": f"{title} vs {x}" + (f", one line per {s}" if s else "")
                        + f": mean over seeds, error bars to the 95 % interval of the mean (paper §7.9: {paper})"})
    return figures, []


# ----------------------------------------------------------------------------------------------- images
def recon_grid(group: Group, assets: Assets, k: int) -> dict[str, Any]:
    """The same first-k eval image ids for every run: real, and per run recon, centre zoom, error heatmap."""
    with_samples = [r for r in group.runs if sample_ids(r.run_dir)]
    if not with_samples:
        return {"ids": [], "note": "no samples/real + samples/recon images in these runs"}
    common = sorted(set.intersection(*(set(sample_ids(r.run_dir)) for r in with_samples)))[:k]
    if not common:
        return {"ids": [], "note": "runs share no sample image ids; reconstruction grid not drawn"}
    ref = with_samples[0].run_dir / "samples" / "real"
    real = []
    for i, image_id in enumerate(common):
        arr = plots.load_rgb(ref / f"{image_id}.png")
        real.append({"src": assets.rel(plots.save_png(arr, assets.path(f"real-{i}-{_slug(image_id)}.png"))),
                     "zoom": assets.rel(plots.save_png(plots.center_zoom(arr),
                                                       assets.path(f"real-{i}-{_slug(image_id)}-zoom.png")))})
    rows = []
    for r in with_samples:
        cells = []
        for i, image_id in enumerate(common):
            cells.append(_recon_cell(r, image_id, f"{_slug(r.run_id)}-{i}-{_slug(image_id)}", assets))
        rows.append({"label": r.label, "cells": cells})
    skipped = [r.label for r in group.runs if r not in with_samples]
    return {"ids": common, "real": real, "rows": rows,
            "note": f"no samples for: {', '.join(skipped)}" if skipped else ""}


def _recon_cell(run: Run, image_id: str, stem: str, assets: Assets) -> dict[str, str]:
    real = plots.load_rgb(run.run_dir / "samples" / "real" / f"{image_id}.png")
    recon = plots.load_rgb(run.run_dir / "samples" / "recon" / f"{image_id}.png")
    return {
        "recon": assets.rel(plots.save_png(recon, assets.path(f"{stem}-recon.png"))),
        "zoom": assets.rel(plots.save_png(plots.center_zoom(recon), assets.path(f"{stem}-zoom.png"))),
        "err": assets.rel(plots.save_png(plots.error_heatmap(real, recon), assets.path(f"{stem}-err.png"))),
    }


def worst_images(group: Group, assets: Assets, k: int) -> list[dict[str, Any]]:
    """Per run, the k worst images by per-image LPIPS (alex), or by PSNR when LPIPS is unavailable."""
    out: list[dict[str, Any]] = []
    if k <= 0:
        return out
    for r in group.runs:
        df = read_per_image(r.run_dir)
        if df is None or "image_id" not in df.columns:
            continue
        key, ascending = ("lpips@alex", False) if "lpips@alex" in df.columns and df["lpips@alex"].notna().any() \
            else ("psnr", True) if "psnr" in df.columns else (None, True)
        if key is None:
            continue
        worst = df[df[key].notna()].sort_values(key, ascending=ascending, kind="stable").head(k)
        have = set(sample_ids(r.run_dir))
        items = []
        for image_id, value in zip(worst["image_id"].astype(str), worst[key]):
            item = {"id": image_id, "value": f"{float(value):.4g}"}
            # evaluation names sample files safe_name(image_id).png; ids that needed no sanitising match directly
            stem = image_id if image_id in have else safe_name(image_id)
            if stem in have:
                item.update(_recon_cell(r, stem, f"{_slug(r.run_id)}-worst-{_slug(image_id)}", assets))
            items.append(item)
        out.append({"label": r.label, "metric": key, "items": items})
    return out


# ----------------------------------------------------------------------------------------------- pages
def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gsqbench.report", "templates"),
        autoescape=True,  # every user-given string (suite, subject, image id, spec values) is escaped
        trim_blocks=True, lstrip_blocks=True,
    )
    return env


def _group_context(group: Group, stats: GroupStats, index: int, out_dir: Path, suite_slug: str, k: int,
                   worst_k: int, with_plots: bool) -> dict:
    assets = Assets(out_dir, suite_slug, index)
    summary, footnotes = summary_table(stats)
    figures, notes, scaling_figs, scaling_notes = [], ["plots skipped (--no-plots)"], [], []
    if with_plots:
        figures, notes = group_plots(group, assets, stats)
        scaling_figs, scaling_notes = scaling_plots(group, assets, stats)
    id_note = stats.image_id_note()
    shown = _first_seeds(group, stats)
    recon = recon_grid(shown, assets, k)
    if len(shown.runs) < len([r for r in group.runs if not is_diverged(r)]):
        recon["note"] = "; ".join(filter(None, [recon.get("note"), "one run per subject shown (its first seed); the "
                                                "other seeds' samples are in their run folders"]))
    return {
        "index": index, "fairness_hash": group.fairness_hash, "card_hash": group.card_hash,
        "n_runs": len(group.runs), "summary": summary, "footnotes": footnotes,
        "per_seed": per_seed_table(stats, summary["keys"]), "n_units": len(stats.units),
        "stats_notes": [id_note] if id_note else [],
        "all_metrics": all_metrics_table(stats), "card": card_table(group.runs),
        "spec": spec_tables(group.runs), "figures": figures, "notes": notes + scaling_notes,
        "scaling": scaling_figs, "recon": recon, "worst": worst_images(shown, assets, worst_k),
        "provenance": [(r.label, _provenance_line(r.info.get("provenance") or {})) for r in group.runs],
    }


def _first_seeds(group: Group, stats: GroupStats) -> Group:
    """The group with one finished run per row (its first seed): image panels per seed would repeat each subject."""
    return Group(group.suite, group.fairness_hash, group.card_hash, [u.runs[0] for u in stats.units if u.runs])


def _provenance_line(prov: Mapping[str, Any]) -> str:
    versions = prov.get("versions") or {}
    sha = str(prov.get("git_sha") or "?")[:10] + (" (dirty)" if prov.get("git_dirty") else "")
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in ("torch", "torch-fidelity", "lpips"))
    return (f"git {sha}; {prov.get('device', '?')}; {prov.get('precision', '?')}; world {prov.get('world_size', '?')};"
            f" {prov.get('date', '?')}" + (f"; {libs}" if libs else ""))


def suite_page_name(suite: str) -> str:
    return f"suite-{_slug(suite)}.html"


def render_report(results_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  title: str = "gsqbench report", k_samples: int = 4, worst_k: int = 4,
                  with_plots: bool = True) -> Path:
    """Render index.html + one page per suite into `out_dir`; returns the index path. `with_plots=False` skips the
    matplotlib figures (tables and image panels only), for a quick look."""
    if k_samples < 1 or worst_k < 0:
        raise UserError(f"report: samples must be >= 1 and worst-k >= 0, got {k_samples}, {worst_k}")
    if isinstance(results_dirs, (str, os.PathLike)):  # one directory given on its own
        results_dirs = [results_dirs]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"report output '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    runs, unlisted = collect_runs(*results_dirs)
    suites = group_runs(runs)
    env = _env()
    paper_ctx = paper_tables()
    index_entries = []
    for suite, groups in suites.items():
        page = suite_page_name(suite)
        group_stats = [GroupStats(g.runs) for g in groups]
        csv_path = export_summary_csv(out, suite, groups, group_stats)
        ctx = {"title": title, "suite": suite, "reason": separation_reason(groups), "paper": paper_ctx,
               "leaderboard": leaderboard_context(groups, group_stats),
               "unlisted": unlisted_rows(unlisted, out, suite),
               "summary_csv": csv_path.name,
               "groups": [_group_context(g, st, i, out, _slug(suite), k_samples, worst_k, with_plots)
                          for i, (g, st) in enumerate(zip(groups, group_stats))]}
        atomic_write_text(safe_child(out, page), env.get_template("suite.html.j2").render(**ctx))
        index_entries.append({"suite": suite, "page": page, "n_runs": sum(len(g.runs) for g in groups),
                              "subjects": sorted({r.subject for g in groups for r in g.runs}),
                              "n_groups": len(groups), "reason": ctx["reason"]})
    _write_static(out)
    regress_summary = _read_regress_summary(out)
    index = env.get_template("index.html.j2").render(
        title=title, suites=index_entries, regress=regress_summary, compare=_read_compare_summary(out),
        sources=[str(Path(d)) for d in results_dirs], unlisted=unlisted_rows(unlisted, out))
    path = atomic_write_text(safe_child(out, "index.html"), index)
    log.info("report written to %s (%d suites, %d runs)", path, len(suites), len(runs))
    for u in unlisted:
        if u.state == "unreadable":
            log.warning("report: run %s/%s is shown as unreadable: %s", u.suite, u.run_id, u.detail)
    return path


def unlisted_rows(unlisted: Sequence[Unlisted], out: Path, suite: str | None = None) -> list[dict[str, str]]:
    """Rows of the "not in the comparison tables" block (templates/unlisted.html.j2): every run folder that was
    found but is not evaluated or cannot be read, so that none is left out silently."""
    return [{"suite": u.suite, "run": u.run_id, "state": u.state, "detail": u.detail, "folder": str(u.run_dir)}
            for u in unlisted if suite is None or u.suite == suite]


def _write_static(out: Path) -> None:
    css = resources.files("gsqbench.report").joinpath("templates", "style.css").read_bytes()
    atomic_write_bytes(safe_child(out, "style.css"), css)


def _read_regress_summary(out: Path) -> dict[str, Any] | None:
    """The regress.json that `gsqbench regress -o` left in this folder, if any, for the index link."""
    path = out / "regress.json"
    if not (out / "regress.html").is_file() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    from gsqbench.regress import STATUSES

    counts = data.get("counts") or {}
    return {"page": "regress.html", "counts": {s: counts.get(s, 0) for s in STATUSES},
            "baseline": data.get("baseline", "")}


def render_regress(comparison: "pd.DataFrame", out_dir: str | os.PathLike, *, baseline: str,
                   title: str = "gsqbench report") -> Path:
    """regress.html (+ regress.json with the same rows) in `out_dir`; the report index links it."""
    from gsqbench.regress import summary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    rows = comparison.to_dict("records")
    counts = summary(comparison)
    atomic_write_json(safe_child(out, "regress.json"), {
        "baseline": baseline, "counts": counts,
        "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows],
    })
    for r in rows:
        for c in ("baseline", "current", "delta"):
            r[c] = fmt_value(r[c], "g7") if finite(r[c]) else ""
    html = _env().get_template("regress.html.j2").render(title=title, baseline=baseline, counts=counts, rows=rows)
    _write_static(out)
    return atomic_write_text(safe_child(out, "regress.html"), html)


def _read_compare_summary(out: Path) -> dict[str, Any] | None:
    """The compare.json that `gsqbench compare -o` left in this folder, if any: verdict counts for the index."""
    path = out / "compare.json"
    if not (out / "compare.html").is_file() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    counts: dict[str, int] = {}
    for r in data.get("rows") or []:
        v = str(r.get("verdict", ""))
        counts[v] = counts.get(v, 0) + 1
    return {"page": "compare.html", "reference": str(data.get("reference", "")), "suite": str(data.get("suite", "")),
            "counts": counts}


def render_compare(comparison: "Comparison", out_dir: str | os.PathLike, *, title: str = "gsqbench report") -> Path:
    """compare.html in `out_dir` (beside compare.csv/.json written by gsqbench.compare.write_outputs): every subject
    × metric against the reference, with the 95 % interval and verdict; the report index links it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    rows = []
    for r in comparison.rows:
        rows.append({"subject": r.subject, "grid": r.grid, "metric": r.metric, "direction": r.direction,
                     "reference": fmt_value(r.reference_mean, "g6"), "value": fmt_value(r.mean, "g6"),
                     "seeds": f"{r.seeds} vs {r.reference_seeds}",
                     "difference": f"{r.difference:+.4g}" if finite(r.difference) else "",
                     "interval": (f"[{r.ci_low:.4g}, {r.ci_high:.4g}]" if finite(r.ci_low) and finite(r.ci_high)
                                  else "—"),
                     "verdict": r.verdict, "css": r.verdict.split()[0] if r.verdict else "", "method": r.method,
                     "note": r.note})
    html = _env().get_template("compare.html.j2").render(
        title=title, c=comparison, rows=rows, has_grid=any(r["grid"] for r in rows))
    _write_static(out)
    return atomic_write_text(safe_child(out, "compare.html"), html)
