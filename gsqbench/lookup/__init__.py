"""Nearest-code lookup for the codebook quantizers (GSQ, VQ) in three named modes (spec gsq-reference.md §2.3).

- `exact` (default): the true nearest code, argmin_v Σ_k (x_k − c_vk)² in float64 on the fp32 inputs, lowest
  index on exactly equal distances (`gsqbench.lookup.exact`). The official formula is not a nearest-code search
  at small d and large V: its expanded form cancels near cosine 1 (at d = 2, V = 262,144 fp32 agrees with the
  nearest code on ~7 % of random unit latents; spec §2.3 correction 2026-11-30).
- `fp32-expanded`: the official `compute_dist` + argmin, fl(fl(‖x‖² + ‖c‖²) − 2⟨x, c⟩) in fp32, bit for bit
  (`gsqbench.lookup.expanded`); kept for studies and for comparing with fp32 runs of the official code.
- `bf16`: the official lookup under bf16 autocast (bf16 operands and matmul result); the `gsq-compat` default.

Every mode runs outside autocast on fp32 copies of its inputs, so the indices do not depend on the caller's
autocast state, and never materialises the N×V distance matrix.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from gsqbench.errors import UserError
from gsqbench.lookup import exact, expanded

LookupPrecision = Literal["exact", "fp32-expanded", "bf16"]
LOOKUP_PRECISIONS: tuple[str, ...] = ("exact", "fp32-expanded", "bf16")
DEFAULT_LOOKUP: LookupPrecision = "exact"


def check_lookup_precision(value: object, field: str = "lookup_precision") -> LookupPrecision:
    """A valid mode, or a one-line UserError. The former name `fp32` is an error, not an alias: its old meaning
    (the expanded form) is no longer the default, so silently mapping either way would change results."""
    if value == "fp32":
        raise UserError(f"{field}: 'fp32' is no longer a lookup mode; use 'exact' (the true nearest code, the "
                        f"default) or 'fp32-expanded' (the former fp32 expanded-form lookup, official formula)")
    if value not in LOOKUP_PRECISIONS:
        raise UserError(f"{field}: {value!r} is not valid; valid: {', '.join(LOOKUP_PRECISIONS)}")
    return value  # type: ignore[return-value]


def _mode(precision: str) -> str:
    # TRANSITIONAL (issue 12 phase 2): gsqbench/evaluate.py still pins quantizer.lookup_precision = "fp32" by
    # attribute assignment (bypassing check_lookup_precision) and means the expanded form; remove this line when
    # evaluate.py names the modes. Configs and constructor kwargs saying "fp32" are rejected by
    # check_lookup_precision.
    if precision == "fp32":
        return "fp32-expanded"
    return check_lookup_precision(precision, "precision")


@torch.no_grad()
def nearest_code(
    x: Tensor,
    codebook: Tensor,
    *,
    precision: LookupPrecision = DEFAULT_LOOKUP,
    block_elems: Optional[int] = None,
    max_codes_per_block: Optional[int] = None,
) -> Tensor:
    """Nearest code of each row, ties to the lowest index. x: (n, d); codebook: (v, d). Returns int64 (n,).

    precision: see the module docstring. `fp32-expanded` / `bf16` give the official formula's indices bit for
    bit; `exact` the true nearest code. Peak extra memory is a few `block_elems` floats, independent of n·v.
    """
    mode = _mode(precision)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codebook = x.float(), codebook.float()
        if mode == "exact":
            return exact.nearest(x, codebook, block_elems=block_elems, max_codes_per_block=max_codes_per_block)
        return expanded.search(x, codebook, mode, block_elems, max_codes_per_block).index  # type: ignore[arg-type]


@torch.no_grad()
def sample_code(
    x: Tensor,
    codebook: Tensor,
    *,
    mode: Literal["random", "softmax"],
    tau: float = 1.0,
    precision: LookupPrecision = DEFAULT_LOOKUP,
    generator: Optional[torch.Generator] = None,
    block_elems: int = 1 << 22,
) -> Tensor:
    """Stochastic code choice in blocks (never the full N×V matrix), for the official `gsq` class's options.

    mode="random": uniform among the exactly tied minimum distances (official `random_argmin`); with `exact`
    the ties are those of the float64 distance (duplicate codes, d = 1), otherwise of the expanded form.
    mode="softmax": a sample from softmax(−dist/τ) (official `softmax_sample`), drawn with the Gumbel-max trick
    so each block only needs its own scores; dist is the fp32 expanded distance for `exact` and `fp32-expanded`
    (its rounding error, < 1e-5, is far below τ) and the bf16 one for `bf16`. x: (n, d); codebook: (v, d).
    Returns int64 (n,).
    """
    prec = _mode(precision)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codebook = x.float(), codebook.float()
        if mode == "random" and prec == "exact":
            return exact.nearest(x, codebook, tie_break="random", generator=generator)
        dist_prec = "bf16" if prec == "bf16" else "fp32-expanded"
        return _sample_expanded(x, codebook, mode, tau, dist_prec, generator, block_elems)  # type: ignore[arg-type]


def _sample_expanded(x: Tensor, codebook: Tensor, mode: str, tau: float, precision: expanded.ExpandedPrecision,
                     generator: Optional[torch.Generator], block_elems: int) -> Tensor:
    n, v = x.shape[0], codebook.shape[0]
    x_sq, c_sq = (x * x).sum(dim=1), (codebook * codebook).sum(dim=1)
    codes_per_block = min(v, 1 << 16)
    rows_per_block = max(1, block_elems // codes_per_block)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    for r0 in range(0, n, rows_per_block):
        rows = slice(r0, min(n, r0 + rows_per_block))
        best_key = best_val = best_arg = None
        for c0 in range(0, v, codes_per_block):
            cols = slice(c0, min(v, c0 + codes_per_block))
            dist = expanded.block_distances(x[rows], x_sq[rows], codebook[cols], c_sq[cols], precision)
            u = torch.rand(dist.shape, generator=generator, device=dist.device)
            if mode == "softmax":
                score = -dist / tau - torch.log(-torch.log(u.clamp_min(1e-20)))  # + Gumbel(0, 1)
                val, idx = score.max(dim=1)
                key = val
            else:
                val = dist.min(dim=1).values
                keys = torch.where(dist == val[:, None], u, torch.full_like(u, -1.0))
                key, idx = keys.max(dim=1)  # random key decides among the exact ties
            idx = idx + c0
            if best_arg is None:
                best_val, best_key, best_arg = val, key, idx
                continue
            if mode == "softmax":
                better = key > best_key
            else:
                better = (val < best_val) | ((val == best_val) & (key > best_key))
            best_val = torch.where(better, val, best_val)
            best_key = torch.where(better, key, best_key)
            best_arg = torch.where(better, idx, best_arg)
        out[rows] = best_arg
    return out


__all__ = ["LookupPrecision", "LOOKUP_PRECISIONS", "DEFAULT_LOOKUP", "check_lookup_precision", "nearest_code",
           "sample_code"]
