"""The quantizer contract (QuantizerOutput, Quantizer protocol) and the math every quantizer shares.

Shared math: L2 normalisation with `F.normalize` semantics (as in the official GSQ code), the
straight-through estimator, and a chunked nearest-code search that never materialises the N×V
distance matrix, so V = 262,144 fits on one machine (spec gsq-reference.md §2.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.errors import UserError

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


def _block_distances(x: Tensor, x_sq: Tensor, codes: Tensor, c_sq: Tensor, precision: LookupPrecision) -> Tensor:
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
_ELEMENTWISE_MAX_DIM = {"fp32": 4, "bf16": 2}


def _default_blocks(device: torch.device) -> tuple[int, int]:
    """(block_elems, max_codes_per_block). CPU, one thread: 2 MiB blocks that stay in L2 (measured best on a
    2-core EPYC). Several threads: 8 MiB blocks (L3), since every op ends in a thread barrier and fewer, larger
    ops lose less to it (measured 1.7x faster than 2 MiB blocks with 2 threads). Accelerators: large blocks,
    their cost is per kernel launch."""
    if device.type == "cpu":
        return (1 << 19 if torch.get_num_threads() == 1 else 1 << 21), 1 << 11
    return 1 << 26, 1 << 16


def _prepare_operands(x: Tensor, codebook: Tensor, precision: LookupPrecision, elementwise: bool
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


def _fill_distances(out: Tensor, tmp: Tensor, a: Tensor, b: Tensor, xs: Tensor, cs: Tensor, elementwise: bool,
                    precision: LookupPrecision, uniform_rows: bool) -> Tensor:
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


def _nearest_code_cpu(x: Tensor, codebook: Tensor, precision: LookupPrecision, block_elems: int,
                      codes_per_block: int) -> Tensor:
    """Row blocks × code blocks with preallocated, cache-resident buffers; see `nearest_code`."""
    n, d = x.shape
    v = codebook.shape[0]
    elementwise = d <= _ELEMENTWISE_MAX_DIM[precision]
    x_sq, c_sq, xs, cs = _prepare_operands(x, codebook, precision, elementwise)
    # rows sorted by ‖x‖² so that most blocks have one norm value (see _fill_distances); undone at the end
    order = torch.argsort(x_sq, stable=True)
    x_sq = x_sq[order]
    xs = xs[:, order] if elementwise else xs[order]
    norms = x_sq.tolist()
    rows_per_block = max(1, min(n, block_elems // codes_per_block))
    nan_aware = bool(x_sq.isnan().any() or c_sq.isnan().any())
    tmp = torch.empty(rows_per_block, codes_per_block)
    out: Tensor | None = None  # second buffer, only for blocks with mixed row norms
    best_sorted = torch.empty(n, dtype=torch.long)
    for r0, r1, uniform in _row_blocks(norms, rows_per_block):
        if not uniform and out is None:
            out = torch.empty(rows_per_block, codes_per_block)
        a = x_sq[r0:r1, None]
        x_blk = xs[:, r0:r1] if elementwise else xs[r0:r1]
        best_val = row_idx = None
        for c0 in range(0, v, codes_per_block):
            c1 = min(v, c0 + codes_per_block)
            rr, cc = r1 - r0, c1 - c0
            dist = _fill_distances(out[:rr, :cc] if out is not None else tmp[:rr, :cc], tmp[:rr, :cc], a,
                                   c_sq[c0:c1], x_blk, cs[:, c0:c1], elementwise, precision, uniform)
            if best_val is None:
                best_val, row_idx = torch.min(dist, dim=1)
            else:
                _merge_block(dist, c0, best_val, row_idx, nan_aware)
        best_sorted[r0:r1] = row_idx
    best_idx = torch.empty_like(best_sorted)
    best_idx[order] = best_sorted
    return best_idx


def _nearest_code_blocks(x: Tensor, codebook: Tensor, precision: LookupPrecision, block_elems: int,
                         codes_per_block: int) -> Tensor:
    """Accelerator path: large blocks, fused addmm and min-with-index per block (kernel launches dominate)."""
    n, v = x.shape[0], codebook.shape[0]
    x_sq = (x * x).sum(dim=1)
    c_sq = (codebook * codebook).sum(dim=1)
    rows_per_block = max(1, block_elems // codes_per_block)
    best_idx = torch.empty(n, dtype=torch.long, device=x.device)
    for r0 in range(0, n, rows_per_block):
        rows = slice(r0, min(n, r0 + rows_per_block))
        best_val = best_arg = None
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


@torch.no_grad()
def nearest_code(
    x: Tensor,
    codebook: Tensor,
    *,
    precision: LookupPrecision = "fp32",
    block_elems: int | None = None,
    max_codes_per_block: int | None = None,
) -> Tensor:
    """argmin_v ||x_i − c_v||² over a codebook, computed in blocks; ties resolve to the lowest index.

    The distance is the expanded form fl(fl(‖x‖² + ‖c‖²) − 2⟨x, c⟩) in fp32 (spec §2.3); precision="bf16"
    rounds the operands and the dot product to bf16 as the official bf16-autocast lookup does.
    x: (n, d); codebook: (v, d). Returns int64 (n,). Peak extra memory is a few `block_elems` floats,
    independent of n·v (defaults per device: small L2-sized blocks on CPU, large ones on accelerators).
    Runs outside autocast so fp32 stays fp32 inside bf16 training.
    """
    default_elems, default_codes = _default_blocks(x.device)
    block_elems = block_elems or default_elems
    codes_per_block = min(codebook.shape[0], max_codes_per_block or default_codes)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codebook = x.float(), codebook.float()
        if x.device.type == "cpu":
            return _nearest_code_cpu(x, codebook, precision, block_elems, codes_per_block)
        return _nearest_code_blocks(x, codebook, precision, block_elems, codes_per_block)


def to_channels_last_groups(z: Tensor, groups: int) -> Tensor:
    """(b, g·d, h, w) -> (b, h, w, g, d): contiguous group-major channel split, as in the official code."""
    b, c, h, w = z.shape
    assert c % groups == 0, f"channels {c} not divisible by groups {groups}"
    return z.permute(0, 2, 3, 1).reshape(b, h, w, groups, c // groups)


def from_channels_last_groups(q: Tensor) -> Tensor:
    """(b, h, w, g, d) -> (b, g·d, h, w)."""
    b, h, w, g, d = q.shape
    return q.reshape(b, h, w, g * d).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def sample_code(
    x: Tensor,
    codebook: Tensor,
    *,
    mode: Literal["random", "softmax"],
    tau: float = 1.0,
    precision: LookupPrecision = "fp32",
    generator: torch.Generator | None = None,
    block_elems: int = 1 << 22,
) -> Tensor:
    """Stochastic code choice in blocks (never the full N×V matrix), for the official `gsq` class's options.

    mode="random": uniform among exactly tied minimum distances (official `random_argmin`).
    mode="softmax": a sample from softmax(−dist/τ) (official `softmax_sample`), drawn with the Gumbel-max
    trick so each block only needs its own scores. x: (n, d); codebook: (v, d). Returns int64 (n,).
    """
    n, v = x.shape[0], codebook.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codebook = x.float(), codebook.float()
        x_sq, c_sq = (x * x).sum(dim=1), (codebook * codebook).sum(dim=1)
        codes_per_block = min(v, 1 << 16)
        rows_per_block = max(1, block_elems // codes_per_block)
        out = torch.empty(n, dtype=torch.long, device=x.device)
        for r0 in range(0, n, rows_per_block):
            rows = slice(r0, min(n, r0 + rows_per_block))
            best_key = best_val = best_arg = None
            for c0 in range(0, v, codes_per_block):
                cols = slice(c0, min(v, c0 + codes_per_block))
                dist = _block_distances(x[rows], x_sq[rows], codebook[cols], c_sq[cols], precision)
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
    """Straight-through output (forward value q, gradient to ẑ) in z's layout and dtype, indices (b, h, w, G)."""
    b, h, w, g, _ = z_hat.shape
    indices = idx.view(b, h, w, g)
    z_q = from_channels_last_groups(straight_through(z_hat, q)).to(z.dtype)
    return QuantizerOutput(z_q, indices, losses, {"usage": batch_usage(indices, codebook_size)})
