"""Regression checks: compare results with a committed baseline CSV, metric by metric, direction-aware: a CI gate.

Each (suite, run, metric) row gets one status:
  ok             within tolerance (or an informational metric such as images/s, which never regresses)
  regressed      worse than the baseline by more than the tolerance, in the metric's direction; also every baseline
                 row of a run that diverged (run.json status `diverged`)
  improved       better by more than the tolerance
  new            in the results but not in the baseline (informational)
  missing        in the baseline but not in the results (or now unavailable)
  incomparable   fairness hash, card hash (protocol) or device differ, so the numbers are not comparable
  not_comparable the value itself is not comparable (metrics.csv `not_comparable`, e.g. too few tokens for V):
                 shown with its reason, never gated

The gate (exit_code) fails on regressed, missing and incomparable rows; `allow=("missing", "incomparable")` accepts
those two. With `noise_aware`, a change counts only when it exceeds both the tolerance and the 95 % band of the two
rows' standard errors combined (1.96·√(se_b² + se_c²)); rows without a standard error fall back to the tolerance.

Tolerances: built-in defaults < the suite's `regress:` block (stored in run.json's spec; see suite_tolerances) <
`--tolerance metric=value` on the command line. A plain number is an absolute tolerance, "2%" a relative one.
A key may name a metric exactly (`lpips@alex`), its base before '@' (`lpips`), or its family before '_' (`usage`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from gsqbench.errors import UserError
from gsqbench.io import atomic_write_text
from gsqbench.results import (
    METRIC_COLUMNS, fmt_float, normalize_metrics_frame, read_run_info, rows_to_csv,
)
from gsqbench.stats import MACHINE_DEPENDENT

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

STATUSES = ("ok", "regressed", "improved", "new", "missing", "incomparable", "not_comparable")
#: statuses that fail the gate, and those of them a user may accept with --allow
FAILING = ("regressed", "missing", "incomparable")
ALLOWABLE = ("missing", "incomparable")
#: z of a two-sided 95 % interval: the noise band of --noise-aware is Z95·√(se_b² + se_c²)
Z95 = 1.959963984540054
_ID_COLUMNS = ("suite", "run", "subject", "seed")
#: row fields whose mismatch makes two rows incomparable, with the words used to say so
_COMPAT_FIELDS = (("fairness_hash", "fairness hash"), ("card_hash", "card hash (protocol)"), ("device", "device"))


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move before it counts: `value` absolute, or a fraction of the baseline if relative."""

    value: float
    relative: bool = False

    def allowed(self, baseline: float) -> float:
        return abs(baseline) * self.value if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def _abs(v: float) -> Tolerance:
    return Tolerance(v)


def _rel(v: float) -> Tolerance:
    return Tolerance(v, relative=True)


#: defaults, looked up by exact key, then base name before '@', then family before '_'
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "psnr": _abs(0.05), "ssim": _abs(0.002), "lpips": _abs(0.002), "rfid": _rel(0.02), "is": _rel(0.02),
    "usage": _abs(0.01), "ppl": _rel(0.02), "entropy_bits": _abs(0.01), "entropy_norm": _abs(0.002),
    "dead_codes": _rel(0.02), "code_agreement": _abs(0.01),
}
#: for a metric with a direction but no default: 1 % of the baseline
FALLBACK_TOLERANCE = _rel(0.01)
#: timing/cost/shape metrics: reported, never a regression (they depend on the machine or are fixed by the spec)
INFORMATIONAL = MACHINE_DEPENDENT | frozenset({
    "tokens_counted", "params", "params_quantizer", "bits_per_token", "bits_per_image", "compression_ratio",
})


def parse_tolerance(value: Any, field: str) -> Tolerance:
    """`0.05` or "0.05" → absolute; "2%" → relative 0.02. Negative or non-numeric → UserError naming `field`."""
    text = str(value).strip()
    relative = text.endswith("%")
    try:
        number = float(text[:-1] if relative else text)
    except ValueError:
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise UserError(f"{field}: tolerance {value!r} is invalid; give a number >= 0 (absolute) or 'N%' (relative)")
    return Tolerance(number / 100 if relative else number, relative)


def parse_cli_tolerances(items: Iterable[str]) -> dict[str, Tolerance]:
    """`["psnr=0.1", "rfid@inception=3%"]` → {metric: Tolerance}."""
    out: dict[str, Tolerance] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--tolerance {item!r}: expected METRIC=VALUE, e.g. psnr=0.1 or rfid@inception=3%")
        out[name.strip()] = parse_tolerance(value, f"--tolerance {name.strip()}")
    return out


def suite_tolerances(run_info: Mapping[str, Any], source: str) -> dict[str, Tolerance]:
    """Tolerances a suite stored with its runs. Accepted places (first found wins): `spec["regress"]["tolerances"]`,
    `spec["regress"]` as a flat metric -> tolerance mapping (config.Suite.regress), and the same two forms under a
    top-level `regress` key of run.json. Absent → {}."""
    spec = run_info.get("spec") or {}
    for where, block in (("spec.regress", spec.get("regress") if isinstance(spec, Mapping) else None),
                         ("regress", run_info.get("regress"))):
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise UserError(f"{source}: {where} must be a mapping, got {type(block).__name__}")
        if "tolerances" in block:
            where, block = f"{where}.tolerances", block["tolerances"] or {}
            if not isinstance(block, Mapping):
                raise UserError(f"{source}: {where} must be a mapping metric -> tolerance")
        if block:
            return {str(k): parse_tolerance(v, f"{source}: {where}.{k}") for k, v in block.items()}
    return {}


def _candidates(metric: str) -> list[str]:
    base = metric.split("@")[0]
    return list(dict.fromkeys([metric, base, base.split("_")[0]]))


def tolerance_for(metric: str, *layers: Mapping[str, Tolerance]) -> Tolerance:
    """The first match in `layers` (highest priority first), then the defaults, then the fallback."""
    for layer in (*layers, DEFAULT_TOLERANCES):
        for key in _candidates(metric):
            if key in layer:
                return layer[key]
    return FALLBACK_TOLERANCE


# ----------------------------------------------------------------------------------------------- baseline
def read_baseline(path: str | os.PathLike) -> "pd.DataFrame":
    """A baseline CSV in the long format (a subset of columns is fine: metric, value and run or subject)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline '{path}' does not exist; run with --update to create it from these results")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"baseline '{path}': not a readable CSV ({exc})") from None
    needed = [c for c in ("metric", "value") if c not in raw.columns]
    if needed or not ({"run", "subject"} & set(raw.columns)):
        raise UserError(f"baseline '{path}': needs columns metric, value and run or subject; has "
                        f"{', '.join(raw.columns) or '(none)'}")
    return normalize_metrics_frame(raw, f"baseline '{path}'")


def key_columns(baseline: "pd.DataFrame") -> list[str]:
    """Identity columns the baseline actually fills (so a baseline without `seed` still matches)."""
    cols = [c for c in _ID_COLUMNS if c in baseline.columns and (baseline[c] != "").any()]
    if not ({"run", "subject"} & set(cols)):
        cols = ["suite", "run"]
    return cols + ["metric"]


def _check_unique(df: "pd.DataFrame", keys: list[str], what: str) -> None:
    dup = df[df.duplicated(keys, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        ident = ", ".join(f"{k}={first[k]}" for k in keys)
        raise UserError(f"{what}: row {ident} appears {int(dup.duplicated(keys, keep=False).sum())} times; "
                        "each run × metric must be unique (give one results directory per run id)")


# ----------------------------------------------------------------------------------------------- compare
def _incompatibility(cur: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    reasons = []
    for col, words in _COMPAT_FIELDS:
        a, b = str(base.get(col, "") or ""), str(cur.get(col, "") or "")
        if a and b and a != b:
            reasons.append(f"{words} differs: {a[:12]} (baseline) vs {b[:12]}")
    return "; ".join(reasons)


def _stderr(row: Mapping[str, Any], side: str) -> float:
    """A row's standard error: `stderr`, else half its 95 % interval / 1.96; NaN when it has neither."""
    se = _num(row.get(f"stderr_{side}"))
    if math.isfinite(se):
        return se
    lo, hi = _num(row.get(f"ci_low_{side}")), _num(row.get(f"ci_high_{side}"))
    return (hi - lo) / (2 * Z95) if math.isfinite(lo) and math.isfinite(hi) else math.nan


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _judge(metric: str, direction: str, base: float, cur: float, tol: Tolerance,
           noise: float | None = None) -> tuple[str, str]:
    """`noise` (noise-aware mode): the 95 % band of the difference; NaN when a row has no interval."""
    if metric in INFORMATIONAL or direction not in ("lower", "higher"):
        return "ok", "informational"
    allowed = tol.allowed(base)
    worse_by = (cur - base) if direction == "lower" else (base - cur)
    band = "" if noise is None else \
        f" and > noise {noise:.4g}" if math.isfinite(noise) else " (no interval: tolerance only)"
    limit = allowed if noise is None or not math.isfinite(noise) else max(allowed, noise)
    if worse_by > limit:
        return "regressed", f"worse by {worse_by:.4g} > {allowed:.4g}{band}"
    if -worse_by > limit:
        return "improved", f"better by {-worse_by:.4g} > {allowed:.4g}{band}"
    if noise is not None and math.isfinite(noise) and abs(worse_by) > allowed:
        return "ok", f"within noise: |change| {abs(worse_by):.4g} <= {noise:.4g}"
    return "ok", ""


def _status(row: Mapping[str, Any], tol: Tolerance, *, diverged: str = "",
            noise_aware: bool = False) -> tuple[str, str]:
    metric = row["metric"]
    base_av, cur_av = row.get("unavailable_b", ""), row.get("unavailable_c", "")
    if row["_merge"] == "left_only":
        return "new", ""
    if diverged:
        return "regressed", f"run {diverged}"  # starts with DIVERGED_REASON
    if row["_merge"] == "right_only":
        return "missing", "not in the results"
    cur = {c: row.get(f"{c}_c") for c, _ in _COMPAT_FIELDS}
    base = {c: row.get(f"{c}_b") for c, _ in _COMPAT_FIELDS}
    why = _incompatibility(cur, base)
    if why:
        return "incomparable", why
    not_comparable = row.get("not_comparable_c") or row.get("not_comparable_b")
    if not_comparable:
        side = "" if row.get("not_comparable_c") else " (in the baseline)"
        return "not_comparable", f"{not_comparable}{side}"
    base_val, cur_val = row["value_b"], row["value_c"]
    if cur_av or math.isnan(cur_val):
        return ("ok", "unavailable in both") if (base_av or math.isnan(base_val)) else \
            ("missing", f"now unavailable: {cur_av or 'NaN'}")
    if base_av or math.isnan(base_val):
        return "new", "unavailable in the baseline"
    direction = row["direction_b"] if row["direction_b"] != "none" else row["direction_c"]
    noise = Z95 * math.sqrt(_stderr(row, "b") ** 2 + _stderr(row, "c") ** 2) if noise_aware else None
    return _judge(metric, direction, base_val, cur_val, tol, noise)


def compare(current: "pd.DataFrame", baseline: "pd.DataFrame", *,
            cli_tolerances: Mapping[str, Tolerance] | None = None,
            suite_tols: Mapping[str, Mapping[str, Tolerance]] | None = None,
            diverged: Mapping[tuple[str, str], str] | None = None, noise_aware: bool = False) -> "pd.DataFrame":
    """One row per key in either frame: suite, run, subject, seed, metric, baseline, current, delta, tolerance,
    status, reason. `suite_tols` maps suite name → its spec tolerances; `diverged` maps (suite, run id) and
    (suite, subject/seed) of runs that diverged → "diverged at step N (term)"."""
    import pandas as pd

    keys = key_columns(baseline)
    if "suite" in keys:  # a baseline may hold several suites: check only the ones these results cover
        baseline = baseline[baseline["suite"].isin(set(current["suite"]))]
    _check_unique(current, keys, "results")
    _check_unique(baseline, keys, "baseline")
    cols = [c for c in METRIC_COLUMNS if c not in keys]
    merged = pd.merge(current[keys + cols], baseline[keys + cols], on=keys, how="outer",
                      suffixes=("_c", "_b"), indicator=True)
    out = []
    for row in merged.to_dict("records"):
        row = {k: ("" if (isinstance(v, float) and math.isnan(v) and not k.startswith(("value", "stderr", "ci_")))
                   else v) for k, v in row.items()}
        suite = row.get("suite") or row.get("suite_c") or row.get("suite_b") or ""
        tol = tolerance_for(row["metric"], cli_tolerances or {}, (suite_tols or {}).get(suite, {}))
        ident = {c: (row.get(c) if c in keys else (row.get(f"{c}_c") or row.get(f"{c}_b") or "")) for c in _ID_COLUMNS}
        div = (diverged or {}).get((suite, str(ident["run"]))) if ident["run"] else \
            (diverged or {}).get((suite, f"{ident['subject']}/{ident['seed']}"))
        status, reason = _status(row, tol, diverged=div or "", noise_aware=noise_aware)
        base_val, cur_val = row.get("value_b", float("nan")), row.get("value_c", float("nan"))
        out.append({**ident, "metric": row["metric"],
                    "direction": (row.get("direction_c") or row.get("direction_b") or "none"),
                    "baseline": base_val, "current": cur_val, "delta": cur_val - base_val,
                    "tolerance": "info" if reason == "informational" else str(tol), "status": status,
                    "reason": reason})
    result = pd.DataFrame(out, columns=[*_ID_COLUMNS, "metric", "direction", "baseline", "current", "delta",
                                        "tolerance", "status", "reason"])
    # problems first, so a long table starts with what needs a look
    rank = {s: i for i, s in enumerate(("regressed", "incomparable", "missing", "new", "not_comparable", "improved",
                                        "ok"))}
    result["_rank"] = result["status"].map(rank)
    result = result.sort_values(["_rank", "suite", "run", "subject", "metric"], kind="stable")
    return result.drop(columns="_rank").reset_index(drop=True)


#: the reason of every row of a diverged run, and what to do about it (--update never accepts one)
DIVERGED_REASON = "run diverged"
DIVERGED_HINT = "rerun it with a spec that trains; --update never accepts a diverged run"


def failing(allow: Iterable[str] = ()) -> tuple[str, ...]:
    """The statuses that fail the gate once `allow` (a subset of ALLOWABLE) is accepted."""
    bad = sorted(set(allow) - set(ALLOWABLE))
    if bad:
        raise UserError(f"--allow {bad[0]!r}: valid values are {', '.join(ALLOWABLE)}")
    return tuple(s for s in FAILING if s not in set(allow))


def exit_code(comparison: "pd.DataFrame", allow: Iterable[str] = ()) -> int:
    """1 when any row is regressed, missing or incomparable (minus the statuses in `allow`), else 0."""
    return int(comparison["status"].isin(failing(allow)).any())


def failure_lines(comparison: "pd.DataFrame", allow: Iterable[str] = (), max_metrics: int = 6) -> list[str]:
    """One line per failing (status, reason): which rows (suite/run: metrics) and why, with the way out."""
    bad = comparison[comparison["status"].isin(failing(allow))]
    hints = {"missing": "rerun them, or pass --allow missing", "incomparable": "pass --allow incomparable, or update "
             "the baseline (--update) if the change is intended", "regressed": "fix it, or accept with --update"}
    lines = []
    for (status, reason), rows in bad.groupby(["status", "reason"], sort=False):
        per_run: dict[str, list[str]] = {}
        for r in rows.to_dict("records"):
            per_run.setdefault(f"{r['suite']}/{r['run'] or r['subject']}", []).append(str(r["metric"]))
        parts = []
        for run, metrics in per_run.items():
            more = f", … ({len(metrics)} metrics)" if len(metrics) > max_metrics else ""
            shown = ", ".join(metrics[:max_metrics]) + more
            parts.append(f"{run} [{shown}]")
        hint = DIVERGED_HINT if str(reason).startswith(DIVERGED_REASON) else hints[status]
        lines.append(f"FAIL {status}: {'; '.join(parts)}: {' '.join(str(reason).split()) or status} ({hint})")
    return lines


def summary(comparison: "pd.DataFrame") -> dict[str, int]:
    counts = comparison["status"].value_counts()
    return {s: int(counts.get(s, 0)) for s in STATUSES}


def format_table(comparison: "pd.DataFrame") -> str:
    """A fixed-width text table for the terminal, followed by a one-line status count."""
    def num(v: float) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5g}"

    header = ["suite", "run", "metric", "baseline", "current", "delta", "tol", "status", "reason"]
    rows = [[str(r["suite"]), str(r["run"] or r["subject"]), str(r["metric"]), num(r["baseline"]),
             num(r["current"]), num(r["delta"]), str(r["tolerance"]), str(r["status"]), " ".join(str(r["reason"]).split())]
            for r in comparison.to_dict("records")]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    right = {3, 4, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header] + rows]
    counts = summary(comparison)
    lines.append(", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- update
def update_baseline(path: str | os.PathLike, current: "pd.DataFrame", baseline: "pd.DataFrame | None") -> Path:
    """Accept the current rows: a run present in the results replaces ALL its baseline rows (a metric it no longer
    produces leaves the baseline, instead of failing every later check as `missing`); runs absent from the results
    (e.g. `run --only`) keep theirs."""
    import pandas as pd

    keys = key_columns(baseline) if baseline is not None and len(baseline) else ["suite", "run", "metric"]
    run_keys = [k for k in keys if k != "metric"]
    cur = current[list(METRIC_COLUMNS)]
    if baseline is not None and len(baseline):
        cur_runs = set(map(tuple, cur[run_keys].astype(str).values.tolist()))
        keep = ~baseline[run_keys].astype(str).apply(tuple, axis=1).isin(cur_runs)
        cur = pd.concat([baseline.loc[keep, list(METRIC_COLUMNS)], cur], ignore_index=True)
    cur = cur.sort_values(["suite", "run", "metric"], kind="stable")
    rows = []
    for r in cur.to_dict("records"):
        row = {c: ("" if r[c] is None else str(r[c])) for c in METRIC_COLUMNS}
        for c in ("value", "stderr", "ci_low", "ci_high"):
            row[c] = fmt_float(r[c]) if not (c != "value" and math.isnan(r[c])) else ""
        n = r["n"]
        row["n"] = "" if n is None or (isinstance(n, float) and math.isnan(n)) else str(int(n))
        rows.append(row)
    return atomic_write_text(path, rows_to_csv(rows, METRIC_COLUMNS))


# ----------------------------------------------------------------------------------------------- entry point
def suite_tolerances_from_results(current: "pd.DataFrame") -> dict[str, dict[str, Tolerance]]:
    """Per-suite spec tolerances, read from each run's run.json (the first run of a suite that has any wins)."""
    out: dict[str, dict[str, Tolerance]] = {}
    if "run_dir" not in current.columns:
        return out
    for suite, run_dir in current[["suite", "run_dir"]].drop_duplicates().itertuples(index=False):
        tols = suite_tolerances(read_run_info(run_dir), str(Path(run_dir) / "run.json"))
        if tols and suite not in out:
            out[suite] = tols
    return out


def _divergence_words(d: Mapping[str, Any]) -> str:
    """run.json's `divergence: {step, term, value}` as "diverged at step N (term = value)"."""
    term = d.get("term")
    detail = f" ({term}" + (f" = {d['value']}" if d.get("value") is not None else "") + ")" if term else ""
    return f"diverged at step {d.get('step', '?')}{detail}"


def diverged_runs(current: "pd.DataFrame") -> dict[tuple[str, str], str]:
    """(suite, run id) and (suite, "subject/seed") → "diverged at step N (term = value)" for every run whose run.json
    says `status: diverged`."""
    out: dict[tuple[str, str], str] = {}
    if "run_dir" not in current.columns:
        return out
    for run_dir in current["run_dir"].drop_duplicates():
        info = read_run_info(run_dir)
        if info.get("status") != "diverged":
            continue
        text = _divergence_words(info.get("divergence") or {})
        suite = str(info.get("suite", ""))
        out[(suite, str(info.get("run_id", "")))] = text
        out[(suite, f"{info.get('subject', '')}/{'' if info.get('seed') is None else info.get('seed')}")] = text
    return out


def regress(results_dirs: Iterable[str | os.PathLike], baseline_path: str | os.PathLike, *,
            cli_tolerances: Mapping[str, Tolerance] | None = None, update: bool = False,
            noise_aware: bool = False) -> "pd.DataFrame":
    """Load results, compare with the baseline (an absent baseline is allowed only with `update`), and with
    `update` write the accepted rows back. Returns the comparison table."""
    import pandas as pd

    from gsqbench.results import load_results

    current = load_results(*results_dirs)
    if Path(baseline_path).exists() or not update:
        baseline = read_baseline(baseline_path)
    else:
        baseline = normalize_metrics_frame(pd.DataFrame(columns=list(METRIC_COLUMNS)))
    comparison = compare(current, baseline, cli_tolerances=cli_tolerances,
                         suite_tols=suite_tolerances_from_results(current), diverged=diverged_runs(current),
                         noise_aware=noise_aware)
    if update:
        accepted = _without_diverged_runs(current)
        update_baseline(baseline_path, accepted, baseline)
        log.info("baseline %s updated with %d rows", baseline_path, len(accepted))
    return comparison


def _without_diverged_runs(current: "pd.DataFrame") -> "pd.DataFrame":
    """The rows `--update` may accept: a diverged run is never a baseline (its baseline rows are kept as they are)."""
    diverged = {key for key in diverged_runs(current) if "/" not in key[1]}  # (suite, run id)
    if not diverged or "run" not in current.columns:
        return current
    log.warning("not accepted into the baseline: diverged run(s) %s (their baseline rows are kept)",
                ", ".join(sorted(f"{suite}/{run}" for suite, run in diverged)))
    keys = current[["suite", "run"]].astype(str).apply(tuple, axis=1)
    return current[~keys.isin(diverged)]
