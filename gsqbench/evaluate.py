"""One streaming evaluation pass: every metric sees the same (real_u8, fake_u8, ids, qout), converted once.

Follows metrics-protocol.md §1 (uint8 rule), §9 (model state), §10 (sharding) and §14 (gsq-compat). Per batch:
x = u8/127.5 − 1 → encode (timed) → decode (timed) → clamp → uint8 once (round-half-even; or the official
truncation rules in `gsq-compat`, incl. the real-side Normalize round trip and bf16 autocast for the model) →
every metric's `update`. Under torch.distributed each rank evaluates its own shard (each image exactly once, no
padding), metrics `sync()`, and rank 0 gets the full result, equal to a single-process run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gsqbench import distributed as ddp
from gsqbench.card import build_card, id_list_hash
from gsqbench.errors import UserError, did_you_mean
from gsqbench.io import atomic_write_bytes, safe_child, safe_name
from gsqbench.metrics.base import Metric, MetricValue
from gsqbench.metrics.cost import CostMeter

log = logging.getLogger(__name__)

Mode = Literal["gsqbench", "gsq-compat"]

#: metric key → family (the module that computes it); evaluate() itself adds code_agreement and the cost keys
METRIC_FAMILIES: dict[str, str] = {
    "psnr": "pixel", "psnr_pooled": "pixel", "ssim": "pixel",
    "lpips@alex": "lpips", "lpips@vgg": "lpips",
    "rfid@inception": "fid", "is@inception": "fid",
    **{k: "codebook" for k in (
        "usage_pooled", "usage_group_mean", "usage_group_min", "usage_group_max", "usage_product", "ppl_pooled",
        "ppl_group_mean", "entropy_bits", "entropy_norm", "dead_codes", "tokens_counted", "code_agreement")},
    **{k: "cost" for k in (
        "params", "params_quantizer", "encode_images_per_s", "decode_images_per_s", "peak_memory_mb",
        "bits_per_token", "bits_per_image", "compression_ratio")},
}
FAMILIES = ("pixel", "lpips", "fid", "codebook", "cost")
#: weight files a metric key cannot do without (checked up front when the key is required)
REQUIRED_WEIGHTS: dict[str, str] = {
    "rfid@inception": "inception-fid", "is@inception": "inception-fid",
    "lpips@alex": "alexnet", "lpips@vgg": "vgg16",
}


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. `metrics` lists families or metric keys (empty = all); `require` lists metric keys that
    must not come out unavailable (UserError, exit 2, otherwise)."""

    mode: Mode = "gsqbench"
    batch_size: int = 16
    metrics: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    samples: int = 8  # first k (real, recon) pairs saved as PNG under out_dir/samples
    fid_reference_stats: Optional[str] = None  # real-side statistics file (the FID metric verifies its key)
    fid_cache_dir: Optional[str] = None  # cache real-side statistics here, keyed by data + extractor (§6)
    seed: int = 0
    precision: Optional[Literal["fp32", "bf16"]] = None  # model precision; None = mode default (fp32 / bf16)
    weights: Literal["ema", "raw"] = "ema"  # which weights the caller loaded (recorded in the card)
    lpips_nets: tuple[str, ...] = ("alex", "vgg")
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
        for name in self.metrics:
            if name not in FAMILIES and name not in METRIC_FAMILIES:
                raise UserError(f"eval.metrics: unknown metric '{name}'{did_you_mean(name, [*FAMILIES, *METRIC_FAMILIES])}")
        for key in self.require:
            if key not in METRIC_FAMILIES:
                raise UserError(f"--require: unknown metric '{key}'{did_you_mean(key, METRIC_FAMILIES)}")
        for net in self.lpips_nets:
            _check_choice("lpips_nets", net, ("alex", "vgg"))

    @property
    def model_precision(self) -> str:
        return self.precision or ("bf16" if self.mode == "gsq-compat" else "fp32")

    def families(self) -> tuple[str, ...]:
        """Families to compute: all when `metrics` is empty, else those named (directly or via a key) or required."""
        if not self.metrics:
            return FAMILIES
        wanted = {METRIC_FAMILIES.get(m, m) for m in (*self.metrics, *self.require)}
        return tuple(f for f in FAMILIES if f in wanted)


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


def to_model_input(real_u8: Tensor) -> Tensor:
    """Canonical model input x = u8/127.5 − 1 (fp32)."""
    return real_u8.float() / 127.5 - 1.0


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
    x01 = (x.float().clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)
    return (x01 * 255).to(torch.uint8)  # float → uint8 casts truncate toward zero


def compat_fake_uint8(x_hat: Tensor) -> Tensor:
    """Official fake side: the same truncation on the bf16 decoder output, every step rounded in bf16."""
    x01 = (x_hat.to(torch.bfloat16).clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)
    return (x01 * 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Metric construction


def build_metrics(settings: EvalSettings, device: torch.device, tokenizer: Optional[nn.Module] = None,
                  fid_reference: Optional[Mapping[str, Any]] = None) -> list[Metric]:
    """The metric objects for the selected families (cost and code agreement are handled by evaluate itself).

    The codebook metric is sized from `tokenizer.quantizer` (V cannot be inferred from the indices seen);
    `fid_reference` holds the data key fields that FID reference statistics are verified / cached under.
    A metric whose weights are missing comes back unavailable (reason + fix command) unless it is required.
    """
    families = settings.families()
    required = set(settings.require)
    metrics: list[Metric] = []
    if "pixel" in families:
        from gsqbench.metrics.pixel import PSNRMetric, SSIMMetric

        metrics += [PSNRMetric(), SSIMMetric()]
    if "lpips" in families:
        from gsqbench.metrics.lpips import LPIPSMetric

        metrics += [LPIPSMetric(net, device, required=f"lpips@{net}" in required) for net in settings.lpips_nets]
    if "fid" in families:
        from gsqbench.metrics.fid import FIDMetric

        metrics.append(FIDMetric(device, required=bool(required & {"rfid@inception", "is@inception"}),
                                 reference=fid_reference, cache_dir=settings.fid_cache_dir,
                                 reference_stats=settings.fid_reference_stats))
    quantizer = getattr(tokenizer, "quantizer", None)
    if "codebook" in families and quantizer is not None:
        from gsqbench.metrics.codebook import CodebookMetric

        metrics.append(CodebookMetric.for_quantizer(quantizer, device))
    return metrics


def check_required_weights(require: Sequence[str]) -> None:
    """Fail before any compute when a required metric's weights are missing (one line, exit 2)."""
    from gsqbench.weights import WeightsUnavailable, weight_path

    for key in require:
        name = REQUIRED_WEIGHTS.get(key)
        if name is None:
            continue
        try:
            weight_path(name)
        except WeightsUnavailable as exc:
            raise UserError(f"required metric '{key}' is unavailable: {exc}") from None


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
    old_lookup = getattr(quantizer, "lookup_precision", None)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if old_lookup is not None:
        quantizer.lookup_precision = "bf16" if settings.mode == "gsq-compat" else "fp32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if old_lookup is not None:
            quantizer.lookup_precision = old_lookup


class _QuantizerInput:
    """Captures the latent the quantizer sees (forward pre-hook), for the fp32-vs-bf16 code agreement."""

    def __init__(self, quantizer: nn.Module):
        self.z: Optional[Tensor] = None
        self.handle = quantizer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.z = args[0].detach()


def _code_agreement(quantizer: nn.Module, z: Tensor, indices: Tensor) -> tuple[int, int]:
    """(tokens whose code is the same under the other lookup precision, tokens)."""
    current = quantizer.lookup_precision
    quantizer.lookup_precision = "bf16" if current == "fp32" else "fp32"
    try:
        other = quantizer(z).indices
    finally:
        quantizer.lookup_precision = current
    return int((other == indices).sum()), int(indices.numel())


# ---------------------------------------------------------------------------------------------------------------
# The pass


@dataclass
class _PassState:
    ids: list[str] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    agree: int = 0
    agree_total: int = 0
    tokens_per_image: Optional[int] = None
    image_hw: Optional[tuple[int, int]] = None
    saved: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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


def _convert(real_u8: Tensor, x_hat: Tensor, x_in: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    if mode == "gsq-compat":
        return compat_real_uint8(x_in), compat_fake_uint8(x_hat)
    return real_u8, to_uint8(x_hat)


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
    from PIL import Image

    for j, (g, image_id) in enumerate(zip(gidx, ids)):
        if g >= k:
            continue
        for side, t in (("real", real[j]), ("recon", fake[j])):
            buf = io.BytesIO()
            Image.fromarray(t.permute(1, 2, 0).contiguous().cpu().numpy(), mode="RGB").save(buf, format="PNG")
            atomic_write_bytes(safe_child(out_dir, "samples", side, safe_name(image_id) + ".png"), buf.getvalue())
        state.saved.append(image_id)


def _image_digest(image_id: str, image: Tensor) -> str:
    h = hashlib.sha256(image_id.encode("utf-8") + b"\0")
    h.update(image.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _run_pass(tokenizer: nn.Module, dataset: Any, settings: EvalSettings, metrics: Sequence[Metric],
              device: torch.device, out_dir: Optional[Path], meter: CostMeter) -> tuple[_PassState, int]:
    state = _PassState()
    quantizer = getattr(tokenizer, "quantizer", None)
    agreement = hasattr(quantizer, "lookup_precision") and "codebook" in settings.families()
    capture = _QuantizerInput(quantizer) if agreement else None
    batches, n = _batches(dataset, settings, device)
    from tqdm import tqdm

    bar = tqdm(total=len(_shard(n)), unit="img", desc="evaluate",
              disable=None if settings.progress and ddp.is_main() else True)  # None: off when not a terminal
    try:
        while True:
            with _timed(state, "data", device):
                batch = next(batches, None)
            if batch is None:
                break
            gidx, ids, real_cpu = batch
            state.image_digests += [_image_digest(i, im) for i, im in zip(ids, real_cpu)]  # before the copy
            real_u8 = real_cpu.to(device, non_blocking=True)
            _one_batch(tokenizer, settings, metrics, device, out_dir, meter, state, capture, gidx, ids, real_u8)
            bar.update(len(ids))
    finally:
        bar.close()
        if capture is not None:
            capture.handle.remove()
    return state, n


def _one_batch(tokenizer, settings, metrics, device, out_dir, meter, state, capture, gidx, ids, real_u8) -> None:
    with _timed(state, "convert", device):
        x = compat_model_input(real_u8) if settings.mode == "gsq-compat" else to_model_input(real_u8)
    with _timed(state, "model", device):
        qout, x_hat = _model_step(tokenizer, x, settings, meter, device)
    with _timed(state, "convert", device):
        real_eval, fake_eval = _convert(real_u8, x_hat, x, settings.mode)
    for metric in metrics:
        with _timed(state, f"metric:{type(metric).__name__}", device):
            metric.update(real_eval, fake_eval, ids, qout)
    if capture is not None and capture.z is not None:
        with _timed(state, "code_agreement", device):
            a, t = _code_agreement(tokenizer.quantizer, capture.z, qout.indices)
        state.agree, state.agree_total = state.agree + a, state.agree_total + t
    meter.images += len(ids)
    state.ids += ids
    state.tokens_per_image = int(qout.indices.shape[1] * qout.indices.shape[2])
    state.image_hw = (int(real_u8.shape[-2]), int(real_u8.shape[-1]))
    if out_dir is not None and settings.samples:
        with _timed(state, "samples", device):
            _save_samples(out_dir, gidx, ids, real_eval, fake_eval, settings.samples, state)


# ---------------------------------------------------------------------------------------------------------------
# After the pass: reduce, assemble


def _fid_reference(dataset: Any, settings: EvalSettings, device: torch.device) -> Optional[dict[str, Any]]:
    """Data key fields for FID reference statistics, only when a statistics file or cache is in use.

    Needs the originals hash before the pass, so it costs one extra read of the (sharded) data then.
    """
    if "fid" not in settings.families() or not (settings.fid_reference_stats or settings.fid_cache_dir):
        return None
    state = _PassState()
    batches, n = _batches(dataset, settings, device)
    for _, ids, real_u8 in batches:
        state.ids += ids
        state.image_digests += [_image_digest(i, im) for i, im in zip(ids, real_u8)]
    ids, originals_hash = _gather_ids(state, n)
    info = _dataset_info(dataset)
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


def _agreement_rows(state: _PassState, quantizer: Any) -> list[MetricValue]:
    """`code_agreement`: fraction of tokens whose code is the same under fp32 and bf16 lookups (int64 sums)."""
    if not hasattr(quantizer, "lookup_precision"):
        return []
    t = ddp.all_reduce_sum(torch.tensor([state.agree, state.agree_total], dtype=torch.int64))
    if int(t[1]) == 0:
        return []
    return [MetricValue("code_agreement", int(t[0]) / int(t[1]), direction="higher", n=int(t[1]))]


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


def _card_group(key: str) -> str:
    """Card group a metric's self-description belongs to: psnr / ssim / lpips / fid / codebook."""
    family = METRIC_FAMILIES.get(key, "metrics")
    return key if family == "pixel" else family


def _metric_card_fields(metrics: Sequence[Metric]) -> dict[str, dict]:
    """Group → fields that metrics describe themselves with (their optional `card()` method)."""
    extra: dict[str, dict] = {}
    for metric in metrics:
        card = getattr(metric, "card", None)
        if callable(card) and metric.keys:
            extra.setdefault(_card_group(metric.keys[0]), {}).update(card())
    return extra


def _check_required(rows: Sequence[MetricValue], require: Sequence[str]) -> None:
    by_name = {m.name: m for m in rows}
    for key in require:
        row = by_name.get(key)
        if row is None:
            raise UserError(f"required metric '{key}' was not computed (select its family in eval.metrics)")
        if row.unavailable:
            raise UserError(f"required metric '{key}' is unavailable: {row.unavailable}")


def _card(tokenizer: nn.Module, settings: EvalSettings, dataset: Any, metrics: Sequence[Metric], ids: list[str],
          originals_hash: str, counts_rows: Sequence[MetricValue], state: _PassState, device: torch.device,
          model_info: Mapping[str, Any]) -> dict:
    quantizer = getattr(tokenizer, "quantizer", None)
    agreement = next((m.value for m in counts_rows if m.name == "code_agreement"), None)
    data = {**_dataset_info(dataset), "N": len(ids), "image_id_list_hash": id_list_hash(ids),
            "originals_hash": originals_hash}
    model = {"weights": settings.weights, "argmin": "first-index", "code_agreement": agreement,
             "lookup_precision": ("bf16" if settings.mode == "gsq-compat" else "fp32")
             if hasattr(quantizer, "lookup_precision") else None, **dict(model_info)}
    precision = {"model": settings.model_precision,
                 "autocast": "bf16" if settings.model_precision == "bf16" else None,
                 "tf32": False, "device": str(device),
                 "driver": torch.version.cuda if device.type == "cuda" else None}
    tokens = None if state.tokens_per_image is None else len(ids) * state.tokens_per_image * int(
        getattr(quantizer, "groups", 1) or 1)
    runtime = {"versions": _versions(), "world_size": ddp.world_size(), "batch_size": settings.batch_size,
               "seed": settings.seed}
    # the groups describe the metrics actually run (a caller may pass its own metric objects)
    families = {METRIC_FAMILIES[k] for m in metrics for k in m.keys if k in METRIC_FAMILIES}
    families |= {f for f in ("cost",) if f in settings.families()}
    return build_card(mode=settings.mode, families=families, data=data, model=model,
                      precision=precision, runtime=runtime, quantizer=quantizer, tokens_counted=tokens,
                      lpips_nets=settings.lpips_nets, extra=_metric_card_fields(metrics))


def _dataset_info(dataset: Any) -> dict[str, Any]:
    """Data fields the dataset describes itself with (`describe()`, gsqbench.data), else its plain attributes."""
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        return dict(describe())
    out = {k: getattr(dataset, k) for k in ("kind", "name", "split", "crop", "size", "path")
           if isinstance(getattr(dataset, k, None), (str, int))}
    from gsqbench.card import CROP_PROTOCOLS

    if out.get("crop") in CROP_PROTOCOLS:
        out.update(CROP_PROTOCOLS[out["crop"]])
    return out


def _versions() -> dict[str, Optional[str]]:
    try:
        from gsqbench.results import package_versions

        return package_versions()
    except ImportError:  # pragma: no cover - results module absent
        return {"torch": torch.__version__}


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
    if metrics is None:
        metrics = build_metrics(settings, device, tokenizer, _fid_reference(dataset, settings, device))
    metrics = list(metrics)
    meter = CostMeter(device)
    out = Path(out_dir) if out_dir is not None else None
    with torch.no_grad(), _eval_state(tokenizer, settings):
        state, n = _run_pass(tokenizer, dataset, settings, metrics, device, out, meter)
        for metric in metrics:
            with _timed(state, f"sync:{type(metric).__name__}", device):
                metric.sync()
        ids, originals_hash = _gather_ids(state, n)
        counts = _code_counts(metrics)
        extra_rows = _agreement_rows(state, getattr(tokenizer, "quantizer", None)) \
            if "codebook" in settings.families() else []
        rows = []
        for metric in metrics:
            with _timed(state, f"compute:{type(metric).__name__}", device):
                rows += metric.compute()
        rows += extra_rows
        if "cost" in settings.families():
            rows += meter.values(tokenizer, image_hw=state.image_hw, tokens_per_image=state.tokens_per_image)
    _check_required(rows, settings.require)
    card = _card(tokenizer, settings, dataset, metrics, ids, originals_hash, extra_rows, state, device,
                 model_info or {})
    return EvalResult(metrics=rows, per_image=_per_image_table(metrics, ids), code_counts=counts, card=card,
                      card_hash=card["card_hash"], timings=dict(state.timings), samples=list(state.saved))
