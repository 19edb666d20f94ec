"""The quantizer contract (QuantizerOutput, Quantizer protocol) and the math every quantizer shares.

Shared math: L2 normalisation with `F.normalize` semantics (as in the official GSQ code), the
straight-through estimator, and a chunked nearest-code search that never materialises the N×V
distance matrix, so V = 262,144 fits on one machine (spec gsq-reference.md §2.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

LookupPrecision = Literal["fp32", "bf16"]


@dataclass
class QuantizerOutput:
    """What every quantizer returns. The harness, not the quantizer, derives usage/perplexity from `indices`."""

    z_q: Tensor  # (b, c, h, w) straight-through quantized latent, same shape/dtype as the input
    indices: Tensor  # (b, h, w, g) int64 in [0, codebook_size); g = 1 when ungrouped
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted scalar aux losses
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for training logs only


@runtime_checkable
class Quantizer(Protocol):
    """An nn.Module mapping a (b, dim, h, w) latent to a QuantizerOutput."""

    dim: int  # channels the quantizer consumes and produces
    codebook_size: int  # V per group (for FSQ/LFQ the implicit codebook size)
    groups: int  # G: index tuples per position

    def forward(self, z: Tensor) -> QuantizerOutput: ...

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(b, h, w, g) int64 -> (b, dim, h, w); exact inverse of forward's z_q in eval mode."""
        ...


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """x / max(||x||_2, eps), i.e. F.normalize semantics as used by the official code."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Forward value q, gradient flows to x unchanged."""
    return x + (q - x).detach()


def _block_distances(x: Tensor, x_sq: Tensor, codes: Tensor, c_sq: Tensor, precision: LookupPrecision) -> Tensor:
    """Expanded squared distance ||x||² + ||c||² − 2⟨x, c⟩ for one (rows × codes) block, in fp32.

    precision="bf16" reproduces the official lookup under bf16 autocast: the norms are fp32 but the
    matmul runs and rounds in bf16 before the fp32 subtraction (spec §2.3).
    """
    if precision == "bf16":
        dot = (x.to(torch.bfloat16) @ codes.to(torch.bfloat16).T).float()
        return (x_sq[:, None] + c_sq[None, :]) - 2.0 * dot
    return torch.addmm(x_sq[:, None] + c_sq[None, :], x, codes.T, beta=1.0, alpha=-2.0)


@torch.no_grad()
def nearest_code(
    x: Tensor,
    codebook: Tensor,
    *,
    precision: LookupPrecision = "fp32",
    block_elems: int = 1 << 22,
    max_codes_per_block: int = 1 << 16,
) -> Tensor:
    """argmin_v ||x_i − c_v||² over a codebook, computed in blocks; ties resolve to the lowest index.

    x: (n, d); codebook: (v, d). Returns int64 (n,). Peak extra memory is about `block_elems` floats,
    independent of n·v. Runs outside autocast so fp32 stays fp32 inside bf16 training.
    """
    n, v = x.shape[0], codebook.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        codebook = codebook.float()
        x_sq = (x * x).sum(dim=1)
        c_sq = (codebook * codebook).sum(dim=1)
        codes_per_block = min(v, max_codes_per_block)
        rows_per_block = max(1, block_elems // codes_per_block)
        best_idx = torch.empty(n, dtype=torch.long, device=x.device)
        for r0 in range(0, n, rows_per_block):
            rows = slice(r0, min(n, r0 + rows_per_block))
            best_val = None
            for c0 in range(0, v, codes_per_block):
                cols = slice(c0, min(v, c0 + codes_per_block))
                dist = _block_distances(x[rows], x_sq[rows], codebook[cols], c_sq[cols], precision)
                val, idx = dist.min(dim=1)  # first index among exact ties within the block
                idx += c0
                if best_val is None:
                    best_val, best_arg = val, idx
                else:
                    better = val < best_val  # strict: an earlier block wins exact ties
                    best_val = torch.where(better, val, best_val)
                    best_arg = torch.where(better, idx, best_arg)
            best_idx[rows] = best_arg
    return best_idx


def to_channels_last_groups(z: Tensor, groups: int) -> Tensor:
    """(b, g·d, h, w) -> (b, h, w, g, d): contiguous group-major channel split, as in the official code."""
    b, c, h, w = z.shape
    assert c % groups == 0, f"channels {c} not divisible by groups {groups}"
    return z.permute(0, 2, 3, 1).reshape(b, h, w, groups, c // groups)


def from_channels_last_groups(q: Tensor) -> Tensor:
    """(b, h, w, g, d) -> (b, g·d, h, w)."""
    b, h, w, g, d = q.shape
    return q.reshape(b, h, w, g * d).permute(0, 3, 1, 2).contiguous()
