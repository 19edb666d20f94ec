"""Building blocks shared by the published VQGAN-family tokenizers (taming, LlamaGen, MaskGIT, Open-MAGVIT2).

All four descend from the taming-transformers encoder/decoder (CompVis/taming-transformers
`taming/modules/diffusionmodules/model.py`): pre-activation ResBlocks (GroupNorm(32, eps=1e-6) → swish → 3×3
conv, twice) with a 1×1 `nin_shortcut` when the width changes, single-head spatial self-attention with 1×1
`q`/`k`/`v`/`proj_out`, nearest-neighbour ×2 upsampling followed by a 3×3 conv, and strided-conv downsampling
after an asymmetric (right/bottom) zero pad. Attribute names are the upstream ones so the released state dicts
load without a rename table. Where an upstream deviates (bias-free convs in Open-MAGVIT2 and MaskGIT, MaskGIT's
shortcut applied to the block output), the deviation is a constructor flag here, named after what it does.

Also here: `CodebookVQ`, the nearest-code quantizer with an `embedding` table that taming, LlamaGen and MaskGIT
share (LlamaGen's variant l2-normalises latents and codes), implementing gsqbench's quantizer contract
(docs/contracts.md "Quantizers").
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.quantizer import QuantizerBase, QuantizerOutput, l2norm, nearest_code, straight_through

GN_EPS = 1e-6  # every GroupNorm in the taming family: nn.GroupNorm(32, C, eps=1e-6, affine=True)
GN_GROUPS = 32

# The lookup precision gsqbench.quantizer.nearest_code uses when none is given; read from its signature so a
# change of the library default reaches these quantizers too.
DEFAULT_LOOKUP_PRECISION = inspect.signature(nearest_code).parameters["precision"].default


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS, affine=affine)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 → norm2 → swish → (dropout, identity at eval) → conv2, plus the shortcut.

    bias: whether the 3×3 convs and the shortcut carry a bias (taming/LlamaGen yes; Open-MAGVIT2, MaskGIT no).
    shortcut_on_output: MaskGIT's port (1d-tokenizer `maskgit_vqgan.py`) computes the width-changing
    shortcut as `nin_shortcut(h)` on the residual branch's OUTPUT, with a (C_out → C_out) 1×1 conv, instead of
    on the block input. Released weights were trained that way, so it is reproduced, not fixed.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True,
                 shortcut_on_output: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.shortcut_on_output = shortcut_on_output
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        if in_channels != out_channels:
            shortcut_in = out_channels if shortcut_on_output else in_channels
            self.nin_shortcut = nn.Conv2d(shortcut_in, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels == self.out_channels:
            return x + h
        return h + self.nin_shortcut(h if self.shortcut_on_output else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions: x + proj_out(softmax(qᵀk / √C) applied to v)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        k = self.k(n).reshape(b, c, h * w)  # (b, c, hw)
        v = self.v(n).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # (b, hw_query, hw_key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (`resamp_with_conv=True`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Zero pad one row/column at the bottom/right, then a 3×3 stride-2 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class CodebookVQ(QuantizerBase):
    """Nearest-code vector quantizer over an `embedding` table (V, d), ungrouped (G = 1).

    l2_norm=False (taming `VectorQuantizer2`, MaskGIT `VectorQuantizer`): argmin ‖z − e‖² over the raw rows,
    z_q = e[idx]. l2_norm=True (LlamaGen `VectorQuantizer`, `codebook_l2_norm=True`): latents and rows are
    l2-normalised (F.normalize, eps 1e-12) before the search and z_q is the NORMALISED row, as LlamaGen's
    `get_codebook_entry` returns it. The search runs through gsqbench.quantizer.nearest_code (first index on
    exact ties); `lookup_precision` defaults to that function's default.

    z_q is the code value exactly (forward value of the straight-through estimator), so
    `indices_to_codes(indices)` reproduces it bit for bit; the upstreams' `z + (z_q − z).detach()` can differ
    from the code by an ulp.
    """

    def __init__(self, codebook_size: int, dim: int, *, l2_norm: bool = False,
                 lookup_precision: str | None = None) -> None:
        super().__init__()
        self.codebook_size, self.dim, self.groups = int(codebook_size), int(dim), 1
        self.l2_norm = bool(l2_norm)
        self.lookup_precision = lookup_precision or DEFAULT_LOOKUP_PRECISION
        self.embedding = nn.Embedding(self.codebook_size, self.dim)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, l2_norm={self.l2_norm}"

    def codes(self) -> Tensor:
        """The rows z_q is taken from: the table, l2-normalised when `l2_norm`."""
        weight = self.embedding.weight
        return l2norm(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"quantizer expects a (b, {self.dim}, h, w) latent, got shape {tuple(z.shape)}")
        b, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        if self.l2_norm:
            flat = l2norm(flat, dim=-1)
        codes = self.codes()
        idx = nearest_code(flat.detach(), codes.detach(), precision=self.lookup_precision)
        q = codes[idx].to(z.dtype)
        z_q = straight_through(flat, q).view(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(z_q, idx.view(b, h, w, 1))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        if indices.ndim != 4 or indices.shape[-1] != 1:
            raise ValueError(f"indices must be (b, h, w, 1), got shape {tuple(indices.shape)}")
        return self.codes()[indices[..., 0]].permute(0, 3, 1, 2).contiguous()
