"""`lookup_precision: exact` against a float64 brute force (issue 12, spec gsq-reference.md §2.3 correction).

Ground truth, written here in numpy without our code: for the fp32 rows and codes handed to the lookup,
D = Σ_k (x_k − c_k)² in float64 summed in index order, np.argmin (lowest index on exactly equal D; a NaN
distance wins, as in torch.argmin). Cases: random unit latents at d ∈ {1, 2, 4, 8, 16} with V = 262,144 (the
fp32 expanded form is shown to fail the same check at d = 2, so the check can fail); near-ties constructed
from integers, whose float64 distances are exact and differ by 1e-12 relative, plus exact ties; un-normalised
latents (VQ, norm none, the paper's uniform init); bf16 autocast; NaN/inf/zero rows; the angular-index cache
after an in-place codebook change; the training-only random tie-break among exact ties. The lookups run on the
session's `--device` (tests/conftest.py; benchmarks/gpu.py passes cuda: the accelerator search path); inputs
are drawn and the ground truth computed on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsqbench.errors import UserError
from gsqbench.lookup import nearest_code, sample_code
from gsqbench.registry import build_quantizer, discover_quantizers

discover_quantizers()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=_gen(seed)), dim=1)


def _on(device: torch.device, fn, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
    """fn(*tensors moved to device, **kwargs), brought back to the CPU."""
    return fn(*(t.to(device) for t in tensors), **kwargs).cpu()


def _distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(rows, V) float64 distances, summed in index order (NaN/inf propagate as IEEE says)."""
    with np.errstate(invalid="ignore", over="ignore"):
        acc = (x[:, None, 0] - c[None, :, 0]) ** 2
        for k in range(1, x.shape[1]):
            acc = acc + (x[:, None, k] - c[None, :, k]) ** 2
    return acc


def _truth(x: torch.Tensor, c: torch.Tensor, rows_per_chunk: int = 16) -> torch.Tensor:
    """np.argmin of the float64 distances of the fp32 values, in row chunks (never the whole N×V matrix)."""
    xn, cn = x.float().double().numpy(), c.float().double().numpy()
    out = [np.argmin(_distances(xn[i:i + rows_per_chunk], cn), axis=1) for i in range(0, len(xn), rows_per_chunk)]
    return torch.from_numpy(np.concatenate(out))


# rows per d keep the brute force at ~2.7e8 float64 element operations each
@pytest.mark.parametrize("d,n", [(1, 1024), (2, 512), (4, 192), (8, 96), (16, 48)])
def test_exact_is_the_float64_nearest_code_on_unit_latents(d: int, n: int, one_thread, device) -> None:
    v = 262_144
    x, c = _unit(n, d, d), _unit(v, d, 100 + d)
    want = _truth(x, c)
    assert torch.equal(_on(device, nearest_code, x, c), want)  # exact is the default
    if d == 2:  # the same check fails for the official expanded formula in fp32 (spec §2.3: ~7 % agree)
        agree = (_on(device, nearest_code, x, c, precision="fp32-expanded") == want).double().mean()
        assert agree < 0.3


def _near_tie_codes(d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x and a codebook where, in units of 2⁻²³, two codes are at squared distance 10¹² (an exact tie) and one
    at 10¹² + 1 (1e-12 relative farther, at a lower index), among random unit distractors. All
    values are integers · 2⁻²³ below 2²⁴ in magnitude, so fp32 holds them and float64 distances are exact."""
    s = 2.0 ** -23
    x = torch.zeros(1, d)
    x[0, 0] = 1.0
    c = _unit(300, d, 7 + d)
    c[:, 0] = -c[:, 0].abs()  # distractors on the far half-sphere (distance ≥ √2 from x)
    offsets = {40: (1_000_000, 1), 120: (600_000, 800_000), 200: (800_000, 600_000)}  # |a|² = 1e12 + 1, 1e12, 1e12
    for idx, (a0, a1) in offsets.items():
        c[idx] = x[0]
        c[idx, 0] -= a0 * s
        c[idx, 1] -= a1 * s
    return x, c, 120


@pytest.mark.parametrize("d", [2, 4])
def test_exact_resolves_constructed_near_ties_and_takes_the_lowest_of_exact_ties(d: int, device) -> None:
    x, c, want = _near_tie_codes(d)
    dist = _distances(x.double().numpy(), c.double().numpy())[0]
    assert dist[40] / dist[120] - 1 == pytest.approx(1e-12, rel=1e-3) and dist[120] == dist[200]
    assert int(_truth(x, c)[0]) == want
    assert int(_on(device, nearest_code, x, c)[0]) == want
    # 300 rows at other radii: at d = 2 the angular path (1 row takes the general one), same answers
    many = x.expand(300, d) * torch.linspace(0.5, 2.0, 300)[:, None]
    assert torch.equal(_on(device, nearest_code, many, c), _truth(many, c))


@pytest.mark.parametrize("d", [2, 4, 8])
def test_exact_vq_on_unnormalised_latents(d: int, device) -> None:
    # the paper's VQ baseline: uniform init U(±1/V) codes around 0, raw latents (norm none); and N(0, 1) codes
    q = build_quantizer({"name": "vq", "dim": 2 * d, "codebook_size": 16_384, "groups": 2}).eval()
    z = torch.randn(2, 2 * d, 6, 6, generator=_gen(d)) * 3.0
    rows = z.permute(0, 2, 3, 1).reshape(-1, d)
    for codebook in (q.codebook.weight.detach().clone(), torch.randn(16_384, d, generator=_gen(50 + d))):
        with torch.no_grad():
            q.codebook.weight.copy_(codebook)
        got = q.to(device)(z.to(device)).indices.flatten().cpu()
        q.cpu()
        assert torch.equal(got, _truth(rows, codebook))


def test_exact_indices_do_not_change_under_bf16_autocast(device) -> None:
    for cfg in ({"name": "gsq", "dim": 4, "codebook_size": 65_536, "groups": 2},
                {"name": "vq", "dim": 4, "codebook_size": 4_096}):
        torch.manual_seed(0)
        q = build_quantizer(cfg).eval()
        z = torch.randn(2, 4, 8, 8, generator=_gen(3))
        qd, zd = q.to(device), z.to(device)
        plain = qd(zd).indices.cpu()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            auto = qd(zd).indices.cpu()
        q.cpu()
        assert torch.equal(plain, auto)
        norm = F.normalize if cfg["name"] == "gsq" else (lambda t, dim: t)
        d = q.code_dim
        rows = norm(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        assert torch.equal(plain.flatten(), _truth(rows, norm(q.codebook.weight.detach(), dim=1)))


def test_non_finite_and_zero_rows_follow_argmin_of_the_float64_distances(device) -> None:
    c = _unit(5000, 2, 1)
    c[17] = 0.0  # a zero code: the nearest code of a zero row only if no code is shorter
    x = _unit(12, 2, 2)
    x[1] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0.0
    x[4] = torch.tensor([3e19, 1.0])  # squares overflow fp32
    x[5] = torch.tensor([1e-30, -1e-30])  # squares underflow
    want = _truth(x, c)
    assert torch.equal(_on(device, nearest_code, x, c), want)
    assert int(want[1]) == 0 and int(want[3]) == 17
    c[300, 1] = float("nan")  # a NaN code: every row's distance to it is NaN, and NaN wins in argmin
    assert torch.equal(_on(device, nearest_code, x, c), _truth(x, c))
    c[300] = torch.tensor([float("inf"), 0.0])  # an infinite code is never nearest for finite rows
    assert torch.equal(_on(device, nearest_code, x, c), _truth(x, c))


def test_angular_cache_follows_in_place_codebook_changes(device) -> None:
    c = _unit(20_000, 2, 4).to(device)
    x = _unit(300, 2, 5)
    assert torch.equal(nearest_code(x.to(device), c).cpu(), _truth(x, c.cpu()))
    c.data[:, 0] *= -1.0  # in place, through .data: same storage, no version bump
    assert torch.equal(nearest_code(x.to(device), c).cpu(), _truth(x, c.cpu()))


def test_random_tie_break_is_uniform_among_exact_float64_ties(device) -> None:
    # d = 1 with l2: every code is ±1, so a positive row ties with every +1 code
    c = torch.where(torch.rand(5000, 1, generator=_gen(6)) < 0.5, -1.0, 1.0)
    x = torch.ones(4000, 1)
    got = _on(device, sample_code, x, c, mode="random", generator=_gen(7))  # exact: CPU generator on any device
    plus = (c[:, 0] > 0).nonzero().squeeze(1)
    assert bool((c[got, 0] > 0).all())
    counts = torch.bincount(got, minlength=5000)[plus].double()
    assert counts.numel() > 2000 and got.unique().numel() > 0.5 * plus.numel()  # ~1.6 expected hits per code
    assert int(_on(device, nearest_code, x, c)[0]) == int(plus[0])  # deterministic lookup: the lowest index


@pytest.mark.parametrize("name", ["gsq", "vq"])
def test_the_former_fp32_mode_is_a_one_line_error_naming_the_new_modes(name: str) -> None:
    with pytest.raises(UserError) as err:
        build_quantizer({"name": name, "dim": 4, "codebook_size": 16, "lookup_precision": "fp32"})
    msg = str(err.value)
    assert "\n" not in msg and "'exact'" in msg and "'fp32-expanded'" in msg and "lookup_precision" in msg
    with pytest.raises(UserError, match="exact, fp32-expanded, bf16"):
        build_quantizer({"name": name, "dim": 4, "codebook_size": 16, "lookup_precision": "fp64"})


@pytest.mark.parametrize("d", [3, 8])
def test_exact_through_the_accelerator_search_path(d: int, monkeypatch) -> None:
    # the CUDA code path of the candidate search (large addmm-free blocks, top-2 per block), run here on CPU
    from gsqbench.lookup import expanded

    def accelerator(x, c, precision, block_elems, codes_per_block, slack=None):
        return expanded.search_accelerator(x, c, precision, 700 * 300, 700, slack)

    monkeypatch.setattr(expanded, "search_cpu", accelerator)
    x, c = _unit(400, d, 11), _unit(20_000, d, 12)
    assert torch.equal(nearest_code(x, c), _truth(x, c))


def test_thousands_of_duplicate_codes_first_and_random_tie_break(device) -> None:
    # 3,000 copies of one code (d = 3: the general path, every copy a candidate of every row near it)
    base = _unit(2000, 3, 21)
    dup = base[0].expand(3000, 3)
    c = torch.cat([base[1:1001], dup, base[1001:]])  # the copies are codes 1000..3999
    x = torch.cat([dup[:500], F.normalize(dup[:500] + 1e-3 * torch.randn(500, 3, generator=_gen(22)), dim=1)])
    assert torch.equal(_on(device, nearest_code, x, c), _truth(x, c))
    assert int(_on(device, nearest_code, x[:1], c)[0]) == 1000
    picks = _on(device, sample_code, dup[:2000].contiguous(), c, mode="random", generator=_gen(23))
    assert bool(((picks >= 1000) & (picks < 4000)).all()) and picks.unique().numel() > 1000  # ~1,460 expected
