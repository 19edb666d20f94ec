"""FSQ baseline: finite scalar quantization (Mentzer et al., arXiv 2309.15505, appendix A code), spec
gsq-reference.md §8.3.

Per channel k with L_k levels: bound b = tanh(z + shift)·half_l − offset with half_l = (L−1)(1−ε)/2,
offset = 0.5 for even L, shift = tan(offset/half_l) (the paper's formula, ε = 1e-3); round with
straight-through; divide by ⌊L/2⌋ so codes lie in [−1, 1]. One fused index per position by mixed radix
(channel 0 least significant), codebook_size = Π L_k, no codebook and no aux loss. `codebook_size` may
select a preset by nominal size: the paper's recommended levels (2^10 → [8,5,5,5], whose real size is
1000) plus the project choices 8192 → [8,8,8,4,4] and 262144 → [8,8,8,8,8,8] (exact).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gsqbench.errors import UserError
from gsqbench.quantizer import (
    QuantizerBase, QuantizerOutput, batch_usage, check_channels, check_indices, straight_through,
)
from gsqbench.registry import register_quantizer

LEVEL_PRESETS: dict[int, list[int]] = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**13: [8, 8, 8, 4, 4],  # project choice (no paper row)
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
    2**18: [8, 8, 8, 8, 8, 8],  # project choice (no paper row)
}


def resolve_levels(levels: list[int] | None, dim: int | None, codebook_size: int | None) -> list[int]:
    """Levels from `levels` or a `codebook_size` preset, checked against `dim`, with one-line errors."""
    if levels is None:
        if codebook_size is None:
            raise UserError(f"levels: FSQ needs levels (e.g. [8, 5, 5, 5]) or a preset codebook_size ({sorted(LEVEL_PRESETS)})")
        if codebook_size not in LEVEL_PRESETS:
            raise UserError(f"codebook_size: no FSQ level preset for {codebook_size}; presets: {sorted(LEVEL_PRESETS)}, or give levels")
        # a preset is named by its nominal size; the real V is Π L (2**10 → [8, 5, 5, 5] = 1000)
        levels, codebook_size = LEVEL_PRESETS[codebook_size], None
    levels = list(levels)
    if not levels:
        raise UserError("levels: must not be empty")
    for level in levels:
        if level == 2:
            raise UserError(f"levels: {levels} contains 2 (tan/atanh shift undefined, lopsided levels); use >= 3, or LFQ for binary channels")
        if level < 2:
            raise UserError(f"levels: every level must be an integer >= 3, got {levels}")
    if codebook_size is not None and math.prod(levels) != codebook_size:
        raise UserError(f"codebook_size: {codebook_size} != product of levels {levels} = {math.prod(levels)}")
    if dim is not None and dim != len(levels):
        raise UserError(f"levels: {len(levels)} levels {levels} do not match dim {dim}; FSQ needs one level per channel")
    return levels


@register_quantizer("fsq")
class FiniteScalarQuantizer(QuantizerBase):
    """FSQ (Mentzer et al. 2023): tanh-bounded per-channel rounding to L_k levels, mixed-radix index, no aux loss."""

    def __init__(
        self,
        levels: list[int] | None = None,
        dim: int | None = None,
        codebook_size: int | None = None,
        groups: int = 1,
        commitment_weight: float = 0.0,
        entropy_weight: float = 0.0,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        levels = resolve_levels(levels, dim, codebook_size)
        if groups != 1:
            raise UserError(f"groups: FSQ fuses its channels into one index per position; use groups: 1, got {groups}")
        for name, value in (("commitment_weight", commitment_weight), ("entropy_weight", entropy_weight)):
            if value:
                raise UserError(f"{name}: FSQ has no auxiliary loss, got {value}; use 0")
        self.levels = levels
        self.dim, self.codebook_size, self.groups = len(levels), math.prod(levels), 1
        self.eps = float(eps)
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        half_l = (lv - 1.0) * (1.0 - self.eps) / 2.0
        offset = torch.where(lv.remainder(2) == 0, 0.5, 0.0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_l", half_l, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.tan(offset / half_l), persistent=False)
        self.register_buffer("_half_width", torch.floor(lv / 2.0), persistent=False)

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"levels": [5, 4, 3]}

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    def quantize(self, x: Tensor) -> Tensor:
        """x (…, K) fp32 → rounded level values r ∈ {−⌊L/2⌋ … ⌈L/2⌉−1} with straight-through gradient."""
        bounded = torch.tanh(x + self._shift) * self._half_l - self._offset
        return straight_through(bounded, torch.round(bounded))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (b, K, h, w) → z_q ∈ [−1, 1] (b, K, h, w) in z's dtype, indices (b, h, w, 1) int64."""
        check_channels(z, self.dim)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = z.float().permute(0, 2, 3, 1)  # (b, h, w, K)
            r = self.quantize(x)
            digits = (r.detach() + self._half_width).round().long()  # ∈ {0 … L−1}
            idx = (digits * self._basis).sum(dim=-1, keepdim=True)  # (b, h, w, 1)
            z_q = (r / self._half_width).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        return QuantizerOutput(z_q, idx, {}, {"usage": batch_usage(idx, self.codebook_size)})

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(b, h, w, 1) int64 → centred codes in [−1, 1], (b, K, h, w); exact inverse of forward."""
        check_indices(indices, 1)
        digits = (indices // self._basis) % self._levels.long()  # (b, h, w, K)
        codes = (digits.float() - self._half_width) / self._half_width
        return codes.permute(0, 3, 1, 2).contiguous()
