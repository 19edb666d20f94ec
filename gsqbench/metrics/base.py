"""The streaming metric contract: every metric sees the same (real, fake) pairs, converted once.

A metric is a class registered with `@gsqbench.registry.register_metric(name)` (docs/contracts.md "Metrics"). It
declares, as class attributes, what the rest of gsqbench needs to know without running it:
- `family`: the group it is selected by (`pixel`, `lpips`, `fid`, `codebook`, `cost`, or a plugin's own);
- `outputs`: the metric keys it produces, each with its direction (`lower` / `higher` / `none`);
- `weights`: the weight-manager files it cannot do without (checked up front when one of its keys is required);
- `card_group`: the protocol-card group its `card()` fields describe;
- `reference_stats`: whether it keeps real-side statistics that `fid_reference_stats` / `fid_cache_dir` may supply;
- `selected_by_default`: whether an evaluation with no `eval.metrics` selection runs it (False: opt-in);
- `comparable(key, facts)`: when a value is comparable at all (e.g. enough tokens for usage, enough images for
  FID); `None` means comparable, a string says why not.
`create(ctx)` builds the instance for one evaluation (or returns None when it does not apply, e.g. codebook metrics
without a quantizer). An instance's `input` says which pair its `update(real, fake, ...)` receives (`METRIC_INPUTS`):
the uint8 pair every metric gets by default, or, in `gsq-compat` only, the official float pair (metrics-protocol.md
§1, §14; gsqbench.metrics.official) that the truncated uint8 of that mode is itself cut from. Per batch `update`,
across DDP ranks `sync` (no-op on one process), then `compute()` returns MetricValue rows. Per-image metrics report the mean over images with a standard error and a bootstrap 95 %
interval (metrics-protocol.md §3–§5, §10).

Resumable evaluation: `state_dict()` returns the streaming state after some batches (tensors, numbers, strings,
lists and dicts of them only: it is saved with torch.save and read back with `weights_only=True`) and
`load_state_dict(state)` restores it into a freshly created instance, after which further `update`s must give
bit-identical results to an uninterrupted pass. `state_dict()` returning None (the default) means the metric
cannot be checkpointed: the evaluation then runs without checkpoints.

Reference statistics (`reference_stats = True`): `check_reference(fields)` is called after the pass with the data
key fields only then known (N, id-list hash and originals hash of the images actually evaluated); it returns True
when real-side statistics taken from a cache turned out stale, and the evaluator then feeds the real images again
through `update_real(real_u8, image_ids)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

Direction = Literal["lower", "higher", "none"]
MetricInput = Literal["uint8", "official-float"]
#: the (real, fake) pairs an evaluation hands its metrics: `uint8` (b, 3, H, W), both sides through one converter
#: (round-half-even, or the official truncation in gsq-compat); `official-float` (gsq-compat only) the float [0, 1]
#: images the official evaluation feeds PSNR/SSIM/LPIPS: real fp32, fake bf16, never quantised
METRIC_INPUTS: tuple[str, ...] = ("uint8", "official-float")


@dataclass
class MetricValue:
    """One result row. `unavailable` holds the reason (with the fix command) when the value could not be computed;
    `not_comparable` the reason when it was computed but cannot be compared (the metric's measurability rule)."""

    name: str
    value: float
    stderr: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    direction: Direction = "none"
    n: Optional[int] = None
    unavailable: Optional[str] = None
    not_comparable: Optional[str] = None

    @classmethod
    def missing(cls, name: str, reason: str, direction: Direction = "none") -> "MetricValue":
        return cls(name=name, value=float("nan"), direction=direction, unavailable=reason)


@dataclass
class MetricContext:
    """What `Metric.create` may use to build itself for one evaluation (evaluate.py fills it)."""

    device: "torch.device"
    settings: Any  # gsqbench.evaluate.EvalSettings
    tokenizer: Any = None  # the model under evaluation (Tokenizer contract), or None
    required: frozenset = frozenset()  # metric keys the user required (missing weights => UserError)
    fid_reference: Optional[Mapping[str, Any]] = None  # data key fields for reference-statistics files/caches
    meter: Any = None  # gsqbench.metrics.cost.CostMeter timing encode/decode in the pass
    out_dir: Any = None  # the run's results folder (pathlib.Path) or None; metrics keeping files write under it
    shared: dict = field(default_factory=dict)  # objects metrics of one evaluation share (e.g. one Inception net)

    @property
    def quantizer(self) -> Any:
        return getattr(self.tokenizer, "quantizer", None)

    def requires_any(self, keys: Sequence[str]) -> bool:
        return bool(self.required & set(keys))


@dataclass(frozen=True)
class Facts:
    """What a measurability rule may look at: the evaluation's size and the subject's codebook."""

    n_images: int = 0
    tokens_per_group: int = 0  # T_g = N·h·w
    codebook_size: Optional[int] = None  # V per group
    groups: Optional[int] = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Metric:
    """Base class of every registered metric; subclasses set the class attributes and implement update/compute."""

    family: ClassVar[str] = ""
    outputs: ClassVar[Mapping[str, Direction]] = {}
    weights: ClassVar[tuple[str, ...]] = ()
    card_group: ClassVar[str] = ""
    reference_stats: ClassVar[bool] = False  # keeps real-side reference statistics (a file or cache may key them)
    deterministic: ClassVar[bool] = True  # values are a function of the images (False: timings, e.g. images/s)
    # runs when `eval.metrics` is empty; False: only when its family, name or a key is named (or required), for
    # costly extras (a ViT-L/14 pass, features kept on disk) that would otherwise change every default card
    selected_by_default: ClassVar[bool] = True
    input: MetricInput = "uint8"  # which (real, fake) pair `update` receives; instances may set it in `create`

    @property
    def keys(self) -> tuple[str, ...]:
        """Metric keys this metric produces (in `outputs` order)."""
        return tuple(self.outputs)

    @classmethod
    def create(cls, ctx: MetricContext) -> Optional["Metric"]:
        """The instance for one evaluation; None when the metric does not apply to this subject."""
        return cls()

    @classmethod
    def comparable(cls, key: str, facts: Facts) -> Optional[str]:
        """Measurability rule: None when a value of `key` measured under `facts` may be compared, else the reason."""
        return None

    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:  # pragma: no cover - abstract
        """One batch: the (real, fake) pair of this metric's `input` kind, the image ids, the quantizer output."""
        raise NotImplementedError

    def sync(self) -> None:
        """All-reduce sums / gather per-image values when torch.distributed is initialised."""

    def compute(self) -> list[MetricValue]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what `create` attached to the model (hooks); called once the pass ends, even on error."""

    def per_image(self) -> dict[str, list[float]]:
        """Per-image values keyed by metric name, in the order of `image_ids` seen (after sync: sorted by id)."""
        return {}

    def state_dict(self) -> Optional[dict[str, Any]]:
        """Streaming state for a resumable evaluation (tensors, numbers, strings, lists/dicts); None: not resumable."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output into a fresh instance (raise ValueError when it does not fit)."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume from a saved state")

    def check_reference(self, fields: Mapping[str, Any]) -> bool:
        """After the pass: verify file/cache reference statistics against the complete data key `fields`; True when
        a stale cache was dropped and the real images are needed again (`update_real`)."""
        return False

    def update_real(self, real_u8, image_ids: Sequence[str]) -> None:
        """Real-side images only (see `check_reference`); metrics with `reference_stats` implement it."""
        raise NotImplementedError(f"{type(self).__name__} keeps no real-side statistics")

    def card(self) -> dict:
        """Protocol-card fields of `card_group` (metrics-protocol.md §12)."""
        return {}

    def card_fields(self) -> dict[str, dict]:
        """Card group → fields; a metric describing several groups (FID also describes IS) overrides this."""
        return {self.card_group: self.card()} if self.card_group else {}


#: resample indices drawn per block of the bootstrap: bounds its working memory to ~8 MB whatever N is
BOOT_BLOCK_ELEMENTS = 1 << 20


def bootstrap_means(arr: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    sizes: Optional[np.ndarray] = None) -> np.ndarray:
    """Means of `n_boot` seeded resamples (with replacement) of `arr`, in O(N) memory.

    The resample indices are drawn block by block of rows from one `default_rng(seed)` stream: numpy's Generator
    yields the same integers whether a (B, N) array is drawn at once or in row blocks, so the means are exactly
    those of the full B×N index matrix (which needs 8·B·N bytes: 400 MB at N = 50,000) at a fraction of the memory.

    With `sizes` the rows are clusters (e.g. the crops of one photo): `arr` holds each cluster's value sum and
    `sizes` its image count, and a replicate is the resampled sums over the resampled counts (a cluster bootstrap).
    """
    n = int(arr.size)
    rng = np.random.default_rng(seed)
    rows = max(1, BOOT_BLOCK_ELEMENTS // max(n, 1))
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = arr[idx].mean(axis=1) if sizes is None else arr[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    return out


def mean_with_interval(
    values: Sequence[float], name: str, direction: Direction, *, ids: Optional[Sequence[str]] = None,
    n_boot: int = 1000, seed: int = 0
) -> MetricValue:
    """Mean of per-image values with its standard error and a seeded percentile-bootstrap 95 % interval.

    With `ids` holding several crops of one image (`<id>#crop<j>`, data.crops_per_image) the crops are not
    independent samples: the standard error is the cluster-robust one and the bootstrap resamples whole images
    (gsqbench.results.image_clusters), so 16 crops of 5 photos carry the uncertainty of 5 photos, not of 80."""
    from gsqbench.results import image_clusters

    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return MetricValue.missing(name, "no images evaluated", direction)
    mean = float(arr.mean())
    clusters = image_clusters(ids) if ids is not None and len(ids) == n else None
    if clusters is None:
        stderr = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        replicates = bootstrap_means(arr, n_boot, seed)
    else:
        k = int(clusters.max()) + 1
        sums = np.bincount(clusters, weights=arr, minlength=k)
        sizes = np.bincount(clusters, minlength=k).astype(np.float64)
        resid = sums - mean * sizes  # the ratio estimator's cluster residuals (equal sizes: std of cluster means)
        stderr = float(math.sqrt(k / (k - 1) * float(np.sum(resid * resid))) / n) if k > 1 else float("nan")
        replicates = bootstrap_means(sums, n_boot, seed, sizes=sizes)
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return MetricValue(name, mean, stderr, float(lo), float(hi), direction, n)
