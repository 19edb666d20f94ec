"""Statistics behind every comparison gsqbench shows: seeds aggregated, intervals, paired differences, and which
value may be marked best. numpy/pandas (+ scipy.special for Student's t); never imports torch.

docs/metrics-protocol.md §15 "Statistics" is the specification; in short:
- A table row ("unit") is one subject at one grid point; its value is the mean over seeds of the per-run values.
- Per-image metrics (a column of per_image.csv: PSNR, SSIM, LPIPS). Seeds and images are crossed random factors
  (Owen 2007) and every subject of a fairness group is evaluated on the same image ids, so differences are paired by
  image id. Image variability: the nonparametric bootstrap over images (Efron & Tibshirani 1993), one multinomial
  resample of the image ids per replicate applied to every subject and seed (the paired bootstrap, Koehn 2004).
  Seed variability: the spread of the per-seed values (s²/S). With >= 2 seeds the two variances are added and the
  95 % interval is Student's t with Welch–Satterthwaite degrees of freedom (Welch 1947), the image part counted as
  known: the seeds-and-data accounting of Bouthillier et al. 2021 / Sellam et al. 2022 with the seed level done
  analytically, because a bootstrap over 2–5 seeds gives intervals that are too narrow. With one seed: the
  percentile bootstrap interval over images alone (seed variation not included).
- Set-level metrics (FID, IS, usage, perplexity, ...): seed spread only (Welch's t); no interval with one seed.
- Marks: the best mean is compared with every other eligible row, p-values corrected with Holm's step-down method
  (Holm 1979). ★ ("best") only when every comparison is significant at 5 %; otherwise ☆ ("tied") on the best row
  and every row not significantly different from it.
Bootstrap memory is O(N) per metric: resample counts are drawn in chunks of bounded size from a fixed seed.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from gsqbench.results import image_clusters, read_per_image

if TYPE_CHECKING:  # report.data imports nothing of ours at run time here: `gsqbench.report` imports this module
    import pandas as pd

    from gsqbench.report.data import Run

log = logging.getLogger(__name__)

LEVEL = 0.95
ALPHA = 1.0 - LEVEL
N_BOOT = 2000  # percentile intervals need >= 1000 replicates (Efron & Tibshirani 1993)
BOOT_SEED = 14  # fixed: a report is a pure function of its results files
MAX_CHUNK_ELEMENTS = 1 << 20  # resample counts held at once (8 MB of int64), whatever B is
#: cost figures measured on a (possibly shared) machine: shown, never marked or compared (benchmarks/ is for speed)
MACHINE_DEPENDENT = frozenset({
    "encode_images_per_s", "decode_images_per_s", "train_images_per_s", "train_time_s", "peak_memory_mb",
})
#: codebook figures whose range is set by the codebook size V (perplexity ≤ V, entropy ≤ log2 V, dead codes ≤ V):
#: compared and ranked only between subjects with the same V and G; fractions (usage, entropy_norm) are comparable
CODEBOOK_SIZE_BOUND = frozenset({"ppl_pooled", "ppl_group_mean", "entropy_bits", "dead_codes"})
#: relative tolerance between a run's metrics.csv value and the mean of its per_image.csv column
_MEAN_RTOL = 1e-6


# ----------------------------------------------------------------------------------------------- core math
def _units(image_ids: Sequence[str]) -> str:
    """What an image bootstrap resamples: the images, or the photos whose crops were evaluated."""
    clusters = image_clusters(image_ids)
    if clusters is None:
        return f"{len(image_ids)} images"
    k = int(clusters.max()) + 1
    return f"{k} photos ({len(image_ids)} crops; each photo's crops resampled together)"



def finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def bootstrap_means(x: np.ndarray, *, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                    max_chunk_elements: int = MAX_CHUNK_ELEMENTS, sizes: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, C) bootstrap replicates of the column means of `x` (N images × C columns).

    Each replicate draws N image indices with replacement (a multinomial resample) and applies the SAME resample to
    every column: columns are paired by image. Counts are built in chunks of at most `max_chunk_elements`, so memory
    is O(N) whatever n_boot is, and a fixed `seed` makes the result reproducible.

    With `sizes`, the N rows are clusters (the crops of one photo): `x` holds each cluster's value sums and `sizes`
    its image counts, and a replicate is the resampled sums over the resampled counts (a cluster bootstrap)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if n == 0:
        raise ValueError("bootstrap over zero images")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, x.shape[1]), dtype=np.float64)
    chunk = max(1, min(n_boot, max_chunk_elements // n))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(c, n))
        idx += (np.arange(c, dtype=np.int64) * n)[:, None]  # row r's counts land in [r·n, (r+1)·n)
        counts = np.bincount(idx.ravel(), minlength=c * n).reshape(c, n)
        out[start:start + c] = counts @ x / (n if sizes is None else (counts @ sizes)[:, None])
    return out


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13)."""
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_p_value(replicates: np.ndarray) -> float:
    """Two-sided p-value of "difference = 0" from bootstrap replicates of a difference: twice the smaller tail mass
    at 0, with the (k + 1)/(B + 1) correction so it is never 0. It rejects at α exactly when the percentile
    interval at 1 − α excludes 0 (up to that correction)."""
    d = np.asarray(replicates, dtype=np.float64)
    b = d.size
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    return float(min(1.0, 2.0 * (min(below, above) + 1) / (b + 1)))


def t_quantile(df: float, level: float = LEVEL) -> float:
    """Two-sided Student-t critical value; the normal one for df = ∞."""
    from scipy.special import ndtri, stdtrit

    q = 1.0 - (1.0 - level) / 2
    return float(ndtri(q) if math.isinf(df) else stdtrit(df, q))


def t_p_value(stat: float, df: float) -> float:
    """Two-sided p-value of a t statistic with `df` degrees of freedom (normal for df = ∞)."""
    from scipy.special import ndtr, stdtr

    a = abs(stat)
    tail = float(1.0 - ndtr(a)) if math.isinf(df) else float(stdtr(df, -a))
    return min(1.0, 2.0 * tail)


def welch_df(seed_parts: Sequence[tuple[float, int]], total_var: float) -> float:
    """Welch–Satterthwaite degrees of freedom of `total_var`, whose seed components are (s²/S, S) pairs; the rest of
    total_var (the image bootstrap part) is treated as known (infinite df)."""
    denom = sum(v * v / (n - 1) for v, n in seed_parts if n > 1)
    return math.inf if denom <= 0 else total_var * total_var / denom


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: H_i is rejected at level α iff
    adjusted_i ≤ α, which controls the family-wise error rate at α over the whole set."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Estimate:
    """A unit's value for one metric: mean over seeds, spread across seeds, and the interval of the mean."""

    mean: float
    seed_std: float  # standard deviation across seeds (ddof 1); NaN with one seed
    n_seeds: int
    stderr: float  # standard error of `mean`; NaN when there is no interval
    ci_low: float  # 95 % interval of `mean`; NaN when there is none
    ci_high: float
    method: str  # how the interval was made, in words (or why there is none)
    n_images: int | None = None


@dataclass(frozen=True)
class Difference:
    """a − b for one metric, with its 95 % interval and the two-sided p-value of "no difference"."""

    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan
    method: str = ""
    note: str = ""  # why there is no interval, or a caveat of the one given (e.g. seed variation not included)

    @property
    def has_interval(self) -> bool:
        return finite(self.ci_low) and finite(self.ci_high)


def verdict(diff: Difference, direction: str) -> str:
    """better / worse / no detectable difference for a − b under the metric's direction; 'no interval' otherwise."""
    if not diff.has_interval:
        return "no interval"
    if diff.ci_low > 0 or diff.ci_high < 0:
        up = diff.ci_low > 0
        return "better" if up == (direction == "higher") else "worse"
    return "no detectable difference"


@dataclass(frozen=True)
class Cell:
    """What a table shows for one unit × metric."""

    metric: str
    direction: str
    estimate: Estimate | None  # None when no seed has a value
    unavailable: str = ""  # the reason (with its fix command) when no seed has a value
    not_comparable: str = ""  # the measurability verdict of metrics.csv (e.g. too few tokens for V)


# ----------------------------------------------------------------------------------------------- units
def _grid_key(run: Run) -> str:
    return json.dumps(run.info.get("grid") or {}, sort_keys=True, default=str)


def divergence_text(run: Run) -> str:
    """"diverged at step N (term)" from run.json's `divergence` block."""
    d = run.info.get("divergence") or {}
    step, term = d.get("step", "?"), d.get("term")
    return f"diverged at step {step}" + (f" ({term})" if term else "")


def is_diverged(run: Run) -> bool:
    return run.info.get("status") == "diverged"


@dataclass
class Unit:
    """One row of an aggregated table: a subject at one grid point, over its seeds."""

    subject: str
    grid: dict[str, Any]
    grid_key: str
    copy: int = 0  # > 0: the same subject/grid/seeds found again in another run directory (shown apart)
    runs: list[Run] = field(default_factory=list)  # finished runs, one per seed
    diverged: list[Run] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.subject, self.grid_key, self.copy)

    @property
    def label(self) -> str:
        return self.subject + (f" [copy {self.copy + 1}]" if self.copy else "")

    @property
    def all_runs(self) -> list[Run]:
        return sorted(self.runs + self.diverged, key=lambda r: (_seed_order(r.seed), r.run_id))

    @property
    def all_diverged(self) -> bool:
        return not self.runs and bool(self.diverged)

    @property
    def divergence_note(self) -> str:
        """'' when no seed diverged; otherwise which ones and where."""
        if not self.diverged:
            return ""
        if self.all_diverged and len(self.diverged) == 1:
            return divergence_text(self.diverged[0])
        parts = ", ".join(f"seed {r.seed} {divergence_text(r)}" for r in self.diverged)
        return f"{len(self.diverged)} of {len(self.all_runs)} seeds diverged: {parts}"

    @property
    def grid_label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.grid.items())


def _seed_order(seed: Any) -> tuple[int, Any]:
    """Numbers before text, numbers by value (seed 10 after seed 2; grid value 256 after 64)."""
    try:
        return (0, float(seed))
    except (TypeError, ValueError):
        return (1, str(seed))


def _grid_order(run: Run) -> tuple:
    grid = run.info.get("grid") or {}
    return tuple((k, _seed_order(json.dumps(v) if isinstance(v, (list, dict)) else v)) for k, v in sorted(grid.items()))


def units_of(runs: Iterable[Run]) -> list[Unit]:
    """Runs grouped into units (subject × grid point), seeds sorted. A seed met twice (the same run found in two
    results folders) starts a separate copy of the unit instead of being counted as a second replicate."""
    units: dict[tuple[str, str, int], Unit] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for run in sorted(runs, key=lambda r: (r.subject, _grid_order(r), _seed_order(r.seed), str(r.run_dir))):
        gk = _grid_key(run)
        copy = seen.get((run.subject, gk, run.seed), 0)
        seen[(run.subject, gk, run.seed)] = copy + 1
        unit = units.setdefault((run.subject, gk, copy), Unit(run.subject, dict(run.info.get("grid") or {}), gk, copy))
        (unit.diverged if is_diverged(run) else unit.runs).append(run)
    return list(units.values())


# ----------------------------------------------------------------------------------------------- a group
class GroupStats:
    """Estimates, paired differences and best marks for the runs of one comparison group (same suite, fairness
    hash and protocol card hash: report/data.group_runs). Per-image replicates are computed once per metric."""

    def __init__(self, runs: Sequence[Run], *, n_boot: int = N_BOOT, seed: int = BOOT_SEED):
        self.units = units_of(runs)
        self.n_boot, self.seed = n_boot, seed
        self._frames: dict[str, "pd.DataFrame | None"] = {}
        self._images: dict[tuple[tuple[str, str, int], str], tuple[tuple[str, ...], np.ndarray] | str] = {}
        self._boot: dict[str, tuple[tuple[str, ...], dict[tuple[str, str, int], np.ndarray]]] = {}
        self._marks: dict[str, tuple[dict[tuple[str, str, int], str], str]] = {}

    # ------------------------------------------------------------------ inputs
    def metrics(self) -> list[str]:
        return sorted({k for u in self.units for r in u.runs for k in r.metrics})

    def direction(self, metric: str) -> str:
        return next((str(r.metrics[metric].get("direction") or "none") for u in self.units for r in u.runs
                     if metric in r.metrics), "none")

    def unit(self, subject: str, grid_key: str | None = None) -> list[Unit]:
        return [u for u in self.units if u.subject == subject and (grid_key is None or u.grid_key == grid_key)]

    def _frame(self, run: Run) -> "pd.DataFrame | None":
        key = str(run.run_dir)
        if key not in self._frames:
            self._frames[key] = read_per_image(run.run_dir)
        return self._frames[key]

    def _seed_values(self, unit: Unit, metric: str) -> tuple[np.ndarray, str, str]:
        """Finite, available per-seed values; the first unavailable reason; the first not-comparable reason."""
        vals, unavailable, not_comparable = [], "", ""
        for r in unit.runs:
            m = r.metrics.get(metric)
            if m is None:
                continue
            if m.get("unavailable") or not finite(m.get("value")):
                unavailable = unavailable or str(m.get("unavailable") or "value is NaN")
                continue
            vals.append(float(m["value"]))
            not_comparable = not_comparable or str(m.get("not_comparable") or "")
        return np.asarray(vals, dtype=np.float64), unavailable, not_comparable

    def images(self, unit: Unit, metric: str) -> tuple[tuple[str, ...], np.ndarray] | str:
        """(sorted image ids, per-image values averaged over the unit's seeds), or why there are none."""
        key = (unit.key, metric)
        if key not in self._images:
            self._images[key] = self._load_images(unit, metric)
        return self._images[key]

    def _load_images(self, unit: Unit, metric: str) -> tuple[tuple[str, ...], np.ndarray] | str:
        ids: tuple[str, ...] | None = None
        vectors = []
        for r in unit.runs:
            df = self._frame(r)
            if df is None or metric not in df.columns or "image_id" not in df.columns:
                return f"no per-image {metric} values (per_image.csv) for {r.run_id}"
            s = df.set_index(df["image_id"].astype(str))[metric].astype(np.float64)
            if s.index.has_duplicates:
                return f"per_image.csv of {r.run_id} repeats an image id"
            if not np.isfinite(s.to_numpy()).all():
                return f"per-image {metric} values of {r.run_id} are incomplete (NaN)"
            value = r.metrics.get(metric, {}).get("value")
            if not finite(value) or abs(s.mean() - float(value)) > _MEAN_RTOL * max(1.0, abs(float(value))):
                return f"per_image.csv of {r.run_id} does not match its metrics.csv {metric} value"
            s = s.sort_index()
            if ids is None:
                ids = tuple(s.index)
            elif tuple(s.index) != ids:
                return f"the seeds of {unit.label} were evaluated on different image ids"
            vectors.append(s.to_numpy())
        if ids is None:
            return "no finished runs"
        return ids, np.mean(vectors, axis=0)

    def _replicates(self, metric: str) -> tuple[tuple[str, ...], dict[tuple[str, str, int], np.ndarray]]:
        """Image-bootstrap replicates of each unit's mean, all units resampled with the same image resample. Units
        evaluated on other image ids than the group's most common id list are left out (and named by `pairing`)."""
        if metric not in self._boot:
            have = {u.key: v for u in self.units if u.runs and not isinstance(v := self.images(u, metric), str)}
            if not have:
                self._boot[metric] = ((), {})
            else:
                id_lists = [ids for ids, _ in have.values()]
                common = max(set(id_lists), key=lambda ids: (id_lists.count(ids), ids))
                keys = [k for k, (ids, _) in have.items() if ids == common]
                x = np.stack([have[k][1] for k in keys], axis=1)
                clusters = image_clusters(common)
                if clusters is None:
                    reps = bootstrap_means(x, n_boot=self.n_boot, seed=self.seed)
                else:  # crops of one photo are resampled together (results.image_clusters)
                    k = int(clusters.max()) + 1
                    sums = np.zeros((k, x.shape[1]))
                    np.add.at(sums, clusters, x)
                    sizes = np.bincount(clusters, minlength=k).astype(np.float64)
                    reps = bootstrap_means(sums, n_boot=self.n_boot, seed=self.seed, sizes=sizes)
                self._boot[metric] = (common, {k: reps[:, i] for i, k in enumerate(keys)})
        return self._boot[metric]

    def pairing(self, metric: str, unit: Unit) -> str:
        """'' when `unit` is in the paired image bootstrap of `metric`, else why not."""
        loaded = self.images(unit, metric)
        if isinstance(loaded, str):
            return loaded
        common, reps = self._replicates(metric)
        if unit.key not in reps:
            return (f"{unit.label} was evaluated on other image ids than the rest of its group "
                    f"({len(loaded[0])} vs {len(common)} ids)")
        return ""

    def image_id_note(self) -> str:
        """A sentence naming units whose image ids differ from their group's (pairing is impossible for them)."""
        odd = set()
        for metric in self.metrics():
            for u in self.units:
                if u.runs and "image ids" in self.pairing(metric, u):
                    odd.add(u.label)
        return ("evaluated on different image ids than the rest of the group, so their per-image metrics are not "
                f"compared: {', '.join(sorted(odd))}") if odd else ""

    # ------------------------------------------------------------------ estimates
    def cell(self, unit: Unit, metric: str) -> Cell | None:
        """None when no finished run of `unit` measured `metric`."""
        if not any(metric in r.metrics for r in unit.runs):
            return None
        vals, unavailable, not_comparable = self._seed_values(unit, metric)
        direction = self.direction(metric)
        if vals.size == 0:
            return Cell(metric, direction, None, unavailable=unavailable or "no value")
        return Cell(metric, direction, self._estimate(unit, metric, vals), not_comparable=not_comparable)

    def _estimate(self, unit: Unit, metric: str, vals: np.ndarray) -> Estimate:
        s = vals.size
        mean = float(vals.mean())
        sd = float(vals.std(ddof=1)) if s > 1 else math.nan
        images = self.images(unit, metric)
        n_img = None if isinstance(images, str) else len(images[0])
        if s == 1:
            if n_img is None:  # set-level metric: seed spread only
                return Estimate(mean, sd, 1, math.nan, math.nan, math.nan, "no interval (1 seed)", None)
            row = next(r.metrics[metric] for r in unit.runs if finite(r.metrics.get(metric, {}).get("value")))
            method = f"within-run bootstrap over {_units(images[0])} (1 seed: seed variation not included)"
            if finite(row.get("ci_low")) and finite(row.get("ci_high")):  # the run's own interval, kept as stored
                se = float(row["stderr"]) if finite(row.get("stderr")) else math.nan
                return Estimate(mean, sd, 1, se, float(row["ci_low"]), float(row["ci_high"]), method, n_img)
            _, reps = self._replicates(metric)
            if unit.key in reps:
                lo, hi = percentile_interval(reps[unit.key])
                return Estimate(mean, sd, 1, float(np.std(reps[unit.key], ddof=1)), lo, hi, method, n_img)
            return Estimate(mean, sd, 1, math.nan, math.nan, math.nan, "no interval (1 seed)", n_img)
        seed_var = sd * sd / s
        image_var = 0.0
        method = f"t interval over {s} seeds"
        if n_img is not None:
            _, reps = self._replicates(metric)
            if unit.key in reps:
                image_var = float(np.var(reps[unit.key], ddof=1))
                method = f"seed spread over {s} seeds + bootstrap over {_units(images[0])} (t interval)"
        var = seed_var + image_var
        se = math.sqrt(var)
        half = t_quantile(welch_df([(seed_var, s)], var)) * se if var > 0 else 0.0
        return Estimate(mean, sd, s, se, mean - half, mean + half, method, n_img)

    # ------------------------------------------------------------------ differences
    def difference(self, a: Unit, b: Unit, metric: str) -> Difference:
        """a − b. Per-image metrics: paired over images (+ seed spread with >= 2 seeds each); set-level: Welch."""
        va, _, _ = self._seed_values(a, metric)
        vb, _, _ = self._seed_values(b, metric)
        if va.size == 0 or vb.size == 0:
            return Difference(math.nan, note="unavailable")
        value = float(va.mean() - vb.mean())
        reasons = [p for p in (self.pairing(metric, a), self.pairing(metric, b)) if p]
        per_image = not isinstance(self.images(a, metric), str) or not isinstance(self.images(b, metric), str)
        if per_image and reasons:
            return Difference(value, note=reasons[0])
        seeds_ok = va.size > 1 and vb.size > 1
        if not per_image:
            if not seeds_ok:
                return Difference(value, note="a set-level metric needs ≥ 2 seeds per subject")
            return self._t_difference(value, va, vb, 0.0, "Welch t over seeds")
        _, reps = self._replicates(metric)
        d_reps = reps[a.key] - reps[b.key]
        if seeds_ok:
            return self._t_difference(value, va, vb, float(np.var(d_reps, ddof=1)),
                                      "paired bootstrap over images + seed spread (Welch t)")
        lo, hi = percentile_interval(d_reps)
        # the replicates are centred on the per-image mean difference, which equals `value` (checked at loading)
        note = "" if va.size == vb.size == 1 else "seed variation not included: a subject has 1 seed"
        return Difference(value, lo, hi, bootstrap_p_value(d_reps), "paired percentile bootstrap over images", note)

    @staticmethod
    def _t_difference(value: float, va: np.ndarray, vb: np.ndarray, image_var: float, method: str) -> Difference:
        parts = [(float(v.var(ddof=1)) / v.size, v.size) for v in (va, vb)]
        var = parts[0][0] + parts[1][0] + image_var
        if var <= 0:
            p = 1.0 if value == 0 else 0.0
            return Difference(value, value, value, p, method)
        df = welch_df(parts, var)
        se = math.sqrt(var)
        half = t_quantile(df) * se
        return Difference(value, value - half, value + half, t_p_value(value / se, df), method)

    @staticmethod
    def codebook_shape(unit: Unit) -> tuple[int, int] | None:
        """(V, G) from the protocol card of the unit's runs (card group `codebook`), or None when not recorded."""
        for r in unit.runs:
            cb = (r.info.get("card") or {}).get("codebook") or {}
            if cb.get("codebook_V") is not None:
                return int(cb["codebook_V"]), int(cb.get("codebook_G") or 1)
        return None

    def size_mismatch(self, metric: str, units: Sequence[Unit]) -> str:
        """Why `metric` cannot be compared across `units` (codebook sizes differ for a V-bound figure), or ''."""
        if metric not in CODEBOOK_SIZE_BOUND:
            return ""
        shapes = {shape for u in units if (shape := self.codebook_shape(u)) is not None}
        if len(shapes) < 2:
            return ""
        shown = ", ".join(f"{g} × {v:,}" if g > 1 else f"{v:,}" for v, g in sorted(shapes))
        return f"codebook sizes differ ({shown} codes): {metric} is bounded by the codebook size"

    # ------------------------------------------------------------------ marks
    def eligible(self, unit: Unit, metric: str) -> bool:
        """May this unit's value compete for a mark? Not for diverged seeds, unavailable or not-comparable values,
        machine-dependent cost figures, or metrics without a direction."""
        if metric in MACHINE_DEPENDENT or self.direction(metric) not in ("lower", "higher") or unit.diverged:
            return False
        c = self.cell(unit, metric)
        return c is not None and c.estimate is not None and not c.not_comparable

    def marks(self, metric: str) -> tuple[dict[tuple[str, str, int], str], str]:
        """unit key → 'best' (★: significantly better than every other eligible row, Holm-corrected) or 'tied'
        (☆: the best row and every row not significantly different from it); plus a note when nothing is marked."""
        if metric not in self._marks:
            self._marks[metric] = self._compute_marks(metric)
        return self._marks[metric]

    def _compute_marks(self, metric: str) -> tuple[dict[tuple[str, str, int], str], str]:
        if metric in MACHINE_DEPENDENT:
            return {}, "machine-dependent cost figure: never ranked"
        direction = self.direction(metric)
        if direction not in ("lower", "higher"):
            return {}, ""
        units = [u for u in self.units if self.eligible(u, metric)]
        if len(units) < 2:
            return {}, ""
        mismatch = self.size_mismatch(metric, units)
        if mismatch:
            return {}, f"not ranked: {mismatch}"
        sign = 1.0 if direction == "higher" else -1.0
        means = [sign * self.cell(u, metric).estimate.mean for u in units]
        best = units[int(np.argmax(means))]
        others = [u for u in units if u is not best]
        diffs = [self.difference(best, u, metric) for u in others]
        if all(not finite(d.p_value) for d in diffs):
            return {}, f"not ranked: no interval ({diffs[0].note or 'none'})"
        adjusted = holm([d.p_value if finite(d.p_value) else 1.0 for d in diffs])
        tied = [u for u, p in zip(others, adjusted) if not p <= ALPHA]
        if not tied:
            return {best.key: "best"}, ""
        return {u.key: "tied" for u in [best, *tied]}, ""


# ----------------------------------------------------------------------------------------------- tables
SUMMARY_FIELDS = ("suite", "fairness_hash", "card_hash", "subject", "grid", "metric", "direction", "mean", "seed_std",
                  "n_seeds", "stderr", "ci_low", "ci_high", "interval", "mark", "not_comparable", "unavailable",
                  "diverged", "seeds")


def summary_rows(suite: str, fairness_hash: str, card_hash: str, stats: GroupStats) -> list[dict[str, Any]]:
    """The long-format aggregated table of one group: one row per unit × metric (what the CSV export holds)."""
    rows = []
    for metric in stats.metrics():
        marks, _ = stats.marks(metric)
        for u in stats.units:
            c = stats.cell(u, metric)
            if c is None and not u.all_diverged:
                continue
            e = c.estimate if c is not None else None
            rows.append({
                "suite": suite, "fairness_hash": fairness_hash, "card_hash": card_hash, "subject": u.label,
                "grid": u.grid_label, "metric": metric, "direction": stats.direction(metric),
                "mean": e.mean if e else math.nan, "seed_std": e.seed_std if e else math.nan,
                "n_seeds": e.n_seeds if e else 0, "stderr": e.stderr if e else math.nan,
                "ci_low": e.ci_low if e else math.nan, "ci_high": e.ci_high if e else math.nan,
                "interval": e.method if e else "", "mark": marks.get(u.key, ""),
                "not_comparable": c.not_comparable if c else "", "unavailable": c.unavailable if c else "",
                "diverged": u.divergence_note, "seeds": " ".join(r.seed for r in u.all_runs),
            })
    return rows


def aggregate(*results_dirs: Any) -> "pd.DataFrame":
    """The results API for seed-aggregated numbers: every results folder under `results_dirs`, one row per comparison
    group × subject × grid point × metric, with mean over seeds, sd across seeds, n seeds, the standard error and
    95 % interval of the mean, and the ★/☆ mark (SUMMARY_FIELDS)."""
    import pandas as pd

    from gsqbench.report.data import group_runs, runs_from_frame
    from gsqbench.results import load_results

    rows: list[dict[str, Any]] = []
    for suite, groups in group_runs(runs_from_frame(load_results(*results_dirs))).items():
        for g in groups:
            rows += summary_rows(suite, g.fairness_hash, g.card_hash, GroupStats(g.runs))
    return pd.DataFrame(rows, columns=list(SUMMARY_FIELDS))


def format_number(value: float) -> str:
    return "" if not finite(value) else f"{value:.6g}"


def rows_for_csv(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Floats written with full precision ('' for NaN), everything else as text."""
    out = []
    for r in rows:
        out.append({k: (repr(float(v)) if isinstance(v, float) and finite(v) else "" if isinstance(v, float)
                        else str(v)) for k, v in r.items()})
    return out
