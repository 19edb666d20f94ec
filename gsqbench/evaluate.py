"""One streaming evaluation pass: every metric sees the same (real_u8, fake_u8, ids, qout), converted once.

The metrics are the registered classes (gsqbench.metrics.catalogue) that `EvalSettings.metrics` selects, each built
by its own `create(ctx)`; after the pass each value gets its class's measurability verdict and the protocol card is
assembled by gsqbench.card.build_card. Follows metrics-protocol.md §1 (uint8 rule), §9 (model state), §10 (sharding) and §14 (gsq-compat). Per batch:
x = u8/127.5 − 1 → encode (timed) → decode (timed) → clamp → uint8 once (round-half-even; or the official
truncation rules in `gsq-compat`, incl. the real-side Normalize round trip and bf16 autocast for the model; or a
published tokenizer's compatibility mode, gsqbench.modes + gsqbench.compat) → every metric's `update` with the pair
its `input` names (`gsq-compat` also hands PSNR/SSIM/LPIPS the official float pair the truncated uint8 is cut from;
a mode whose Inception reads never-rounded floats hands rFID the `float01` pair). Under torch.distributed each rank
evaluates its own shard (each image exactly once, no padding), metrics `sync()`, and rank 0 gets the full result,
equal to a single-process run.
"""
from __future__ import annotations

import contextlib
import copy
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

from gsqbench import compat
from gsqbench import distributed as ddp
from gsqbench.card import build_card, conversion_group, dataset_fields, id_list_hash
from gsqbench.config import EvalSpec
from gsqbench.data import Sample, problem_message, to_model_input
from gsqbench.errors import UserError, did_you_mean
from gsqbench.metrics.base import Facts, Metric, MetricContext, MetricValue
from gsqbench.metrics.catalogue import check_required_weights, metric_catalogue, resolve_metric_names
from gsqbench.metrics.cost import CostMeter
from gsqbench.metrics.official import official_fake01, official_real01, truncate_to_uint8
from gsqbench.modes import check_mode, get_mode

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EvalSettings(EvalSpec):
    """How to evaluate: the suite's eval spec (gsqbench.config.EvalSpec) plus what each run fixes itself.

    `metrics` selects families, registered metric names or metric keys (empty = every metric selected by default,
    i.e. all but the opt-in ones such as `rfd@dinov2`, KID and precision/recall); `require` lists metric keys
    that must not come out unavailable (UserError, exit 2, otherwise).
    """

    seed: int = 0
    num_workers: Optional[int] = None  # DataLoader worker processes; None = chosen from the cores (data.py)
    progress: bool = True
    # resumable evaluation (with an out_dir): save the streaming state every K batches; None = every
    # CHECKPOINT_INTERVAL_S seconds; 0 = never
    checkpoint_every: Optional[int] = None

    def __post_init__(self) -> None:
        check_mode(self.mode, "eval.mode")
        _check_choice("precision", self.precision, (None, "fp32", "bf16"))
        _check_choice("weights", self.weights, ("ema", "raw"))
        for name, low in (("batch_size", 1), ("samples", 0), ("num_workers", 0), ("checkpoint_every", 0)):
            value = getattr(self, name)
            if value is None and name in ("num_workers", "checkpoint_every"):
                continue
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
        if self.ssim_border_mode != "valid" and self.mode != "gsq-compat":
            # the gsqbench protocol pins the valid interior (metrics-protocol.md §4); the choice exists because
            # the official torchmetrics version is unknown (§14)
            raise UserError(f"eval.ssim_border: '{self.ssim_border}' is only valid with mode gsq-compat; the gsqbench "
                            "protocol pins SSIM to the valid interior")
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
        return self.precision_mode

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
# Data: shard, batch, unreadable images


def _shard(n: int) -> list[int]:
    """This rank's indices: each image on exactly one rank, no padding, nothing dropped (§10)."""
    from gsqbench.data import shard_indices

    return list(shard_indices(n, ddp.rank(), ddp.world_size()))


class _Indexed(torch.utils.data.Dataset):
    """(global index, Sample) for the shard's indices; `dataset.read` reports a bad file instead of raising."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Sample]:
        g = self.indices[i]
        read = getattr(self.dataset, "read", None)
        if read is not None:
            return g, read(g)
        image_id, image = self.dataset[g]
        return g, Sample(str(image_id), image)


@dataclass
class _Batch:
    gidx: list[int]  # global indices of the usable images
    ids: list[str]
    images: Optional[Tensor]  # uint8 (b, 3, S, S), None when no image of the batch was usable
    sizes: list[tuple[int, int]]  # original (width, height) per usable image, (−1, −1) unknown
    problems: list[Sample]  # images that could not be used (unreadable / too small)

    def pin_memory(self) -> "_Batch":  # called by the DataLoader's pinning thread (CUDA)
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self

    def __len__(self) -> int:
        return len(self.gidx) + len(self.problems)


def _collate(items: list[tuple[int, Sample]]) -> _Batch:
    good = [(g, s) for g, s in items if s.image is not None]
    for _, s in good:
        image = s.image
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"dataset image '{s.image_id}': expected uint8 (3, S, S), got "
                            f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    return _Batch([g for g, _ in good], [s.image_id for _, s in good],
                  torch.stack([s.image for _, s in good]) if good else None,
                  [(s.width, s.height) for _, s in good], [s for _, s in items if s.image is None])


def _batches(dataset: Any, settings: EvalSettings, device: torch.device,
             start_batch: int = 0) -> tuple[Iterator, int]:
    """Batches of this rank's shard (from batch `start_batch` on: a resumed pass) and the dataset's size N."""
    from gsqbench.data import loader_options, resolve_num_workers

    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise UserError("evaluation dataset: needs len() and indexing (a map-style dataset) to be sharded")
    n = len(dataset)
    if n == 0:
        raise UserError("evaluation dataset: has no images")
    indices = _shard(n)[start_batch * settings.batch_size:]
    workers = resolve_num_workers(settings.num_workers, dataset, settings.batch_size, n_items=len(indices))
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset, indices), batch_size=settings.batch_size, shuffle=False, drop_last=False,
        collate_fn=_collate, **loader_options(workers, device.type == "cuda"))
    return iter(loader), n


def _refuses(dataset: Any, sample: Sample) -> bool:
    """The corrupt-image policy (README): too-small images are always refused, unreadable ones under strict."""
    return sample.problem == "too-small" or bool(getattr(dataset, "strict", False))


# ---------------------------------------------------------------------------------------------------------------
# Model state (§9)


@contextlib.contextmanager
def pinned_model(tokenizer: nn.Module, lookup: str, allow_tf32: bool = False) -> Iterator[None]:
    """Asserts eval mode; pins the nearest-code lookup and TF32 (off unless a compatibility mode reproduces an
    upstream that enabled it) for the block; restores everything afterwards.

    What every pass over a model that produces results uses (the evaluation, `gsqbench encode`)."""
    training = [name for name, m in tokenizer.named_modules() if m.training]
    if training:
        raise AssertionError(f"the tokenizer must be in eval mode; training: {training[:3]}")
    quantizer = getattr(tokenizer, "quantizer", None)
    old_lookup = quantizer.lookup_precision if quantizer is not None else None
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    if old_lookup is not None:
        quantizer.lookup_precision = lookup
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
    """What one rank's pass accumulated besides the metrics; saved with them by a resumable evaluation."""

    ids: list[str] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    tokens_per_image: Optional[int] = None
    saved: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[list[str]] = field(default_factory=list)  # [image_id, reason] of unreadable images left out
    refused: list[str] = field(default_factory=list)  # one-line errors held until every rank has finished (DDP)
    smaller_than_crop: int = 0  # evaluated images whose shorter side was below S (upscaled by the crop)
    batches_done: int = 0
    images_read: int = 0
    resumed_at_image: Optional[int] = None
    num_workers: int = 0
    exporter: Any = None  # gsqbench.export.ImageExporter: each batch's evaluated uint8 pair + ids (--save-recon)

    def to_dict(self) -> dict[str, Any]:
        """The saveable part (plain lists, numbers and strings; the exporter is not saved)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "exporter"}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "_PassState":
        names = {f.name for f in dataclasses.fields(cls)} - {"exporter"}
        return cls(**{k: v for k, v in state.items() if k in names})


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


def _real_side(real_u8: Tensor, mode: str) -> Tensor:
    """The real images every metric sees: as read, or the official Normalize round trip in gsq-compat, or the
    compatibility mode's own rule (gsqbench.compat)."""
    if mode == "gsq-compat":
        return compat_real_uint8(compat_model_input(real_u8))
    return compat.real_uint8(mode, real_u8) if mode != "gsqbench" else real_u8


def _model_input(real_u8: Tensor, mode: str) -> Tensor:
    if mode == "gsq-compat":
        return compat_model_input(real_u8)
    return compat.model_input(mode, real_u8) if mode != "gsqbench" else to_model_input(real_u8)


def _convert(real_u8: Tensor, x_hat: Tensor, x_in: Tensor, mode: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Each metric input kind the mode produces → its (real, fake) pair; every side converted once (§1).

    gsq-compat: the official float pair (real fp32, fake bf16 in [0, 1]) for PSNR/SSIM/LPIPS, and its truncation
    to uint8 for every other metric (FID, IS, ...), as the official evaluation does. A published tokenizer's
    compatibility mode: its own rules (gsqbench.compat), with the never-rounded `float01` pair for rFID where its
    Inception reads floats."""
    if mode == "gsq-compat":
        real01, fake01 = official_real01(x_in), official_fake01(x_hat)
        return {"uint8": (truncate_to_uint8(real01), truncate_to_uint8(fake01)), "official-float": (real01, fake01)}
    if mode != "gsqbench":
        return compat.convert(mode, real_u8, x_hat, x_in)
    return {"uint8": (real_u8, to_uint8(x_hat))}


def _produced_inputs(mode: str) -> set[str]:
    if mode == "gsq-compat":
        return {"uint8", "official-float"}
    return {"uint8", "float01"} if get_mode(mode).fid_input == "float01" else {"uint8"}


def _check_inputs(metrics: Sequence[Metric], mode: str) -> None:
    """Every metric reads a pair this mode produces (the official float pair exists in gsq-compat only, the
    float01 pair in a mode whose Inception reads floats)."""
    kinds = _produced_inputs(mode)
    for metric in metrics:
        wanted = getattr(metric, "input", "uint8")
        if wanted not in kinds:
            raise UserError(f"metric {type(metric).__name__}: input '{wanted}' is not produced in mode '{mode}' "
                            f"(official-float exists in gsq-compat only, float01 in modes whose rFID reads floats; "
                            f"this mode produces {', '.join(sorted(kinds))})")


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


def _note_problems(dataset: Any, problems: Sequence[Sample], state: _PassState) -> None:
    """Unreadable images are left out with a count; refused ones (README policy) stop the run: at once on one
    process, after the pass on every rank together under DDP (a lone rank raising would leave the others waiting)."""
    for sample in problems:
        if _refuses(dataset, sample):
            message = problem_message(dataset, sample)
            if ddp.world_size() == 1:
                raise UserError(message)
            state.refused.append(message)
        else:
            state.skipped.append([sample.image_id, sample.error or "unreadable"])


def _run_pass(tokenizer: nn.Module, dataset: Any, settings: EvalSettings, metrics: Sequence[Metric],
              device: torch.device, out_dir: Optional[Path], meter: CostMeter, state: _PassState,
              checkpoint: Any) -> int:
    """Stream this rank's shard (from `state.batches_done` on) through the model and every metric; returns N."""
    batches, n = _batches(dataset, settings, device, state.batches_done)
    from gsqbench.progress import Progress

    # a bar on a terminal, one line per 10 % in a log
    bar = Progress(len(_shard(n)), "evaluate", enabled=settings.progress and ddp.is_main(), unit="images",
                   initial=state.images_read)
    try:
        while True:
            with _timed(state, "data", device):
                batch = next(batches, None)
            if batch is None:
                break
            if batch.problems:
                _note_problems(dataset, batch.problems, state)
            if batch.images is not None:
                size = batch.images.shape[-1]
                state.smaller_than_crop += sum(1 for w, h in batch.sizes if 0 <= min(w, h) < size)
                state.image_digests += [_image_digest(i, im) for i, im in zip(batch.ids, batch.images)]
                real_u8 = batch.images.to(device, non_blocking=True)
                _one_batch(tokenizer, settings, metrics, device, out_dir, meter, state, batch.gidx, batch.ids,
                           real_u8)
            state.batches_done += 1
            state.images_read += len(batch)
            bar.update(len(batch))
            checkpoint.step(state.to_dict, metrics)
    finally:
        bar.close()
    return n


def _one_batch(tokenizer, settings, metrics, device, out_dir, meter, state, gidx, ids, real_u8) -> None:
    with _timed(state, "convert", device):
        x = _model_input(real_u8, settings.mode)
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
# After the pass: agree on skipped images, verify reference statistics, reduce, assemble


def _agree_on_problems(dataset: Any, state: _PassState) -> tuple[list[list[str]], int]:
    """Every rank learns every rank's skipped and refused images: refusals stop all ranks with the same line,
    skipped images are counted (and recorded in the dataset's manifest by rank 0). Returns (skipped, smaller)."""
    parts = ddp.all_gather_objects((state.skipped, state.refused, state.smaller_than_crop))
    refused = [m for part in parts for m in part[1]]
    if refused:
        raise UserError(refused[0])
    skipped = sorted((list(p) for part in parts for p in part[0]), key=lambda p: p[0])
    smaller = sum(int(part[2]) for part in parts)
    if skipped and ddp.is_main():
        log.warning("skipped %d image(s) that could not be read (first: %s: %s): left out of N and recorded as "
                    "unreadable in the dataset manifest; --strict-data stops instead", len(skipped), *skipped[0])
        record = getattr(dataset, "record_read_results", None)
        if record is not None:
            record([(i, reason) for i, reason in skipped])
    if smaller and ddp.is_main():
        log.warning("%d evaluated image(s) are smaller than the crop (shorter side below S): the crop protocol "
                    "upscaled them; the count is in the card, --min-size refuses them", smaller)
    return skipped, smaller


def _needs_reference(settings: EvalSettings) -> bool:
    """Whether a metric of the run keeps real-side reference statistics that a file or cache will key."""
    uses = any(getattr(c, "reference_stats", False) for c in settings.metric_classes())
    return uses and bool(settings.fid_reference_stats or settings.fid_cache_dir)


def _reference_fields(dataset: Any, settings: EvalSettings, ids: Optional[Sequence[str]] = None,
                      originals_hash: Optional[str] = None) -> dict[str, Any]:
    """Data key fields of reference statistics (metrics-protocol §6).

    Before the pass (`ids` None) they come from the dataset's own id list, without reading an image, and the
    originals hash is pending (None); after it, from the images actually evaluated. The real-side conversion is
    part of the key: gsq-compat's real images lose a level at values 1–63, so its statistics differ.
    """
    info = dataset_fields(dataset)
    if ids is None:
        listed = getattr(dataset, "ids", None)
        n, ids_hash = (len(listed), id_list_hash(sorted(listed))) if listed is not None else (None, None)
    else:
        n, ids_hash = len(ids), id_list_hash(ids)
    return {"dataset": info.get("dataset", info.get("kind")), "split": info.get("split"), "crop": info.get("crop"),
            "resolution": info.get("resolution", info.get("size")), "n": n, "ids_hash": ids_hash,
            "originals_hash": originals_hash, "real_conversion": conversion_group(settings.mode)["uint8_rule"]}


def _complete_references(metrics: Sequence[Metric], fields: Mapping[str, Any], dataset: Any,
                         settings: EvalSettings, device: torch.device, state: _PassState) -> None:
    """Give reference-keeping metrics the complete key; re-read the real images for any whose cache was stale
    (every rank decides alike: same key, same files)."""
    redo = [m for m in metrics if m.check_reference(fields)]
    if not redo:
        return
    evaluated = set(state.ids)
    seen = 0
    batches, _ = _batches(dataset, settings, device)
    for batch in batches:
        keep = [j for j, i in enumerate(batch.ids) if i in evaluated]
        if not keep:
            continue
        real = _real_side(batch.images[keep].to(device), settings.mode)
        ids = [batch.ids[j] for j in keep]
        for metric in redo:
            metric.update_real(real, ids)
        seen += len(keep)
    if seen != len(evaluated):
        raise UserError(f"evaluation dataset: {len(evaluated) - seen} image(s) could not be read again for the "
                        "real-side statistics; the data changed during the evaluation")


def _gather_ids(state: _PassState, n: int) -> tuple[list[str], str]:
    """All image ids sorted, and the originals hash; asserts each of the N images was seen exactly once."""
    ids, digests = ddp.gather_per_image(state.ids, state.image_digests)
    if len(ids) != n:
        raise AssertionError(f"evaluated {len(ids)} images, expected {n}")
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


def _data_card(dataset: Any, ids: list[str], originals_hash: str, skipped: Sequence[Sequence[str]],
               smaller: int) -> dict[str, Any]:
    """The card's data group: what the dataset says, then what was actually evaluated (the true N)."""
    data = {**dataset_fields(dataset), "N": len(ids), "image_id_list_hash": id_list_hash(ids),
            "originals_hash": originals_hash, "smaller_than_crop": smaller}
    if skipped:  # images left out while reading: describe the evaluated list, as a later run (manifest) will
        gone = {p[0] for p in skipped}
        listed = [i for i in getattr(dataset, "ids", ids) if i not in gone]
        data.update(n=len(listed), ids_sha256=hashlib.sha256("\n".join(listed).encode()).hexdigest(),
                    skipped_unreadable=int(data.get("skipped_unreadable", 0)) + len(skipped))
    return data


def _exporter(settings: EvalSettings, out: Optional[Path]) -> Any:
    """The `--save-recon` exporter writing under `<run>/export`, or None."""
    if settings.save_recon is None:
        return None
    if out is None:
        raise UserError(f"eval.save_recon: '{settings.save_recon}' needs an output directory (gsqbench eval --out DIR)")
    from gsqbench.export import ImageExporter

    return ImageExporter(out / "export", settings.save_recon)


def _card(tokenizer: nn.Module, settings: EvalSettings, metrics: Sequence[Metric], data: Mapping[str, Any],
          rows: Sequence[MetricValue], device: torch.device, model_info: Mapping[str, Any],
          state: _PassState) -> dict:
    quantizer = getattr(tokenizer, "quantizer", None)
    agreement = next((m.value for m in rows if m.name == "code_agreement"), None)
    has_lookup = quantizer is not None and quantizer.lookup_precision is not None
    # `lookup` is the protocol's pinned mode (hashed: `eval --lookup` gets its own card); `lookup_precision` what
    # this subject actually ran (None without a codebook search: FSQ/LFQ rows stay comparable with GSQ's)
    model = {"weights": settings.weights, "argmin": "first-index", "code_agreement": agreement,
             "lookup": settings.lookup_mode,
             "lookup_precision": settings.lookup_mode if has_lookup else None, **dict(model_info)}
    precision = {"model": settings.model_precision,
                 "autocast": "bf16" if settings.model_precision == "bf16" else None,
                 "tf32": get_mode(settings.mode).tf32, "device": str(device),
                 "driver": torch.version.cuda if device.type == "cuda" else None}
    runtime = {"versions": _versions(), "world_size": ddp.world_size(), "batch_size": settings.batch_size,
               "seed": settings.seed, "num_workers": state.num_workers, "resumed_at_image": state.resumed_at_image}
    return build_card(mode=settings.mode, metrics=metrics, data=data, model=model, precision=precision,
                      runtime=runtime)


def _versions() -> dict[str, Optional[str]]:
    from gsqbench.results import package_versions

    return package_versions()


def _facts(state: _PassState, ids: list[str], quantizer: Any) -> Facts:
    return Facts(n_images=len(ids), tokens_per_group=len(ids) * (state.tokens_per_image or 0),
                 codebook_size=getattr(quantizer, "codebook_size", None), groups=getattr(quantizer, "groups", None))


def _fingerprint_fields(tokenizer: nn.Module, dataset: Any, settings: EvalSettings,
                        metrics: Sequence[Metric]) -> dict[str, Any]:
    """What a saved evaluation state must have been made with to be resumed (gsqbench.eval_resume)."""
    from gsqbench.eval_resume import module_digest

    runtime = {"progress", "num_workers", "checkpoint_every"}  # never change results
    return {"settings": {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
                         if f.name not in runtime},
            "data": dataset_fields(dataset), "metrics": [type(m).__name__ for m in metrics],
            "model": module_digest(tokenizer), "world_size": ddp.world_size(), "rank": ddp.rank()}


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

    Every image is read and decoded once: real-side reference statistics on a cache miss come from the same pass.
    With `out_dir` the pass is resumable: its state is saved under `out_dir/.eval-state/` (every
    `settings.checkpoint_every` batches) and a killed evaluation of the same model, data and settings continues
    from there; the state is removed once the evaluation completes. `metrics` replaces the default metric
    objects (tests, custom extractors); `model_info` adds card fields such as checkpoint_sha256, step,
    tokenizer_spec_hash, fairness_hash.
    """
    from gsqbench.eval_resume import EvalCheckpoint

    device = torch.device(device)
    check_required_weights(settings.require)
    torch.manual_seed(settings.seed)
    meter = CostMeter(device)
    out = Path(out_dir) if out_dir is not None else None
    exporter = _exporter(settings, out)
    if metrics is None:
        reference = _reference_fields(dataset, settings) if _needs_reference(settings) else None
        metrics = build_metrics(settings, device, tokenizer, reference, meter, out)
    metrics = list(metrics)
    _check_inputs(metrics, settings.mode)
    # the image export keeps no saveable state: with --save-recon the evaluation runs without checkpoints
    checkpoint = EvalCheckpoint(out, 0 if exporter is not None else settings.checkpoint_every, metrics,
                                lambda: _fingerprint_fields(tokenizer, dataset, settings, metrics))
    state = _PassState(exporter=exporter)
    try:
        with torch.no_grad(), pinned_model(tokenizer, settings.lookup_mode, get_mode(settings.mode).tf32):
            restored = checkpoint.restore(metrics)
            if restored is not None:
                state = _PassState.from_dict(restored)
                state.resumed_at_image, state.exporter = state.images_read, exporter
            from gsqbench.data import resolve_num_workers

            state.num_workers = resolve_num_workers(settings.num_workers, dataset, settings.batch_size)
            n = _run_pass(tokenizer, dataset, settings, metrics, device, out, meter, state, checkpoint)
            skipped, smaller = _agree_on_problems(dataset, state)
            ids, originals_hash = _gather_ids(state, n - len(skipped))
            if any(getattr(m, "reference_stats", False) for m in metrics):
                _complete_references(metrics, _reference_fields(dataset, settings, ids, originals_hash), dataset,
                                     settings, device, state)
            for metric in metrics:
                with _timed(state, f"sync:{type(metric).__name__}", device):
                    metric.sync()
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
    data = _data_card(dataset, ids, originals_hash, skipped, smaller)
    card = _card(tokenizer, settings, metrics, data, rows, device, model_info or {}, state)
    checkpoint.finish()
    return EvalResult(metrics=rows, per_image=_per_image_table(metrics, ids), code_counts=counts, card=card,
                      card_hash=card["card_hash"], timings=dict(state.timings), samples=list(state.saved))


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics alone (`gsqbench stats`)


def reference_statistics(dataset: Any, settings: EvalSettings, out: str | Path, *,
                         device: torch.device | str) -> dict[str, Any]:
    """Real-side FID statistics of `dataset` with the complete key `--fid-reference-stats` verifies, written to
    `out` (rank 0; every rank reads its shard). Needs the Inception weights. Returns the key fields and N."""
    from gsqbench.metrics.fid import FIDMetric

    device = torch.device(device)
    check_required_weights(("rfid@inception",))
    metric = FIDMetric(device, required=True)
    state = _PassState()
    from tqdm import tqdm

    with torch.no_grad():
        batches, n = _batches(dataset, settings, device)
        bar = tqdm(total=len(_shard(n)), unit="img", desc="statistics",
                   disable=None if settings.progress and ddp.is_main() else True)
        for batch in batches:
            bar.update(len(batch))
            if batch.problems:
                _note_problems(dataset, batch.problems, state)
            if batch.images is None:
                continue
            state.image_digests += [_image_digest(i, im) for i, im in zip(batch.ids, batch.images)]
            state.ids += batch.ids
            metric.update_real(_real_side(batch.images.to(device), settings.mode), batch.ids)
        bar.close()
        skipped, _ = _agree_on_problems(dataset, state)
        ids, originals_hash = _gather_ids(state, n - len(skipped))
        metric.real.sync()
    fields = _reference_fields(dataset, settings, ids, originals_hash)
    if ddp.is_main():
        metric.export_reference(out, fields)
    return {**metric.key, "key_sha256": metric.key_sha, "n_images": len(ids), "skipped": len(skipped)}
