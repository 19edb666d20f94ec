"""The image conversions of the evaluation modes (gsqbench.modes), one function per named rule.

Per batch an evaluation makes the model input from the uint8 crops, runs the model, and hands every metric a
(real, fake) pair converted once (metrics-protocol.md §1). The pinned protocol uses x = u8/127.5 − 1 and
round-half-even; a compatibility mode reproduces an upstream evaluation's own conversions, which are named in its
`EvalMode` and implemented here:

model input
- `u8/127.5-1`: gsqbench's (gsqbench.data.to_model_input).
- `normalize`: torchvision ToTensor then Normalize(0.5, 0.5) in fp32: (u8/255 − 0.5)/0.5 (GSQ, LlamaGen).
real side (uint8)
- `as-read`: the crop itself.
- `trunc`: the model input back to uint8 by truncation, trunc(255·clamp(0.5·clamp(x, −1, 1) + 0.5, 0, 1)) in fp32
  (GSQ's Normalize round trip, Open-MAGVIT2's `(x + 1)/2 · 255 → uint8`): a level can be lost.
- `trunc-u8-over-255`: trunc(fl(fl(u8/255)·255)) (1d-tokenizer's `(x*255).to(torch.uint8)` on ToTensor output).
fake side (uint8), from the unclamped reconstruction x̂ in [−1, 1] convention
- `round-half-even`: gsqbench's rule (clamp, round-half-even((x̂ + 1)·127.5)).
- `trunc`: trunc(255·clamp(0.5·clamp(x̂, −1, 1) + 0.5, 0, 1)) in fp32 (Open-MAGVIT2, taming's ImageLogger).
- `trunc-bf16`: the same with every step in bf16 (official GSQ, its decoder ran under bf16 autocast).
- `round-half-up`: clamp(127.5·x̂ + 128, 0, 255) cast to uint8 = floor(127.5·(x̂ + 1) + 0.5) (LlamaGen).
- `round-then-trunc`: y = clamp((x̂ + 1)/2, 0, 1), r = round(255·y)/255, then trunc(255·r) (1d-tokenizer).
float pair (`fid_input: float01`): real (x + 1)/2 of the model input and fake (clamp(x̂, −1, 1) + 1)/2, fp32, never
rounded (Open-MAGVIT2 feeds these to pytorch-fid's Inception).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from gsqbench.data import to_model_input
from gsqbench.modes import EvalMode, get_mode

Pair = tuple[Tensor, Tensor]


def _normalize(real_u8: Tensor) -> Tensor:
    return (real_u8.float().div(255.0) - 0.5) / 0.5


def _trunc01(x: Tensor) -> Tensor:
    """trunc(255·clamp(0.5·clamp(x, −1, 1) + 0.5, 0, 1)) in x's float dtype (float → uint8 casts truncate)."""
    x01 = (x.clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)
    return (x01 * 255).to(torch.uint8)


def _round_half_even(x_hat: Tensor) -> Tensor:
    return torch.round((x_hat.float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)


def _round_half_up(x_hat: Tensor) -> Tensor:
    return torch.clamp(127.5 * x_hat.float() + 128.0, 0, 255).to(torch.uint8)


def _round_then_trunc(x_hat: Tensor) -> Tensor:
    y = ((x_hat.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (torch.round(y * 255.0) / 255.0 * 255.0).to(torch.uint8)


MODEL_INPUT: dict[str, Callable[[Tensor], Tensor]] = {"u8/127.5-1": to_model_input, "normalize": _normalize}
REAL_UINT8: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "as-read": lambda u8, x: u8,
    "trunc": lambda u8, x: _trunc01(x.float()),
    "trunc-u8-over-255": lambda u8, x: (u8.float() / 255.0 * 255.0).to(torch.uint8),
}
FAKE_UINT8: dict[str, Callable[[Tensor], Tensor]] = {
    "round-half-even": _round_half_even,
    "trunc": lambda x_hat: _trunc01(x_hat.float()),
    "trunc-bf16": lambda x_hat: _trunc01(x_hat.to(torch.bfloat16)),
    "round-half-up": _round_half_up,
    "round-then-trunc": _round_then_trunc,
}


def model_input(mode: str | EvalMode, real_u8: Tensor) -> Tensor:
    """The model input of `mode` from the uint8 crops."""
    m = get_mode(mode) if isinstance(mode, str) else mode
    return MODEL_INPUT[m.model_input](real_u8)


def real_uint8(mode: str | EvalMode, real_u8: Tensor) -> Tensor:
    """The real side `mode`'s metrics see (for reference statistics read without the model)."""
    m = get_mode(mode) if isinstance(mode, str) else mode
    return REAL_UINT8[m.real_uint8](real_u8, model_input(m, real_u8))


def float_pair(x_in: Tensor, x_hat: Tensor) -> Pair:
    """The never-rounded float [0, 1] pair: (x + 1)/2 of the model input, (clamp(x̂, −1, 1) + 1)/2 (fp32)."""
    return (x_in.float() + 1.0) / 2.0, (x_hat.float().clamp(-1.0, 1.0) + 1.0) / 2.0


def convert(mode: str | EvalMode, real_u8: Tensor, x_hat: Tensor, x_in: Tensor) -> dict[str, Pair]:
    """Every (real, fake) pair `mode` hands its metrics, keyed by metric input kind: `uint8` always, `float01` when
    the mode's Inception reads floats. Each side is converted once per batch."""
    m = get_mode(mode) if isinstance(mode, str) else mode
    pairs = {"uint8": (REAL_UINT8[m.real_uint8](real_u8, x_in), FAKE_UINT8[m.fake_uint8](x_hat))}
    if m.fid_input == "float01":
        pairs["float01"] = float_pair(x_in, x_hat)
    return pairs
