"""The quantizer contract (QuantizerOutput, Quantizer protocol) and the math every quantizer shares.

Shared math: L2 normalisation with `F.normalize` semantics (as in the official GSQ code), the
straight-through estimator, and the grouped codebook lookup GSQ and VQ share. The nearest-code search itself
(modes exact / fp32-expanded / bf16, never an N×V matrix) lives in `gsqbench.lookup` and is re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.errors import UserError
from gsqbench.lookup import (  # noqa: F401  (re-exported: the quantizer files import them from here)
    DEFAULT_LOOKUP,
    LOOKUP_PRECISIONS,
    LookupPrecision,
    check_lookup_precision,
    nearest_code,
    sample_code,
)


@dataclass
class QuantizerOutput:
    """What every quantizer returns. The harness, not the quantizer, derives usage/perplexity from `indices`."""

    z_q: Tensor  # (b, c, h, w) straight-through quantized latent, z's shape; z's dtype or a wider one (GSQ/VQ: fp32)
    indices: Tensor  # (b, h, w, g) int64 in [0, codebook_size); g = 1 when ungrouped
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted scalar aux losses
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for training logs only


@runtime_checkable
class Quantizer(Protocol):
    """An nn.Module mapping a (b, dim, h, w) latent to a QuantizerOutput (docs/contracts.md "Quantizers")."""

    dim: int  # channels the quantizer consumes and produces
    codebook_size: int  # V per group (for FSQ/LFQ the implicit codebook size)
    groups: int  # G: index tuples per position
    lookup_precision: str | None  # the nearest-code lookup mode, or None for quantizers without a codebook search

    def forward(self, z: Tensor) -> QuantizerOutput: ...

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(b, h, w, g) int64 -> (b, dim, h, w); exact inverse of forward's z_q in eval mode."""
        ...

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        """Small constructor kwargs that the contract tests build the quantizer with."""
        ...


class QuantizerBase(nn.Module):
    """Convenience base for quantizer files: the protocol's defaults (no codebook search, no example config)."""

    lookup_precision: str | None = None

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        raise NotImplementedError(f"{cls.__name__}.example_config(): give small kwargs for the contract tests")


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """x / max(||x||_2, eps), i.e. F.normalize semantics as used by the official code."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Forward value q, gradient flows to x unchanged.

    Written sg[q] + (x − sg[x]) rather than the usual x + sg[q − x]: same gradients (none to q), but the
    forward value is exactly q (x − x = 0 exactly, whereas x + (q − x) can differ from q by an ulp), so
    `indices_to_codes(indices)` reproduces z_q bit for bit.
    """
    return q.detach() + (x - x.detach())


def to_channels_last_groups(z: Tensor, groups: int) -> Tensor:
    """(b, g·d, h, w) -> (b, h, w, g, d): contiguous group-major channel split, as in the official code."""
    b, c, h, w = z.shape
    assert c % groups == 0, f"channels {c} not divisible by groups {groups}"
    return z.permute(0, 2, 3, 1).reshape(b, h, w, groups, c // groups)


def from_channels_last_groups(q: Tensor) -> Tensor:
    """(b, h, w, g, d) -> (b, g·d, h, w)."""
    b, h, w, g, d = q.shape
    return q.reshape(b, h, w, g * d).permute(0, 3, 1, 2).contiguous()


def batch_usage(indices: Tensor, codebook_size: int) -> Tensor:
    """Fraction of the V codes used at least once in this batch (pooled over groups); a detached scalar."""
    return torch.tensor(torch.unique(indices).numel() / codebook_size, dtype=torch.float32)


# ---- shared by the quantizer files in tokenizers/ (they cannot import each other) ----


def resolve_norm(norm: str | None, l2_norm: bool | None, default: str) -> str:
    """`norm` wins; the boolean `l2_norm` (official `use_l2_norm`) is accepted as an alias."""
    if norm is not None and l2_norm is not None and (norm == "l2") != l2_norm:
        raise UserError(f"norm: {norm!r} contradicts l2_norm: {l2_norm}; give only one of them")
    if norm is not None:
        return norm
    if l2_norm is not None:
        return "l2" if l2_norm else "none"
    return default


def normalise(x: Tensor, norm: str) -> Tensor:
    """The official `normlization_func`, applied along the last (length-d) axis."""
    if norm == "l2":
        return F.normalize(x, p=2.0, dim=-1)
    if norm == "l1":
        return F.normalize(x, p=1.0, dim=-1)
    if norm == "clip":  # force_1d_clip: scalar codes kept in [-1, 1]
        return x.clamp(-1.0, 1.0)
    return x


def init_codebook(weight: Tensor, init: str) -> None:
    """Official `init_codebook`: spherical = randn rows / max(‖row‖, 1e-8); uniform = U(±1/V) (U(±1) for d = 1)."""
    v, d = weight.shape
    with torch.no_grad():
        if init == "uniform":
            bound = 1.0 if d == 1 else 1.0 / v
            weight.uniform_(-bound, bound)
        else:
            rows = torch.randn(v, d)
            weight.copy_(rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8))


def check_grouping(dim: Any, codebook_size: Any, groups: Any) -> None:
    """Shared validation of dim / codebook_size / groups with one-line errors naming the field."""
    for name, value in (("dim", dim), ("codebook_size", codebook_size), ("groups", groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name}: expected a positive integer, got {value!r}")
    if dim % groups:
        divisors = [g for g in range(1, dim + 1) if dim % g == 0]
        raise UserError(f"groups: {groups} does not divide dim {dim}; valid groups: {divisors}")


def check_channels(z: Tensor, dim: int) -> None:
    if z.ndim != 4 or z.shape[1] != dim:
        raise ValueError(f"quantizer expects a (b, {dim}, h, w) latent, got shape {tuple(z.shape)}")


def check_indices(indices: Tensor, groups: int) -> None:
    if indices.ndim != 4 or indices.shape[-1] != groups:
        raise ValueError(f"indices must be (b, h, w, {groups}), got shape {tuple(indices.shape)}")


def grouped_codebook_lookup(
    z: Tensor, weight: Tensor, groups: int, norm: str, lookup: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The lookup GSQ and VQ share: (b, G·d, h, w) latent and a (V, d) codebook → (ẑ, idx, q).

    ẑ (b, h, w, G, d): the normalised latent groups, normalised as packed (N·G, d) rows like the official
    lookup (bitwise-equal inputs matter for the bf16 lookup); idx (N·G,) from `lookup(ẑ rows, normalised
    codebook)`; q (b, h, w, G, d): the RAW codebook rows, in fp32, differentiable w.r.t. the codebook.
    """
    zg = to_channels_last_groups(z.float(), groups)  # (b, h, w, G, d)
    flat = normalise(zg.reshape(-1, zg.shape[-1]), norm)
    idx = lookup(flat.detach(), normalise(weight.detach().float(), norm))
    q = F.embedding(idx, weight).float().view_as(zg)
    return flat.view_as(zg), idx, q


def grouped_output(z: Tensor, z_hat: Tensor, q: Tensor, idx: Tensor, codebook_size: int,
                   losses: dict[str, Tensor]) -> QuantizerOutput:
    """Straight-through output (forward value q, gradient to ẑ) in z's layout, indices (b, h, w, G).

    z_q keeps the raw codebook rows' fp32 (z's dtype only when wider): under bf16 autocast the official code
    hands the decoder fp32 rows (its ẑ + sg[q − ẑ] promotes to fp32), and `indices_to_codes` returns the same
    fp32 rows, so decode(z_q) and decode_indices(indices) see identical inputs.
    """
    b, h, w, g, _ = z_hat.shape
    indices = idx.view(b, h, w, g)
    z_q = from_channels_last_groups(straight_through(z_hat, q)).to(torch.promote_types(z.dtype, q.dtype))
    return QuantizerOutput(z_q, indices, losses, {"usage": batch_usage(indices, codebook_size)})
