"""One streaming evaluation pass: every metric sees the same (real_u8, fake_u8, ids, qout), converted once.

The metrics are the registered classes (gsqbench.metrics.catalogue) that `EvalSettings.metrics` selects, each built
by its own `create(ctx)`; after the pass each value gets its class's measurability verdict and the protocol card is
assembled by gsqbench.card.build_card. Follows metrics-protocol.md §1 (uint8 rule), §9 (model state), §10 (sharding) and §14 (gsq-compat). Per batch:
x = u8/127.5 − 1 → encode (timed) → decode (timed) → clamp → uint8 once (round-half-even; or the official
truncation rules in `gsq-compat`, incl. the real-side Normalize round trip and bf16 autocast for the model) →
every metric's `update` with the pair its `input` names (`gsq-compat` also hands PSNR/SSIM/LPIPS the official float
pair the truncated uint8 is cut from). Under torch.distributed each rank evaluates its own shard (each image exactly once, no
padding), metrics `sync()`, and rank 0 gets the full result, equal to a single-process run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gsqbench import distributed as ddp
from gsqbench.card import build_card, dataset_fields, id_list_hash
from gsqbench.config import EvalSpec
from gsqbench.data import to_model_input
from gsqbench.errors import UserError, did_you_mean
from gsqbench.metrics.base import Facts, Metric, MetricContext, MetricValue
from gsqbench.metrics.catalogue import check_required_weights, metric_catalogue, resolve_metric_names
from gsqbench.metrics.cost import CostMeter
from gsqbench.metrics.official import official_fake01, official_real01, truncate_to_uint8

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EvalSettings(EvalSpec):
    """How to evaluate: the suite's eval spec (gsqbench.config.EvalSpec) plus what each run fixes itself.

    `metrics` selects families, registered metric names or metric keys (empty = every metric selected by default,
    i.e. all but the opt-in ones such as `rfd@dinov2`, KID and precision/recall); `require` lists metric keys
    that must not come out unavailable (UserError, exit 2, otherwise).
    """

    seed: int = 0
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("gsqbench", "gsq-compat"))
        _check_choice("precision", self.precision, (None, "fp32", "bf16"))
        _check_choice("weights", self.weights, ("ema", "raw"))
        for name, low in (("batch_size", 1), ("samples", 0), ("num_workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"eval.{name}: {value!r} is not valid; expected an integer >= {low}")
        classes = metric_catalogue()
        resolve_metric_names(self.metrics, classes, "eval.metrics")
        keys = [k for c in classes for k in c.outputs]
        for key in self.require:
            if key not in keys:
                raise UserError(f"--require: unknown metric '{key}'{did_you_mean(key, keys)}")
        for net in self.lpips_nets:
            _check_choice("lpips_nets", net, ("alex", "vgg"))
        _check_choice("ssim_border", self.ssim_border, (None, "valid", "reflect-full"))
        if self.lookup is not None:
            from gsqbench.lookup import check_lookup_precision

            check_lookup_precision(self.lookup, "eval.lookup")
        _check_choice("save_recon", self.save_recon, (None, "npz", "png"))

    @classmethod
    def from_spec(cls, spec: EvalSpec, **runtime: Any) -> "EvalSettings":
        """The settings for one evaluation: every field of `spec`, plus run-time fields (seed, num_workers, ...)."""
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(EvalSpec)}
        return cls(**{**fields, **runtime})

    @property
    def model_precision(self) -> str:
        return self.precision or ("bf16" if self.mode == "gsq-compat" else "fp32")

    def metric_classes(self) -> list[type[Metric]]:
        """The metric classes to run: those selected by default when `metrics` is empty, else those named; plus those
        of required keys."""
        classes = metric_catalogue()
        chosen = resolve_metric_names([*self.metrics, *self.require], classes, "eval.metrics")
        if not self.metrics:
            chosen |= {c for c in classes if getattr(c, "selected_by_default", True)}
        return [c for c in classes if c in chosen]


def _check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        shown = [str(v) for v in valid if v is not None]
        raise UserError(f"eval.{name}: {value!r} is not valid{did_you_mean(str(value), shown)}")


@dataclass
class EvalResult:
    """What one evaluation produced (docs/contracts.md). Under DDP every rank holds the same reduced metrics;
    only rank 0 should write them. `samples` and `timings` are this rank's own."""

    metrics: list[MetricValue]
    per_image: dict[str, list]
    code_counts: Optional[np.ndarray]
    card: dict
    card_hash: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage on this rank (profiling only)
    samples: list[str] = field(default_factory=list)  # image ids whose PNGs this rank saved

    def value(self, name: str) -> float:
        for m in self.metrics:
            if m.name == name:
                return m.value
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# The uint8 rule (§1): conversions, each applied exactly once per side


def to_uint8(x_hat: Tensor) -> Tensor:
    """gsqbench rule: clamp to [−1, 1], then round-half-even((x̂ + 1)·127.5) (torch.round is half-to-even)."""
    return torch.round((x_hat.float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)


def compat_model_input(real_u8: Tensor) -> Tensor:
    """Official input: timm ToTensor (u8/255, fp32) then Normalize(0.5, 0.5), i.e. (t − 0.5)/0.5 in fp32."""
    return (real_u8.float().div(255.0) - 0.5) / 0.5


def compat_real_uint8(x: Tensor) -> Tensor:
    """Official real side: trunc(255·clamp(0.5·clamp(x, −1, 1) + 0.5, 0, 1)) in fp32.

    Fed the Normalize output, this reproduces the official loss of one level at every value 1–63.
    """
    return truncate_to_uint8(official_real01(x))


def compat_fake_uint8(x_hat: Tensor) -> Tensor:
    """Official fake side: the same truncation on the bf16 decoder output, every step rounded in bf16."""
    return truncate_to_uint8(official_fake01(x_hat))


# ---------------------------------------------------------------------------------------------------------------
# Metric construction


def build_metrics(settings: EvalSettings, device: torch.device, tokenizer: Optional[nn.Module] = None,
                  fid_reference: Optional[Mapping[str, Any]] = None, meter: Optional[CostMeter] = None,
                  out_dir: Optional[Path] = None) -> list[Metric]:
    """The metric objects for the selected classes, each built by its own `create(ctx)` (None = not applicable).

    `fid_reference` holds the data key fields that reference statistics are verified / cached under; `out_dir` is
    the run folder metrics that keep files (features) write under. A metric whose weights are missing comes back
    unavailable (reason + fix command) unless one of its keys is required.
    """
    ctx = MetricContext(device=device, settings=settings, tokenizer=tokenizer, required=frozenset(settings.require),
                        fid_reference=fid_reference, meter=meter, out_dir=out_dir)
    built = (cls.create(ctx) for cls in settings.metric_classes())
    return [m for m in built if m is not None]


# ---------------------------------------------------------------------------------------------------------------
# Data: shard, batch


def _shard(n: int) -> list[int]:
    """This rank's indices: each image on exactly one rank, no padding, nothing dropped (§10)."""
    from gsqbench.data import shard_indices

    return list(shard_indices(n, ddp.rank(), ddp.world_size()))


class _Indexed(torch.utils.data.Dataset):
    """(global index, image id, uint8 image) for the shard's indices."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, str, Tensor]:
        image_id, image = self.dataset[self.indices[i]]
        return self.indices[i], str(image_id), image


def _collate(items: list) -> tuple[list[int], list[str], Tensor]:
    for _, image_id, image in items:
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"dataset image '{image_id}': expected uint8 (3, S, S), got "
                            f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    return [i for i, _, _ in items], [s for _, s, _ in items], torch.stack([im for _, _, im in items])


def _batches(dataset: Any, settings: EvalSettings, device: torch.device) -> tuple[Iterator, int]:
    """Batches of this rank's shard and the dataset's total size N."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise UserError("evaluation dataset: needs len() and indexing (a map-style dataset) to be sharded")
    n = len(dataset)
    if n == 0:
        raise UserError("evaluation dataset: has no images")
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset, _shard(n)), batch_size=settings.batch_size, shuffle=False, drop_last=False,
        num_workers=settings.num_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    return iter(loader), n


# ---------------------------------------------------------------------------------------------------------------
# Model state (§9)


@contextlib.contextmanager
def _eval_state(tokenizer: nn.Module, settings: EvalSettings) -> Iterator[None]:
    """Asserts eval mode; pins lookup precision and TF32 off for the pass; restores everything afterwards."""
    training = [name for name, m in tokenizer.named_modules() if m.training]
    if training:
        raise AssertionError(f"evaluate() needs the model in eval mode; training: {training[:3]}")
    quantizer = getattr(tokenizer, "quantizer", None)
    old_lookup = quantizer.lookup_precision if quantizer is not None else None
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if old_lookup is not None:
        quantizer.lookup_precision = settings.lookup_mode
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if old_lookup is not None:
            quantizer.lookup_precision = old_lookup


# ---------------------------------------------------------------------------------------------------------------
# The pass


@dataclass
class _PassState:
    ids: list[str] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    tokens_per_image: Optional[int] = None
    saved: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    exporter: Any = None  # gsqbench.export.ImageExporter: each batch's evaluated uint8 pair + ids (--save-recon)


@contextlib.contextmanager
def _timed(state: _PassState, key: str, device: torch.device) -> Iterator[None]:
    """Adds the wall time of the block to state.timings[key] (CUDA synchronised, so kernels are counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.timings[key] = state.timings.get(key, 0.0) + time.perf_counter() - t0


def _convert(real_u8: Tensor, x_hat: Tensor, x_in: Tensor, mode: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Each metric input kind the mode produces → its (real, fake) pair; every side converted once (§1).

    gsq-compat: the official float pair (real fp32, fake bf16 in [0, 1]) for PSNR/SSIM/LPIPS, and its truncation
    to uint8 for every other metric (FID, IS, ...), as the official evaluation does."""
    if mode == "gsq-compat":
        real01, fake01 = official_real01(x_in), official_fake01(x_hat)
        return {"uint8": (truncate_to_uint8(real01), truncate_to_uint8(fake01)), "official-float": (real01, fake01)}
    return {"uint8": (real_u8, to_uint8(x_hat))}


def _check_inputs(metrics: Sequence[Metric], mode: str) -> None:
    """Every metric reads a pair this mode produces (the official float pair exists in gsq-compat only)."""
    for metric in metrics:
        wanted = getattr(metric, "input", "uint8")
        if wanted != "uint8" and not (wanted == "official-float" and mode == "gsq-compat"):
            raise UserError(f"metric {type(metric).__name__}: input '{wanted}' is not produced in mode '{mode}' "
                            "(official-float exists in gsq-compat only)")


def _model_step(tokenizer: nn.Module, x: Tensor, settings: EvalSettings, meter: CostMeter, device: torch.device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.model_precision == "bf16")
    with autocast:
        with meter.time("encode"):
            qout = tokenizer.encode(x)
        with meter.time("decode"):
            x_hat = tokenizer.decode(qout.z_q)
    return qout, x_hat


def _save_samples(out_dir: Path, gidx: Sequence[int], ids: Sequence[str], real: Tensor, fake: Tensor,
                  k: int, state: _PassState) -> None:
    """PNGs of the exact evaluated uint8 for global indices < k (any rank; the set never depends on sharding)."""
    from gsqbench.results import write_samples

    keep = [j for j, g in enumerate(gidx) if g < k]
    if keep:
        write_samples(out_dir, [ids[j] for j in keep], real[keep].cpu(), fake[keep].cpu())
        state.saved += [ids[j] for j in keep]


def _image_digest(image_id: str, image: Tensor) -> str:
    h = hashlib.sha256(image_id.encode("utf-8") + b"\0")
    h.update(image.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _run_pass(tokenizer: nn.Module, dataset: Any, settings: EvalSettings, metrics: Sequence[Metric],
              device: torch.device, out_dir: Optional[Path], meter: CostMeter,
              exporter: Any = None) -> tuple[_PassState, int]:
    state = _PassState(exporter=exporter)
    batches, n = _batches(dataset, settings, device)
    from gsqbench.progress import Progress

    # a bar on a terminal, one line per 10 % in a log
    bar = Progress(len(_shard(n)), "evaluate", enabled=settings.progress and ddp.is_main(), unit="images")
    try:
        while True:
            with _timed(state, "data", device):
                batch = next(batches, None)
            if batch is None:
                break
            gidx, ids, real_cpu = batch
            state.image_digests += [_image_digest(i, im) for i, im in zip(ids, real_cpu)]  # before the copy
            real_u8 = real_cpu.to(device, non_blocking=True)
            _one_batch(tokenizer, settings, metrics, device, out_dir, meter, state, gidx, ids, real_u8)
            bar.update(len(ids))
    finally:
        bar.close()
    return state, n


def _one_batch(tokenizer, settings, metrics, device, out_dir, meter, state, gidx, ids, real_u8) -> None:
    with _timed(state, "convert", device):
        x = compat_model_input(real_u8) if settings.mode == "gsq-compat" else to_model_input(real_u8)
    with _timed(state, "model", device):
        qout, x_hat = _model_step(tokenizer, x, settings, meter, device)
    with _timed(state, "convert", device):
        pairs = _convert(real_u8, x_hat, x, settings.mode)
    real_eval, fake_eval = pairs["uint8"]  # what samples and exports keep
    for metric in metrics:
        with _timed(state, f"metric:{type(metric).__name__}", device):
            metric.update(*pairs[getattr(metric, "input", "uint8")], ids, qout)
    state.ids += ids
    state.tokens_per_image = int(qout.indices.shape[1] * qout.indices.shape[2])
    if state.exporter is not None:
        with _timed(state, "export", device):
            state.exporter.add(ids, real_eval, fake_eval)
    if out_dir is not None and settings.samples:
        with _timed(state, "samples", device):
            _save_samples(out_dir, gidx, ids, real_eval, fake_eval, settings.samples, state)


# ---------------------------------------------------------------------------------------------------------------
# After the pass: reduce, assemble


def _needs_reference(settings: EvalSettings) -> bool:
    """Whether a metric of the run keeps real-side reference statistics that a file or cache will key."""
    uses = any(getattr(c, "reference_stats", False) for c in settings.metric_classes())
    return uses and bool(settings.fid_reference_stats or settings.fid_cache_dir)


def _fid_reference(dataset: Any, settings: EvalSettings, device: torch.device) -> Optional[dict[str, Any]]:
    """Data key fields for FID reference statistics, only when a statistics file or cache is in use.

    Needs the originals hash before the pass, so it costs one extra read of the (sharded) data then.
    """
    if not _needs_reference(settings):
        return None
    state = _PassState()
    batches, n = _batches(dataset, settings, device)
    for _, ids, real_u8 in batches:
        state.ids += ids
        state.image_digests += [_image_digest(i, im) for i, im in zip(ids, real_u8)]
    ids, originals_hash = _gather_ids(state, n)
    info = dataset_fields(dataset)
    return {"dataset": info.get("dataset", info.get("kind")), "split": info.get("split"), "crop": info.get("crop"),
            "resolution": info.get("resolution", info.get("size")), "n": n, "ids_hash": id_list_hash(ids),
            "originals_hash": originals_hash}


def _gather_ids(state: _PassState, n: int) -> tuple[list[str], str]:
    """All image ids sorted, and the originals hash; asserts each of the N images was seen exactly once."""
    ids, digests = ddp.gather_per_image(state.ids, state.image_digests)
    if len(ids) != n:
        raise AssertionError(f"evaluated {len(ids)} images, dataset has {n}")
    return ids, hashlib.sha256("".join(digests).encode("ascii")).hexdigest()


def _code_counts(metrics: Sequence[Metric]) -> Optional[np.ndarray]:
    """(G, V) int64 counts from the codebook metric (after its sync), None when absent or V is too large."""
    for metric in metrics:
        counts = getattr(metric, "code_counts", None)
        if callable(counts):
            return counts()
    return None


def _per_image_table(metrics: Sequence[Metric], ids: list[str]) -> dict[str, list]:
    """image_id first, then every metric's per-image columns aligned to the sorted ids."""
    table: dict[str, list] = {"image_id": list(ids)}
    for metric in metrics:
        columns = {k: v for k, v in metric.per_image().items() if not k.startswith("_")}
        if not columns:
            continue
        order = metric.image_ids() if hasattr(metric, "image_ids") else list(ids)
        pos = {image_id: j for j, image_id in enumerate(order)}
        for key, values in columns.items():
            if len(values) != len(ids) or set(pos) != set(ids):
                raise AssertionError(f"metric column '{key}' has {len(values)} values for {len(ids)} images")
            table[key] = [values[pos[i]] for i in ids]
    return table


def _check_required(rows: Sequence[MetricValue], require: Sequence[str]) -> None:
    by_name = {m.name: m for m in rows}
    for key in require:
        row = by_name.get(key)
        if row is None:
            raise UserError(f"required metric '{key}' was not computed (select its family in eval.metrics)")
        if row.unavailable:
            raise UserError(f"required metric '{key}' is unavailable: {row.unavailable}")


def _mark_comparability(rows: Sequence[MetricValue], metrics: Sequence[Metric], facts: Facts) -> None:
    """Record each value's measurability verdict (`not_comparable`), from the metric class that produced it."""
    owner = {k: type(m) for m in metrics for k in m.keys}
    for row in rows:
        cls = owner.get(row.name)
        if cls is not None and not row.unavailable:
            row.not_comparable = cls.comparable(row.name, facts)


def _exporter(settings: EvalSettings, out: Optional[Path]) -> Any:
    """The `--save-recon` exporter writing under `<run>/export`, or None."""
    if settings.save_recon is None:
        return None
    if out is None:
        raise UserError(f"eval.save_recon: '{settings.save_recon}' needs an output directory (gsqbench eval --out DIR)")
    from gsqbench.export import ImageExporter

    return ImageExporter(out / "export", settings.save_recon)


def _card(tokenizer: nn.Module, settings: EvalSettings, dataset: Any, metrics: Sequence[Metric], ids: list[str],
          originals_hash: str, rows: Sequence[MetricValue], device: torch.device,
          model_info: Mapping[str, Any]) -> dict:
    quantizer = getattr(tokenizer, "quantizer", None)
    agreement = next((m.value for m in rows if m.name == "code_agreement"), None)
    data = {**dataset_fields(dataset), "N": len(ids), "image_id_list_hash": id_list_hash(ids),
            "originals_hash": originals_hash}
    has_lookup = quantizer is not None and quantizer.lookup_precision is not None
    # `lookup` is the protocol's pinned mode (hashed: `eval --lookup` gets its own card); `lookup_precision` what
    # this subject actually ran (None without a codebook search: FSQ/LFQ rows stay comparable with GSQ's)
    model = {"weights": settings.weights, "argmin": "first-index", "code_agreement": agreement,
             "lookup": settings.lookup_mode,
             "lookup_precision": settings.lookup_mode if has_lookup else None, **dict(model_info)}
    precision = {"model": settings.model_precision,
                 "autocast": "bf16" if settings.model_precision == "bf16" else None,
                 "tf32": False, "device": str(device),
                 "driver": torch.version.cuda if device.type == "cuda" else None}
    runtime = {"versions": _versions(), "world_size": ddp.world_size(), "batch_size": settings.batch_size,
               "seed": settings.seed}
    return build_card(mode=settings.mode, metrics=metrics, data=data, model=model, precision=precision,
                      runtime=runtime)


def _versions() -> dict[str, Optional[str]]:
    from gsqbench.results import package_versions

    return package_versions()


def _facts(state: _PassState, ids: list[str], quantizer: Any) -> Facts:
    return Facts(n_images=len(ids), tokens_per_group=len(ids) * (state.tokens_per_image or 0),
                 codebook_size=getattr(quantizer, "codebook_size", None), groups=getattr(quantizer, "groups", None))


def evaluate(
    tokenizer: nn.Module,
    dataset: Any,
    settings: EvalSettings,
    *,
    device: torch.device | str,
    out_dir: Optional[str | Path] = None,
    metrics: Optional[Sequence[Metric]] = None,
    model_info: Optional[Mapping[str, Any]] = None,
) -> EvalResult:
    """Evaluate `tokenizer` on `dataset` in one streaming pass (see module docstring).

    `metrics` replaces the default metric objects (tests, custom extractors); `model_info` adds card fields
    such as checkpoint_sha256, step, tokenizer_spec_hash, fairness_hash.
    """
    device = torch.device(device)
    check_required_weights(settings.require)
    torch.manual_seed(settings.seed)
    meter = CostMeter(device)
    out = Path(out_dir) if out_dir is not None else None
    exporter = _exporter(settings, out)
    if metrics is None:
        metrics = build_metrics(settings, device, tokenizer, _fid_reference(dataset, settings, device), meter, out)
    metrics = list(metrics)
    _check_inputs(metrics, settings.mode)
    try:
        with torch.no_grad(), _eval_state(tokenizer, settings):
            state, n = _run_pass(tokenizer, dataset, settings, metrics, device, out, meter, exporter)
            for metric in metrics:
                with _timed(state, f"sync:{type(metric).__name__}", device):
                    metric.sync()
            ids, originals_hash = _gather_ids(state, n)
            if exporter is not None:
                with _timed(state, "export", device):
                    exporter.finish()
            counts = _code_counts(metrics)
            rows = []
            for metric in metrics:
                with _timed(state, f"compute:{type(metric).__name__}", device):
                    rows += metric.compute()
    finally:
        if exporter is not None:
            exporter.close()
        for metric in metrics:
            metric.close()
    _check_required(rows, settings.require)
    _mark_comparability(rows, metrics, _facts(state, ids, getattr(tokenizer, "quantizer", None)))
    card = _card(tokenizer, settings, dataset, metrics, ids, originals_hash, rows, device, model_info or {})
    return EvalResult(metrics=rows, per_image=_per_image_table(metrics, ids), code_counts=counts, card=card,
                      card_hash=card["card_hash"], timings=dict(state.timings), samples=list(state.saved))
