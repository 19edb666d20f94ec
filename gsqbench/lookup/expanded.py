"""The blocked expanded-distance search: argmin_v fl(fl(‖x‖² + ‖c‖²) − 2⟨x, c⟩) without an N×V matrix.

This is the official `compute_dist` + `torch.argmin` (spec gsq-reference.md §2.3) in fp32 (`fp32-expanded`) or
with bf16 operands and a bf16 matmul result (`bf16`, the official lookup under bf16 autocast), computed in
cache-sized blocks with the same roundings as the straightforward full-matrix lookup, so the indices are the
same bit for bit. With `slack` (the exact lookup's candidate pass, `gsqbench.lookup.exact`) it ranks codes by
g = fl(‖c‖² − 2⟨x, c⟩) instead, the row's ‖x‖² left out (same argmin in exact arithmetic; the rounding error then
scales with ‖x‖·‖c‖ + ‖c‖², not ‖x‖², which matters for codes clustered far from x such as VQ's U(±1/V) init),
and also keeps per row the second smallest g where it lies within the slack of the minimum, to find the rows
whose fp32 argmin might not be the true nearest code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

ExpandedPrecision = Literal["fp32-expanded", "bf16"]


@dataclass
class BlockSearch:
    """Per row: first index of the minimum and the minimum expanded distance (fp32; with a slack g, i.e.
    without ‖x‖²); with a slack also the second smallest over the other codes, exact wherever it is ≤ minimum +
    slack (else only known to exceed it)."""

    index: Tensor  # (n,) int64
    value: Tensor  # (n,) float32
    second: Optional[Tensor] = None  # (n,) float32


def block_distances(x: Tensor, x_sq: Tensor, codes: Tensor, c_sq: Tensor, precision: ExpandedPrecision) -> Tensor:
    """Expanded squared distance ||x||² + ||c||² − 2⟨x, c⟩ for one (rows × codes) block, in fp32.

    precision="bf16" reproduces the official lookup under bf16 autocast: the norms are fp32 but the
    matmul runs and rounds in bf16 before the fp32 subtraction (spec §2.3).
    """
    if precision == "bf16":
        dot = (x.to(torch.bfloat16) @ codes.to(torch.bfloat16).T).float()
        return (x_sq[:, None] + c_sq[None, :]) - 2.0 * dot
    return torch.addmm(x_sq[:, None] + c_sq[None, :], x, codes.T, beta=1.0, alpha=-2.0)


# Largest code dimension searched with broadcast element-wise products instead of a GEMM: below this a K = d
# matmul is far from BLAS's efficient regime (measured ~0.55 ns/element for K = 2 vs ~0.06 ns per pass here).
_ELEMENTWISE_MAX_DIM = {"fp32-expanded": 4, "bf16": 2}


def default_blocks(device: torch.device) -> tuple[int, int]:
    """(block_elems, max_codes_per_block). CPU, one thread: 2 MiB blocks that stay in L2 (measured best on a
    2-core EPYC). Several threads: 8 MiB blocks (L3), since every op ends in a thread barrier and fewer, larger
    ops lose less to it (measured 1.7x faster than 2 MiB blocks with 2 threads). Accelerators: large blocks,
    their cost is per kernel launch."""
    if device.type == "cpu":
        return (1 << 19 if torch.get_num_threads() == 1 else 1 << 21), 1 << 11
    return 1 << 26, 1 << 16


def prepare_operands(x: Tensor, codebook: Tensor, precision: ExpandedPrecision, elementwise: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Norms in fp32, and the operands of −2⟨x, c⟩ with the −2 folded into the codes (exact: power of two).

    Element-wise path: column-major copies (d, n) and (d, v) so each block reads contiguous columns.
    GEMM path: x (n, d) and −2·cᵀ (d, v). bf16 rounds the operands as autocast would before the matmul.
    """
    x_sq = (x * x).sum(dim=1)
    c_sq = (codebook * codebook).sum(dim=1)
    xs, cs = x, codebook * -2.0
    if precision == "bf16":
        xs, cs = xs.to(torch.bfloat16), cs.to(torch.bfloat16)
        if elementwise:  # products of two bf16 values are exact in fp32, so fp32 element-wise math is the matmul
            xs, cs = xs.float(), cs.float()
    return x_sq, c_sq, xs.T.contiguous() if elementwise else xs.contiguous(), cs.T.contiguous()


def fill_distances(out: Tensor, tmp: Tensor, a: Tensor, b: Tensor, xs: Tensor, cs: Tensor, elementwise: bool,
                    precision: ExpandedPrecision, uniform_rows: bool) -> Tensor:
    """fl(fl(‖x‖² + ‖c‖²) − 2⟨x, c⟩) for one (rows × codes) block, in `tmp` (uniform_rows) or `out`.

    a: (r, 1) row norms; b: (c,) code norms; xs: (d, r) or (r, d); cs: (d, c) holding −2·c. The element-wise
    dot product accumulates with fused multiply-adds in index order (`addcmul`), which is what the BLAS GEMM
    does for small K (checked against torch.mm in tests/test_nearest_code.py), so the indices match the
    straightforward full-matrix lookup; every pair gets the same value whichever block computes it.
    uniform_rows: all rows share one ‖x‖² (the usual case for l2-normalised latents once rows are sorted by
    it), so fl(‖x‖² + ‖c‖²) is a single row and the block needs one pass less; same roundings.
    """
    if elementwise:
        torch.mul(xs[0][:, None], cs[0], out=tmp)
        for k in range(1, xs.shape[0]):
            tmp.addcmul_(xs[k][:, None], cs[k])
        if precision == "bf16":
            tmp.copy_(tmp.to(torch.bfloat16))  # the bf16 matmul's output rounding
    elif precision == "bf16":
        tmp.copy_(torch.mm(xs, cs))  # bf16 result, widened exactly
    else:
        torch.mm(xs, cs, out=tmp)
    if uniform_rows:
        return tmp.add_(torch.add(b, a[0]))
    torch.add(a, b, out=out)
    return out.add_(tmp)


def _merge_block(dist: Tensor, c0: int, best_val: Tensor, best_idx: Tensor, nan_aware: bool) -> None:
    """Fold one later code block into the running (value, first index); strict < keeps earlier blocks on ties.

    Only rows whose minimum improves need an argmin (about ln(blocks) of them per row over the whole search),
    so the block is first reduced with the much cheaper value-only `amin`. `nan_aware` (inputs hold NaN) makes a
    NaN distance win as in torch.argmin; it costs extra passes, so it is only on when needed.
    """
    block_min = torch.amin(dist, dim=1)
    better = block_min < best_val
    if nan_aware:
        better |= block_min.isnan() & ~best_val.isnan()
    rows = better.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    val, idx = torch.min(dist.index_select(0, rows), dim=1)  # first index among exact ties within the block
    best_val.index_copy_(0, rows, val)
    best_idx.index_copy_(0, rows, idx + c0)


def _block_top2(dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(min, first argmin, second smallest) per row of a scratch block; the argmin entry is overwritten."""
    val, idx = torch.min(dist, dim=1)
    dist.scatter_(1, idx[:, None], float("inf"))
    return val, idx, torch.amin(dist, dim=1)


def _merge_top2(b1: Tensor, i1: Tensor, b2: Tensor, best: Tensor, arg: Tensor, second: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Fold a later block's (min, argmin, second) into the running (best, arg, second); strict < keeps the
    earlier index on ties (the tie then sits in `second`)."""
    better = b1 < best
    new_second = torch.where(better, torch.minimum(best, b2), torch.minimum(second, b1))
    return torch.where(better, b1, best), torch.where(better, i1, arg), new_second


def _merge_block_top2(dist: Tensor, c0: int, best_val: Tensor, best_idx: Tensor, second: Tensor,
                      slack: Tensor) -> None:
    """`_merge_block` that also keeps the second smallest distance, for rows this block can matter to: rows
    whose block minimum exceeds running minimum + slack cannot bring a code within slack of the minimum (all
    codes seen are ≥ the running minimum, which only decreases), so `second` is exact wherever it is within
    slack of the final minimum, which is all the exact lookup asks of it. Inputs are finite here."""
    block_min = torch.amin(dist, dim=1)
    rows = (block_min <= best_val + slack).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    b1, i1, b2 = _block_top2(dist.index_select(0, rows))
    best, arg, sec = _merge_top2(b1, i1 + c0, b2, best_val.index_select(0, rows), best_idx.index_select(0, rows),
                                 second.index_select(0, rows))
    best_val.index_copy_(0, rows, best)
    best_idx.index_copy_(0, rows, arg)
    second.index_copy_(0, rows, sec)


def _row_blocks(norms: list[float], rows_per_block: int) -> list[tuple[int, int, bool]]:
    """(start, end, uniform) row blocks over rows sorted by norm. When the norms take few distinct values
    (l2-normalised latents: a handful of fp32 values around 1) blocks follow the runs of equal norm, so every
    block is uniform; otherwise fixed-size blocks, uniform only where they happen to be."""
    n = len(norms)
    starts = [0] + [i for i in range(1, n) if norms[i] != norms[i - 1]]
    if len(starts) <= max(1, n // rows_per_block):
        ends = starts[1:] + [n]
        return [(r0, min(e, r0 + rows_per_block), True)
                for s, e in zip(starts, ends) for r0 in range(s, e, rows_per_block)]
    return [(r0, min(n, r0 + rows_per_block), norms[r0] == norms[min(n, r0 + rows_per_block) - 1])
            for r0 in range(0, n, rows_per_block)]  # sorted: first == last means all equal (NaN never is)


def search_cpu(x: Tensor, codebook: Tensor, precision: ExpandedPrecision, block_elems: int, codes_per_block: int,
               slack: Optional[Tensor] = None) -> BlockSearch:
    """Row blocks × code blocks with preallocated, cache-resident buffers; see `search`."""
    n, d = x.shape
    v = codebook.shape[0]
    elementwise = d <= _ELEMENTWISE_MAX_DIM[precision]
    x_sq, c_sq, xs, cs = prepare_operands(x, codebook, precision, elementwise)
    if slack is not None:
        x_sq = torch.zeros_like(x_sq)  # g = ‖c‖² − 2⟨x, c⟩: one "norm" value, so every row block is uniform
    # rows sorted by ‖x‖² so that most blocks have one norm value (see fill_distances); undone at the end
    order = torch.argsort(x_sq, stable=True)
    x_sq = x_sq[order]
    xs = xs[:, order] if elementwise else xs[order]
    s_sorted = slack[order] if slack is not None else None
    norms = x_sq.tolist()
    rows_per_block = max(1, min(n, block_elems // codes_per_block))
    nan_aware = bool(x_sq.isnan().any() or c_sq.isnan().any())
    tmp = torch.empty(rows_per_block, codes_per_block)
    out: Tensor | None = None  # second buffer, only for blocks with mixed row norms
    idx_sorted = torch.empty(n, dtype=torch.long)
    val_sorted = torch.empty(n)
    sec_sorted = torch.empty(n) if slack is not None else None
    for r0, r1, uniform in _row_blocks(norms, rows_per_block):
        if not uniform and out is None:
            out = torch.empty(rows_per_block, codes_per_block)
        a = x_sq[r0:r1, None]
        x_blk = xs[:, r0:r1] if elementwise else xs[r0:r1]
        s_blk = s_sorted[r0:r1] if s_sorted is not None else None
        best_val = row_idx = second = None
        for c0 in range(0, v, codes_per_block):
            c1 = min(v, c0 + codes_per_block)
            rr, cc = r1 - r0, c1 - c0
            dist = fill_distances(out[:rr, :cc] if out is not None else tmp[:rr, :cc], tmp[:rr, :cc], a,
                                   c_sq[c0:c1], x_blk, cs[:, c0:c1], elementwise, precision, uniform)
            if best_val is None and s_blk is not None:
                best_val, row_idx, second = _block_top2(dist)
            elif best_val is None:
                best_val, row_idx = torch.min(dist, dim=1)
            elif s_blk is not None:
                _merge_block_top2(dist, c0, best_val, row_idx, second, s_blk)
            else:
                _merge_block(dist, c0, best_val, row_idx, nan_aware)
        idx_sorted[r0:r1] = row_idx
        val_sorted[r0:r1] = best_val
        if sec_sorted is not None:
            sec_sorted[r0:r1] = second
    inv = torch.empty_like(order)
    inv[order] = torch.arange(n)
    return BlockSearch(idx_sorted[inv], val_sorted[inv], sec_sorted[inv] if sec_sorted is not None else None)


def search_accelerator(x: Tensor, codebook: Tensor, precision: ExpandedPrecision, block_elems: int,
                       codes_per_block: int, slack: Optional[Tensor] = None) -> BlockSearch:
    """Accelerator path: large blocks, fused addmm and min-with-index per block (kernel launches dominate).
    With a slack every block also yields its second smallest distance (see _merge_top2)."""
    n, v = x.shape[0], codebook.shape[0]
    x_sq, c_sq, xs, cs = prepare_operands(x, codebook, "fp32-expanded", False)  # xs, cs: slack path only
    rows_per_block = max(1, block_elems // codes_per_block)
    best_idx = torch.empty(n, dtype=torch.long, device=x.device)
    best_val_all = torch.empty(n, device=x.device)
    second_all = torch.empty(n, device=x.device) if slack is not None else None
    for r0 in range(0, n, rows_per_block):
        rows = slice(r0, min(n, r0 + rows_per_block))
        best_val = best_arg = second = None
        for c0 in range(0, v, codes_per_block):
            cols = slice(c0, min(v, c0 + codes_per_block))
            if slack is None:
                dist = block_distances(x[rows], x_sq[rows], codebook[cols], c_sq[cols], precision)
                val, idx = dist.min(dim=1)  # first index among exact ties within the block
                idx += c0
                if best_val is None:
                    best_val, best_arg = val, idx
                else:
                    better = val < best_val  # strict: an earlier block wins exact ties
                    best_val = torch.where(better, val, best_val)
                    best_arg = torch.where(better, idx, best_arg)
                continue
            # g: the product, then ‖c‖² added, the arithmetic the exact lookup's error bound assumes
            dist = torch.mm(xs[rows], cs[:, cols]).add_(c_sq[None, cols])
            b1, i1, b2 = _block_top2(dist)
            if best_val is None:
                best_val, best_arg, second = b1, i1 + c0, b2
            else:
                best_val, best_arg, second = _merge_top2(b1, i1 + c0, b2, best_val, best_arg, second)
        if second_all is not None:
            second_all[rows] = second
        best_idx[rows] = best_arg
        best_val_all[rows] = best_val
    return BlockSearch(best_idx, best_val_all, second_all)


def search(x: Tensor, codebook: Tensor, precision: ExpandedPrecision, block_elems: Optional[int] = None,
           max_codes_per_block: Optional[int] = None, slack: Optional[Tensor] = None) -> BlockSearch:
    """argmin_v of the expanded distance in blocks (fp32 x (n, d), codebook (v, d), outside autocast).

    Peak extra memory is a few `block_elems` floats, independent of n·v (defaults per device: small L2-sized
    blocks on CPU, large ones on accelerators).
    """
    default_elems, default_codes = default_blocks(x.device)
    block_elems = block_elems or default_elems
    codes_per_block = min(codebook.shape[0], max_codes_per_block or default_codes)
    if x.device.type == "cpu":
        return search_cpu(x, codebook, precision, block_elems, codes_per_block, slack)
    return search_accelerator(x, codebook, precision, block_elems, codes_per_block, slack)
