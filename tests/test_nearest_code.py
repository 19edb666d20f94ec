"""The blocked expanded-distance search (`nearest_code` with precision `fp32-expanded` / `bf16`, module
gsqbench/lookup/expanded.py) against independent full-matrix lookups. The `exact` mode has its own float64
ground-truth tests in tests/test_exact_lookup.py.

Oracles, all written here without our search: float64 exact distances on tie-free rows; the straightforward
fp32 expanded-distance lookup with `torch.mm` + `torch.argmin` (what the official code runs, spec §2.3), which at
d = 2 and large V is decided by fp32 rounding, so it checks the rounding of every step, not only the ordering;
integer data, where every distance is exact in fp32, for first-index tie-breaking across block boundaries.
Both code paths are covered: the CPU element-wise/GEMM search and the accelerator path (run here on CPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsqbench.lookup import nearest_code
from gsqbench.lookup.expanded import search_accelerator


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _straightforward(x: torch.Tensor, c: torch.Tensor, precision: str = "fp32-expanded") -> torch.Tensor:
    """The full N×V expanded-distance lookup as the official compute_dist writes it."""
    if precision == "bf16":
        dot = (x.bfloat16() @ c.bfloat16().T).float()
    else:
        dot = x @ c.T
    dist = torch.sum(x**2, dim=1, keepdim=True) + torch.sum(c**2, dim=1) - 2 * dot
    return dist.argmin(dim=1)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=_gen(seed)), dim=1)


@pytest.mark.parametrize("d", [1, 2, 3, 8])
@pytest.mark.parametrize("precision", ["fp32-expanded", "bf16"])
def test_same_indices_as_straightforward_lookup_where_rounding_decides(d: int, precision: str) -> None:
    # unit vectors and a dense codebook: neighbouring codes are closer than fp32 resolution, as at F16
    x, c = _unit(100, d, d), _unit(10_000, d, d + 100)
    want = _straightforward(x, c, precision)
    if d == 2:  # the case really is decided by rounding, not by the ordering
        assert (want != (torch.cdist(x.double(), c.double()) ** 2).argmin(dim=1)).any()
    got = nearest_code(x, c, precision=precision, max_codes_per_block=1500, block_elems=1500 * 30)
    assert torch.equal(got, want)
    assert torch.equal(nearest_code(x, c, precision=precision), want)  # default blocks


def test_accelerator_path_matches_straightforward_lookup() -> None:
    x, c = _unit(150, 2, 1), _unit(9_000, 2, 2)
    for precision in ("fp32-expanded", "bf16"):
        got = search_accelerator(x, c, precision, 1000 * 40, 1000).index  # type: ignore[arg-type]
        assert torch.equal(got, _straightforward(x, c, precision))


@pytest.mark.parametrize("d", [2, 8])
def test_tie_free_rows_match_exact_argmin_with_uneven_blocks(d: int) -> None:
    x = torch.randn(333, d, generator=_gen(3)) * 2.0
    c = torch.randn(4_097, d, generator=_gen(4))
    got = nearest_code(x, c, precision="fp32-expanded", max_codes_per_block=1000, block_elems=1000 * 47)  # partial blocks
    dist = torch.cdist(x.double(), c.double()) ** 2
    two = dist.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4 * (1 + two[:, 0])
    assert clear.float().mean() > 0.9
    assert torch.equal(got[clear], dist.argmin(dim=1)[clear])


@pytest.mark.parametrize("d", [2, 8])
def test_first_index_on_exact_ties_inside_and_across_blocks(d: int) -> None:
    # small integers: every distance is exact in fp32, so ties are real; each code appears 3 times, in
    # different code blocks and at different offsets inside blocks
    base = torch.randint(-2, 3, (90, d), generator=_gen(5)).float()
    c = torch.cat([base, base.flip(0), base])  # 270 codes, blocks of 64
    x = torch.randint(-2, 3, (301, d), generator=_gen(6)).float()
    dist = ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)
    first = (dist == dist.min(dim=1, keepdim=True).values).double().argmax(dim=1)  # first True
    for precision in ("fp32-expanded", "exact"):
        assert torch.equal(nearest_code(x, c, precision=precision, max_codes_per_block=64, block_elems=64 * 20), first)
    assert torch.equal(search_accelerator(x, c, "fp32-expanded", 64 * 20, 64).index, first)


def test_nan_code_is_returned_like_torch_argmin() -> None:
    x, c = _unit(10, 2, 7), _unit(300, 2, 8)
    c[200] = float("nan")  # in a later block
    for precision in ("fp32-expanded", "exact"):
        got = nearest_code(x, c, precision=precision, max_codes_per_block=64, block_elems=64 * 4)
        assert torch.equal(got, torch.full((10,), 200))
