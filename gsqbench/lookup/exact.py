"""The exact nearest-code lookup, `lookup_precision: exact` (spec gsq-reference.md §2.3, correction 2026-11-30).

Definition (what tests/test_exact_lookup.py checks against a float64 brute force): for fp32 rows x and an fp32
codebook C, idx(x) = argmin_v D(x, C_v) with D = Σ_k (x_k − C_vk)² evaluated in float64 on the fp32 values
(each difference, square and partial sum rounded to float64, summed in index order k), the lowest index among
exactly equal D (tie_break="random": a uniformly random one of them). No cancellation: unlike the expanded form
‖x‖² + ‖c‖² − 2⟨x, c⟩ in fp32, it resolves neighbouring codes at d = 2, V = 262,144 (~3e-10 apart in cosine).

How, never materialising N×V and at about the speed of the fp32 search:
- general d: the blocked fp32 search (`expanded.search`) ranks codes by g = ‖c‖² − 2⟨x, c⟩ (‖x‖² is the same for
  every code) and finds each row's minimum m and its second smallest g. A slack s (`_slack`) of at least twice
  a rigorous bound on the fp32 rounding error plus the float64 error guarantees that the true nearest code lies
  within s of m. A row whose second smallest exceeds m + s is done (its fp32 argmin); the other rows re-score
  every code within s in float64 (`_rescore_candidates`).
- d = 1: distinct code values sorted; on each side of x the float64 distance grows with the distance in value,
  so the nearest values on either side (and any run of exactly equal float64 distances) are the candidates.
- d = 2: codes sorted by angle (`AngularIndex`, cached by codebook content). A code at angle Δ from x has
  D ≥ 4·‖x‖·r_lo·sin²(Δ/2) (r_lo: the smallest indexed code radius), so with U the float64 distance of x's
  angular neighbours every winner lies within sin²(Δ/2) ≤ U/(4‖x‖·r_lo): a window of one or two codes for
  l2-normalised data. Codes under half the median radius are always candidates; rows whose window holds more
  than `_WINDOW` codes, codebooks with many small codes, and calls with fewer than `_MIN_ROWS_TO_INDEX` rows
  whose codebook is not indexed yet (the sort would cost more than the search) take the general path.

Non-finite inputs follow torch.argmin on the float64 distance matrix (a NaN distance wins, first index): a row
holding NaN gets index 0, a codebook holding NaN rows gives every finite row the first NaN row; codes with ±inf
are never chosen by finite rows unless all codes are non-finite (then index 0). Such rows, and values large
enough to overflow fp32 squares (|x| > ~1e19), are searched by a slow float64 brute force; tie_break is then
always "first".
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor

from gsqbench.lookup import expanded

log = logging.getLogger(__name__)

TieBreak = Literal["first", "random"]

_U32 = 2.0 ** -24  # fp32 unit roundoff
_U64 = 2.0 ** -53  # float64 unit roundoff
_SUB32 = 2.0 ** -149  # smallest fp32 subnormal: absolute error of a product that underflows
_WINDOW = 8  # angular candidates gathered per row (d = 2); wider windows take the general path
_MAX_SMALL_CODES = 64  # codes below half the median radius that the angular path checks for every row
_ROWS_2D = 16384  # rows per chunk of the angular path
_MIN_ROWS_TO_INDEX = 32  # fewer rows search all codes (~10 ns per row·code) faster than V angles sort (~300 ns each)


# ------------------------------------------------------------------------------------------ shared pieces


def distance64(x: Tensor, c: Tensor) -> Tensor:
    """D = Σ_k (x_k − c_k)² in float64, summed in index order, for matching rows of x and c (…, d)."""
    x, c = x.double(), c.double()
    acc = (x[..., 0] - c[..., 0]).square()
    for k in range(1, x.shape[-1]):
        acc = acc + (x[..., k] - c[..., k]).square()  # unfused: square rounded, then the sum rounded
    return acc


def _slack(x_sq: Tensor, c_sq_max: float, d: int) -> Tensor:
    """Per-row s ≥ g̃(c*) − g̃(j), where g̃ is the fp32 value of g = ‖c‖² − 2⟨x, c⟩ that the search ranks by, j
    the fp32 argmin and c* the float64 winner; in fp32, never rounded down.

    g̃ = fl(fl(−2⟨x, c⟩) + fl(‖c‖²)) with each sum in any order, with or without FMA, is within
    E = (γ_d + u)·B + 2(γ_d + u)·R of g (u = 2⁻²⁴, γ_d = du/(1 − du), B = max ‖c‖², R = ‖x‖·√B), plus 2⁻¹⁵⁰
    per product that underflows. The float64 distances D = ‖x‖² + g are within ε = (d + 2)·2⁻⁵³ relative of
    the real ones, so D64(c*) ≤ D64(j) gives g(c*) ≤ g(j) + 3ε·D(j), and g̃(c*) ≤ g̃(j) + 2E + 3ε(‖x‖² + B + 2R).
    Rounding m + s to fp32 loses at most u·(B + 2R + s). The total is below (2.02d + 3.02)·u·B +
    (4.04d + 6.04)·u·R + the float64 and underflow terms; (3d + 6)·u·B + (5d + 10)·u·R is used.
    """
    grow = 1.0 + 2 * (d + 2) * _U32  # computed squared norms may sit up to γ_d below the real ones
    a = x_sq.double() * grow
    b = max(c_sq_max, 0.0) * grow
    r = a.sqrt() * math.sqrt(b)
    s = _U32 * ((3 * d + 6) * b + (5 * d + 10) * r) + 8 * (d + 2) * _U64 * (a + b + 2 * r) + (8 * d + 16) * _SUB32
    return s.float().nextafter(torch.tensor(math.inf, device=s.device))


def pick(n: int, rows: Tensor, ids: Tensor, d64: Tensor, tie_break: TieBreak,
         generator: Optional[torch.Generator] = None, weight: Optional[Tensor] = None) -> Tensor:
    """Per row r < n among candidate pairs (rows, ids, d64): the smallest id among those with the row's least
    d64 ("first"), or a random one of them with probability ∝ weight (default 1) ("random", Efraimidis-Spirakis
    keys u^(1/w)). Every row must have at least one candidate; ids are distinct within a row."""
    dev = rows.device
    best = torch.full((n,), math.inf, dtype=torch.float64, device=dev).scatter_reduce_(0, rows, d64, "amin")
    win = d64 == best[rows]
    r, i = rows[win], ids[win]
    if tie_break == "first":
        big = torch.iinfo(torch.long).max
        return torch.full((n,), big, dtype=torch.long, device=dev).scatter_reduce_(0, r, i, "amin")
    key = torch.rand(r.shape, generator=generator, dtype=torch.float64, device="cpu").to(dev)
    if weight is not None:
        key = key.pow(1.0 / weight[win].double())
    top = torch.full((n,), -1.0, dtype=torch.float64, device=dev).scatter_reduce_(0, r, key, "amax")
    sel = key == top[r]
    big = torch.iinfo(torch.long).max
    return torch.full((n,), big, dtype=torch.long, device=dev).scatter_reduce_(0, r[sel], i[sel], "amin")


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """TF32 matmuls off on CUDA for the duration: the slack assumes fp32 (u = 2⁻²⁴) products."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------------------------- general d


def _rescore_candidates(x: Tensor, c: Tensor, thr: Tensor, tie_break: TieBreak,
                        generator: Optional[torch.Generator], block_elems: int) -> Tensor:
    """Exact winner of each row among the codes whose fp32 g = ‖c‖² − 2⟨x, c⟩ is ≤ thr[row] (a superset of the
    float64 minimisers), in blocks, with the same arithmetic as the search (dot product, then ‖c‖² added) so the
    same error bound holds. Candidates are re-scored in float64 and folded into a running (distance, key, code)
    per row, key = −code ("first") or a uniform random number ("random": uniform among exact ties), so memory
    stays one block even when many codes tie (e.g. thousands of duplicate rows)."""
    n, d = x.shape
    v = c.shape[0]
    elementwise = x.device.type == "cpu" and d <= 4
    _, c_sq, xs, cs = expanded.prepare_operands(x, c, "fp32-expanded", elementwise)
    zero = torch.zeros(1, 1, device=x.device)  # g leaves ‖x‖² out
    codes_per_block = min(v, 1 << 12)
    rows_per_block = max(1, min(n, block_elems // codes_per_block))
    tmp = torch.empty(rows_per_block, codes_per_block, device=x.device)
    best_d = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
    best_key = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    best_code = torch.zeros(n, dtype=torch.long, device=x.device)
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        x_blk = xs[:, r0:r1] if elementwise else xs[r0:r1]
        for c0 in range(0, v, codes_per_block):
            c1 = min(v, c0 + codes_per_block)
            g = expanded.fill_distances(tmp[:r1 - r0, :c1 - c0], tmp[:r1 - r0, :c1 - c0], zero, c_sq[c0:c1],
                                        x_blk, cs[:, c0:c1], elementwise, "fp32-expanded", True)
            r, j = (g <= thr[r0:r1, None]).nonzero(as_tuple=True)
            if r.numel() == 0:
                continue
            r, j = r + r0, j + c0
            if tie_break == "first":
                key = -j.double()
            else:
                key = torch.rand(r.shape, generator=generator, dtype=torch.float64).to(x.device)
            _fold(r, j, distance64(x[r], c[j]), key, best_d, best_key, best_code)
    return best_code


def _fold(r: Tensor, j: Tensor, d64: Tensor, key: Tensor, best_d: Tensor, best_key: Tensor,
          best_code: Tensor) -> None:
    """Merge candidate pairs (row r, code j) into the running per-row best: least distance, then greatest key."""
    n, dev = best_d.numel(), r.device
    blk_d = torch.full((n,), math.inf, dtype=torch.float64, device=dev).scatter_reduce_(0, r, d64, "amin")
    win = d64 == blk_d[r]
    blk_key = torch.full((n,), -math.inf, dtype=torch.float64, device=dev).scatter_reduce_(
        0, r[win], key[win], "amax")
    sel = win & (key == blk_key[r])
    blk_code = torch.full((n,), torch.iinfo(torch.long).max, dtype=torch.long, device=dev).scatter_reduce_(
        0, r[sel], j[sel], "amin")  # rows without pairs here keep blk_d = inf, so they never count as better
    better = (blk_d < best_d) | ((blk_d == best_d) & (blk_key > best_key))
    best_d.copy_(torch.where(better, blk_d, best_d))
    best_key.copy_(torch.where(better, blk_key, best_key))
    best_code.copy_(torch.where(better, blk_code, best_code))


def general(x: Tensor, c: Tensor, tie_break: TieBreak, generator: Optional[torch.Generator],
            block_elems: Optional[int], max_codes_per_block: Optional[int]) -> Tensor:
    """Exact search for finite rows with finite fp32 norms, any d: fp32 candidates, float64 re-scoring."""
    n, d = x.shape
    x_sq = (x * x).sum(dim=1)
    slack = _slack(x_sq, float((c * c).sum(dim=1).max()), d)
    found = expanded.search(x, c, "fp32-expanded", block_elems, max_codes_per_block, slack=slack)
    out = found.index.clone()
    assert found.second is not None
    amb = (found.second <= found.value + slack).nonzero().squeeze(1)  # another code within slack
    if amb.numel():
        xa = x.index_select(0, amb)
        thr = found.value.index_select(0, amb) + slack.index_select(0, amb)
        out[amb] = _rescore_candidates(xa, c, thr, tie_break, generator, block_elems or (1 << 22))
    return out


# ------------------------------------------------------------------------------------------------- d = 1


def one_dim(x: Tensor, c: Tensor, tie_break: TieBreak, generator: Optional[torch.Generator]) -> Tensor:
    """d = 1: nearest of the distinct sorted code values; on one side of x the float64 distance is monotone in
    the value, so its minimum is at a neighbour of x and equal distances form a run next to it."""
    xv, cv = x[:, 0].double(), c[:, 0].double()
    values, perm = torch.sort(cv, stable=True)  # stable: equal values keep ascending code indices
    uniq, counts = torch.unique_consecutive(values, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    first = perm[start]  # lowest code index holding each distinct value
    u = uniq.numel()
    pos = torch.searchsorted(uniq, xv)[:, None] + torch.arange(-2, 2, device=x.device)  # 2 values each side
    valid = (pos >= 0) & (pos < u)
    pc = pos.clamp(0, u - 1)
    d64 = torch.where(valid, (xv[:, None] - uniq[pc]).square(), math.inf)
    win = valid & (d64 == d64.min(dim=1, keepdim=True).values)
    # a run of equal distances reaching the outermost gathered value might continue beyond it: search all values
    edge = (win[:, 0] & (pos[:, 0] > 0)) | (win[:, -1] & (pos[:, -1] < u - 1))
    rows, cols = valid.nonzero(as_tuple=True)
    groups, d = pc[rows, cols], d64[rows, cols]
    if edge.any():
        keep = ~edge[rows]
        rows, groups, d = rows[keep], groups[keep], d[keep]
        er = edge.nonzero().squeeze(1)
        step = max(1, (1 << 22) // u)
        for i in range(0, er.numel(), step):
            sub = er[i:i + step]
            full = (xv[sub, None] - uniq[None, :]).square()
            rr, gg = torch.nonzero(full == full.min(dim=1, keepdim=True).values, as_tuple=True)
            rows, groups, d = torch.cat([rows, sub[rr]]), torch.cat([groups, gg]), torch.cat([d, full[rr, gg]])
    if tie_break == "first":
        return pick(x.shape[0], rows, first[groups], d, "first")
    g = pick(x.shape[0], rows, groups, d, "random", generator, weight=counts[groups].double())
    member = (torch.rand(g.shape, generator=generator, dtype=torch.float64).to(x.device) * counts[g]).long()
    return perm[start[g] + member.clamp(max=counts[g] - 1)]


# ------------------------------------------------------------------------------------------------- d = 2


@dataclass
class AngularIndex:
    """The indexed codes sorted by angle; the angles are repeated at −2π and +2π around the sorted list so that
    every window is one contiguous range of `theta` (position p stands for sorted code p mod m)."""

    theta: Tensor  # (3m,) float64 ascending
    code: Tensor  # (m,) int64 code index, by angle
    xy: Tensor  # (m, 2) float64 code coordinates, by angle
    r_lo: float  # a lower bound of the indexed codes' radii
    small: Tensor  # (k,) int64: codes under half the median radius, candidates for every row


def build_angular_index(c: Tensor) -> Optional[AngularIndex]:
    """The d = 2 index, or None when more than `_MAX_SMALL_CODES` codes are far inside the circle (e.g. the
    VQ baseline's uniform init around 0), where angles say little and the general path is used instead."""
    c64 = c.double()
    radius = torch.hypot(c64[:, 0], c64[:, 1])
    r_min, r_max = float(radius.min()), float(radius.max())
    if not r_max > 0:
        return None
    small = torch.zeros(0, dtype=torch.long, device=c.device)
    code = None
    if r_min < 0.5 * r_max:  # some codes far inside: index those above half the median radius
        cut = 0.5 * float(radius.median())
        regular = radius >= cut
        if not cut > 0 or int((~regular).sum()) > _MAX_SMALL_CODES:
            return None
        code, small = regular.nonzero().squeeze(1), (~regular).nonzero().squeeze(1)
        c64, r_min = c64.index_select(0, code), float(radius.index_select(0, code).min())
    theta, order = torch.sort(torch.atan2(c64[:, 1], c64[:, 0]))  # order among equal angles is irrelevant
    tau = 2.0 * math.pi
    return AngularIndex(torch.cat([theta - tau, theta, theta + tau]), order if code is None else code[order],
                        c64.index_select(0, order), r_min * (1.0 - 1e-12), small)


class _IndexCache:
    """A few recent angular indices, found by exact equality of the codebook's contents (never by pointer or
    version counter alone: a fresh tensor can reuse a freed address). The check costs one pass over V·d floats,
    the build a sort of V angles, so evaluation (fixed codebook) pays the build once."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: list[tuple[Tensor, Optional[AngularIndex]]] = []

    def get(self, c: Tensor, build: bool = True) -> Optional[AngularIndex]:
        """The index of c (None where angles do not apply), built if needed and `build`, else None."""
        for i, (key, index) in enumerate(self.entries):
            if key.shape == c.shape and key.device == c.device and torch.equal(key, c):
                self.entries.insert(0, self.entries.pop(i))
                return index
        if not build:
            return None
        index = build_angular_index(c)
        self.entries = [(c.detach().clone(), index)] + self.entries[: self.size - 1]
        return index


ANGULAR_CACHE = _IndexCache()


def two_dim(x: Tensor, c: Tensor, index: AngularIndex, tie_break: TieBreak,
            generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """d = 2 by angle: (indices, resolved mask); unresolved rows (wide windows) go to `general`."""
    n = x.shape[0]
    m = index.code.numel()
    x64 = x.double()
    phi = torch.atan2(x64[:, 1], x64[:, 0])
    rx = torch.hypot(x64[:, 0], x64[:, 1])
    p = torch.searchsorted(index.theta, phi)  # in [m − 1, 2m]: phi ∈ [−π, π]
    nb = torch.stack([p - 1, p], dim=1).remainder_(m)  # the two angular neighbours
    upper = distance64(x64[:, None, :], index.xy[nb]).amin(dim=1)  # D of an actual code ≥ the minimum
    sin2 = upper * (1.0 + 1e-12) / (4.0 * rx * index.r_lo)
    delta = 2.0 * torch.asin(sin2.clamp(max=1.0).sqrt()) * (1.0 + 1e-12) + 1e-12  # atan2 etc. err ~1e-15
    lo = torch.searchsorted(index.theta, phi - delta)
    hi = torch.searchsorted(index.theta, phi + delta, right=True)
    ok = (rx > 0) & (sin2 < 1.0) & (delta < 3.0) & (hi - lo <= _WINDOW) & (hi > lo)  # < 2π: codes at most once
    if not bool(ok.all()):
        rows = ok.nonzero().squeeze(1)
        x64, lo, hi = x64[rows], lo[rows], hi[rows]
    r_i, w_i = (torch.arange(_WINDOW, device=x.device) < (hi - lo)[:, None]).nonzero(as_tuple=True)
    pos = (lo[r_i] + w_i).remainder_(m)
    cand_rows, cand_codes = r_i, index.code[pos]
    d64 = distance64(x64[r_i], index.xy[pos])
    k, nr = index.small.numel(), lo.numel()
    if k:
        small_rows = torch.arange(nr, device=x.device).repeat_interleave(k)
        cand_rows, cand_codes = torch.cat([cand_rows, small_rows]), torch.cat([cand_codes, index.small.repeat(nr)])
        d64 = torch.cat([d64, distance64(x64[small_rows], c.index_select(0, index.small).repeat(nr, 1))])
    got = pick(nr, cand_rows, cand_codes, d64, tie_break, generator)
    if nr == n:
        return got, ok
    out = torch.zeros(n, dtype=torch.long, device=x.device)
    out[ok] = got
    return out, ok


# -------------------------------------------------------------------------------------- non-finite inputs


def brute_force(x: Tensor, c: Tensor, block_elems: int = 1 << 22) -> Tensor:
    """torch.argmin over the float64 distance matrix in blocks (a NaN distance wins, first index): the
    reference semantics, used only for rows the fast paths exclude (non-finite or overflowing values)."""
    n, v = x.shape[0], c.shape[0]
    codes_per_block = min(v, 4096)
    rows_per_block = max(1, block_elems // codes_per_block)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    for r0 in range(0, n, rows_per_block):
        xr = x[r0:r0 + rows_per_block, None, :]
        best_val = torch.full((xr.shape[0],), math.inf, dtype=torch.float64, device=x.device)
        best_idx = torch.zeros(xr.shape[0], dtype=torch.long, device=x.device)
        for c0 in range(0, v, codes_per_block):
            val, idx = torch.min(distance64(xr, c[None, c0:c0 + codes_per_block]), dim=1)  # NaN: first NaN
            better = ~best_val.isnan() & (val.isnan() | (val < best_val))  # strict: earlier blocks win ties
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + c0, best_idx)
        out[r0:r0 + rows_per_block] = best_idx
    return out


# ---------------------------------------------------------------------------------------------- dispatch


def nearest(x: Tensor, c: Tensor, *, tie_break: TieBreak = "first", generator: Optional[torch.Generator] = None,
            block_elems: Optional[int] = None, max_codes_per_block: Optional[int] = None) -> Tensor:
    """Exact nearest code of each fp32 row of x (n, d) in the fp32 codebook c (v, d); int64 (n,)."""
    n, d = x.shape
    out = torch.zeros(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    c_sq = (c * c).sum(dim=1)
    if not math.isfinite(float(c_sq.max())):  # NaN, ±inf, or squares overflowing fp32
        finite_code = torch.isfinite(c).all(dim=1)
        if not bool(finite_code.all()):
            return _nonfinite_codebook(x, c, torch.isfinite(x).all(dim=1), finite_code, tie_break, generator,
                                       block_elems, max_codes_per_block)
        log.warning("exact lookup: codebook values overflow fp32 squares; using the float64 brute force (slow)")
        return brute_force(x, c)
    x_sq = (x * x).sum(dim=1)
    slow = ~torch.isfinite(x_sq)  # NaN/±inf values or squares overflowing fp32
    zero = x_sq == 0
    if bool(zero.any()):  # an underflowing square also gives 0: only rows of exact zeros are special
        zero &= (x == 0).all(dim=1)
    fast = ~(slow | zero)
    if bool(slow.any()):
        rows = slow.nonzero().squeeze(1)
        out[rows] = brute_force(x[rows], c)
    if bool(zero.any()):  # D = Σ c_k², the same for every zero row: one vector over the codes
        rows = zero.nonzero().squeeze(1)
        d0 = distance64(torch.zeros_like(c), c)
        ties = (d0 == d0.min()).nonzero().squeeze(1)
        if tie_break == "first":
            out[rows] = ties[0]
        else:
            out[rows] = ties[torch.randint(ties.numel(), (rows.numel(),), generator=generator).to(x.device)]
    if bool(fast.all()):
        rows, xf = torch.arange(n, device=x.device), x
    else:
        rows = fast.nonzero().squeeze(1)
        if rows.numel() == 0:
            return out
        xf = x.index_select(0, rows)
    with _ieee_fp32(x.device):
        if d == 1:
            out[rows] = one_dim(xf, c, tie_break, generator)
            return out
        if d == 2:
            index = ANGULAR_CACHE.get(c, build=rows.numel() >= _MIN_ROWS_TO_INDEX)
            if index is not None:  # in row chunks: a few hundred bytes of candidates per row
                ok = torch.cat([_two_dim_into(out, rows[i:i + _ROWS_2D], xf[i:i + _ROWS_2D], c, index, tie_break,
                                              generator) for i in range(0, rows.numel(), _ROWS_2D)])
                rows, xf = rows[~ok], xf[~ok]
                if rows.numel() == 0:
                    return out
        out[rows] = general(xf, c, tie_break, generator, block_elems, max_codes_per_block)
    return out


def _two_dim_into(out: Tensor, rows: Tensor, x: Tensor, c: Tensor, index: AngularIndex, tie_break: TieBreak,
                  generator: Optional[torch.Generator]) -> Tensor:
    got, ok = two_dim(x, c, index, tie_break, generator)
    out[rows[ok]] = got[ok]
    return ok


def _nonfinite_codebook(x: Tensor, c: Tensor, finite_row: Tensor, finite_code: Tensor, tie_break: TieBreak,
                        generator: Optional[torch.Generator], block_elems: Optional[int],
                        max_codes_per_block: Optional[int]) -> Tensor:
    """Codebook rows with NaN/±inf, under torch.argmin semantics on the float64 distances (module docstring)."""
    n = x.shape[0]
    out = torch.zeros(n, dtype=torch.long, device=x.device)
    nan_code = torch.isnan(c).any(dim=1)
    good = finite_row.nonzero().squeeze(1)
    if bool(nan_code.any()):
        out[good] = nan_code.nonzero()[0, 0]  # every finite row's distance to it is NaN: the first NaN wins
    elif bool(finite_code.any()):  # ±inf codes are infinitely far from finite rows
        keep = finite_code.nonzero().squeeze(1)
        sub = nearest(x[good], c[keep], tie_break=tie_break, generator=generator, block_elems=block_elems,
                      max_codes_per_block=max_codes_per_block)
        out[good] = keep[sub]
    bad = (~finite_row).nonzero().squeeze(1)
    if bad.numel():
        out[bad] = brute_force(x[bad], c)
    return out
