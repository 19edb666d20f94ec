"""Cost metrics: parameter counts, encode/decode throughput, peak memory, and the rate of the token stream.

Rate follows the GSQ paper's accounting: bits per token = G·log2 V (G index tuples per position, V entries per
group), bits per image = tokens per image × bits per token, compression ratio = 24·H·W / bits per image
(24 bits per RGB pixel). Timings use wall clock with CUDA synchronisation; under DDP throughput is
total images / slowest rank's time, and peak memory is the maximum over ranks.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from gsqbench import distributed as ddp
from gsqbench.metrics.base import Direction, Metric, MetricContext, MetricValue
from gsqbench.registry import register_metric

DIRECTIONS: dict[str, Direction] = {
    "params": "none", "params_quantizer": "none", "encode_images_per_s": "higher", "decode_images_per_s": "higher",
    "peak_memory_mb": "lower", "bits_per_token": "none", "bits_per_image": "none", "compression_ratio": "none",
}
KEYS = tuple(DIRECTIONS)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bits_per_token(groups: int, codebook_size: int) -> float:
    return groups * math.log2(codebook_size)


def bits_per_image(tokens_per_image: int, groups: int, codebook_size: int) -> float:
    """`tokens_per_image` counts spatial positions (h·w); each carries G indices."""
    return tokens_per_image * bits_per_token(groups, codebook_size)


def compression_ratio(height: int, width: int, bits: float) -> float:
    return 24.0 * height * width / bits


def _rss_high_water_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the process high-water mark (not resettable).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class CostMeter:
    """Accumulates encode/decode wall time and images during the evaluation pass."""

    device: torch.device
    encode_s: float = 0.0
    decode_s: float = 0.0
    images: int = 0

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        """Time one stage ('encode' or 'decode'); synchronises CUDA on both sides so kernels are counted."""
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        dt = time.perf_counter() - t0
        if stage == "encode":
            self.encode_s += dt
        else:
            self.decode_s += dt

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _rss_high_water_mb()

    def values(
        self,
        tokenizer: nn.Module,
        *,
        image_hw: Optional[tuple[int, int]],
        tokens_per_image: Optional[int],
    ) -> list[MetricValue]:
        """Rows for all cost keys; sums images and takes the slowest rank's time under DDP."""
        imgs = int(ddp.all_reduce_sum(torch.tensor([self.images], dtype=torch.int64)).item())
        times = ddp.all_reduce_max(torch.tensor([self.encode_s, self.decode_s], dtype=torch.float64))
        mem = float(ddp.all_reduce_max(torch.tensor([self.peak_memory_mb()], dtype=torch.float64)).item())
        quantizer = getattr(tokenizer, "quantizer", None)
        rows = [
            MetricValue("params", float(count_params(tokenizer)), direction="none"),
            MetricValue("params_quantizer", float(count_params(quantizer)) if quantizer is not None else 0.0,
                        direction="none"),
            _rate("encode_images_per_s", imgs, float(times[0])),
            _rate("decode_images_per_s", imgs, float(times[1])),
            MetricValue("peak_memory_mb", mem, direction="lower"),
        ]
        return rows + rate_values(quantizer, image_hw, tokens_per_image)


def _rate(name: str, images: int, seconds: float) -> MetricValue:
    if images == 0 or seconds <= 0:
        return MetricValue.missing(name, "no images timed", "higher")
    return MetricValue(name, images / seconds, direction="higher", n=images)


def rate_values(quantizer: Optional[nn.Module], image_hw: Optional[tuple[int, int]],
                tokens_per_image: Optional[int]) -> list[MetricValue]:
    """bits_per_token, bits_per_image, compression_ratio from the quantizer's G and V and the token grid."""
    groups = getattr(quantizer, "groups", None)
    size = getattr(quantizer, "codebook_size", None)
    if not groups or not size or not tokens_per_image or not image_hw:
        reason = "quantizer has no groups/codebook_size or no images were evaluated"
        return [MetricValue.missing(k, reason) for k in ("bits_per_token", "bits_per_image", "compression_ratio")]
    bpt = bits_per_token(int(groups), int(size))
    bpi = bits_per_image(tokens_per_image, int(groups), int(size))
    return [
        MetricValue("bits_per_token", bpt, direction="none"),
        MetricValue("bits_per_image", bpi, direction="none"),
        MetricValue("compression_ratio", compression_ratio(image_hw[0], image_hw[1], bpi), direction="none"),
    ]


@register_metric("cost")
class CostMetric(Metric):
    """Parameters, encode/decode images/s, peak memory, and bits per token/image with the compression ratio.

    Timings come from the evaluator's CostMeter, which wraps encode and decode."""

    family, card_group = "cost", ""
    outputs = DIRECTIONS
    deterministic = False

    def __init__(self, tokenizer: nn.Module, meter: CostMeter) -> None:
        self.tokenizer, self.meter = tokenizer, meter
        self.image_hw: Optional[tuple[int, int]] = None
        self.tokens_per_image: Optional[int] = None

    @classmethod
    def create(cls, ctx: MetricContext) -> Optional["CostMetric"]:
        return cls(ctx.tokenizer, ctx.meter) if ctx.tokenizer is not None and ctx.meter is not None else None

    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        self.meter.images += len(image_ids)
        self.image_hw = (int(real_u8.shape[-2]), int(real_u8.shape[-1]))
        if qout is not None:
            self.tokens_per_image = int(qout.indices.shape[1] * qout.indices.shape[2])

    def state_dict(self) -> dict:
        """The meter's timings so far (measurements, not a function of the images) and the image geometry."""
        m = self.meter
        return {"encode_s": m.encode_s, "decode_s": m.decode_s, "images": m.images,
                "image_hw": list(self.image_hw) if self.image_hw else None, "tokens_per_image": self.tokens_per_image}

    def load_state_dict(self, state) -> None:
        m = self.meter
        m.encode_s, m.decode_s, m.images = float(state["encode_s"]), float(state["decode_s"]), int(state["images"])
        self.image_hw = tuple(state["image_hw"]) if state["image_hw"] else None
        self.tokens_per_image = state["tokens_per_image"]

    def compute(self) -> list[MetricValue]:
        return self.meter.values(self.tokenizer, image_hw=self.image_hw, tokens_per_image=self.tokens_per_image)
