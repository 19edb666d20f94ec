"""Quantizer values against independent oracles.

- GSQ: the spec's formulas (gsq-reference.md §2.3–2.4) written out here with exact pairwise distances.
- FSQ, LFQ: vector-quantize-pytorch's `FSQ` / `LFQ` on the same inputs, and the spec formulas (§8.3–8.4).
- VQ-EMA: one update step computed by hand.
- Chunked search (`nearest_code`): float64 full-matrix argmin; exact ties on integer data.
- Lookup precision: the `exact` default unchanged by bf16 autocast; `bf16` equals a hand-written bf16 matmul
  lookup (the float64 ground-truth tests of `exact` are in tests/test_exact_lookup.py).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from gsqbench.lookup import nearest_code
from gsqbench.registry import QUANTIZERS, build_quantizer, discover_quantizers

discover_quantizers()


def _module_of(name: str):  # the by-path-loaded module holding a quantizer class (never `import tokenizers`)
    return sys.modules[QUANTIZERS.get(name).__module__]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ GSQ


def _gsq_oracle(z: torch.Tensor, codebook: torch.Tensor, groups: int, beta: float):
    """Spec §2.3–2.4: per-group l2 normalise, nearest normalised row (exact distances), raw-row output."""
    b, c, h, w = z.shape
    d = c // groups
    zg = z.permute(0, 2, 3, 1).reshape(b, h, w, groups, d)  # group g = channels [g·d, (g+1)·d)
    z_hat = zg / zg.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    c_hat = codebook / codebook.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = ((z_hat.double()[..., None, :] - c_hat.double()) ** 2).sum(-1)  # (b, h, w, G, V), exact
    idx = dist.argmin(dim=-1)
    q = codebook[idx]  # raw rows, one codebook for every group
    loss = F.mse_loss(q, z_hat.detach()) + beta * F.mse_loss(q.detach(), z_hat)
    out = z_hat + (q - z_hat).detach()
    return idx, out.reshape(b, h, w, c).permute(0, 3, 1, 2), loss


def test_gsq_matches_spec_formulas_with_non_unit_codebook() -> None:
    torch.manual_seed(0)
    q = build_quantizer({"name": "gsq", "dim": 6, "codebook_size": 24, "groups": 3})
    assert list(q.state_dict()) == ["codebook.weight"] and q.codebook.weight.shape == (24, 2)  # shared, V×d
    with torch.no_grad():  # rows far from the sphere: output must be the RAW rows
        scale = torch.rand(24, 1, generator=_gen(1)) * 3 + 0.2
        q.codebook.weight.mul_(scale)
    codebook_ref = q.codebook.weight.detach().clone().requires_grad_(True)
    z = torch.randn(2, 6, 3, 4, generator=_gen(2), requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    q.train()
    out = q(z)
    idx, out_ref, loss_ref = _gsq_oracle(z_ref, codebook_ref, groups=3, beta=0.25)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.z_q, out_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.z_q, codebook_ref[idx].reshape(2, 3, 4, 6).permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(out.losses["quantizer"], loss_ref, rtol=1e-6, atol=1e-7)
    weights = torch.randn(out.z_q.shape, generator=_gen(3))
    ((out.z_q * weights).sum() + out.losses["quantizer"]).backward()
    ((out_ref * weights).sum() + loss_ref).backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.codebook.weight.grad, codebook_ref.grad, rtol=1e-5, atol=1e-7)


def test_gsq_uses_every_group_on_the_same_codebook() -> None:
    # two groups holding identical latents must pick the same code: one shared table, not one per group
    torch.manual_seed(0)
    q = build_quantizer({"name": "gsq", "dim": 4, "codebook_size": 64, "groups": 2}).eval()
    half = torch.randn(1, 2, 5, 5, generator=_gen(4))
    out = q(torch.cat([half, half], dim=1))
    assert torch.equal(out.indices[..., 0], out.indices[..., 1])


def test_gsq_init_rules() -> None:
    torch.manual_seed(0)
    sph = build_quantizer({"name": "gsq", "dim": 4, "codebook_size": 500, "groups": 2})
    torch.testing.assert_close(sph.codebook.weight.norm(dim=1), torch.ones(500))
    uni = build_quantizer({"name": "gsq", "dim": 4, "codebook_size": 500, "groups": 1, "init": "uniform"})
    assert uni.codebook.weight.abs().max() <= 1 / 500
    one = build_quantizer({"name": "gsq", "dim": 4, "codebook_size": 500, "groups": 4, "init": "uniform"})
    assert one.codebook.weight.abs().max() <= 1 and one.codebook.weight.abs().max() > 0.5  # U(-1, 1) when d = 1


def test_gsq_clip_is_clamp_on_latent_and_codebook() -> None:
    torch.manual_seed(0)
    q = build_quantizer({"name": "gsq", "dim": 3, "codebook_size": 7, "groups": 3, "norm": "clip", "init": "uniform"})
    with torch.no_grad():
        q.codebook.weight.copy_(torch.tensor([[-3.0], [-0.6], [-0.1], [0.05], [0.4], [0.9], [2.0]]))
    z = torch.tensor([-5.0, 0.5, 1.7]).view(1, 3, 1, 1)
    out = q.eval()(z)
    # clamp(z) = (-1, 0.5, 1); clamp(C) = (-1, -.6, -.1, .05, .4, .9, 1): nearest are rows 0, 4, 6 (raw rows out)
    assert out.indices.flatten().tolist() == [0, 4, 6]
    assert out.z_q.flatten().tolist() == [-3.0, pytest.approx(0.4), 2.0]


def test_gsq_entropy_quirk_matches_full_softmax_of_distance() -> None:
    # spec §2.5: mean over tokens of H(softmax(dist / T)) with the distance itself as affinity
    mod = _module_of("gsq")
    # float64 end to end, so the comparison tests the blocking, not fp32 rounding
    z = F.normalize(torch.randn(37, 3, generator=_gen(5), dtype=torch.float64), dim=1).requires_grad_(True)
    c = torch.randn(50, 3, generator=_gen(6), dtype=torch.float64).requires_grad_(True)
    got = mod.sample_entropy_of_distance(z, c, temperature=0.7, block_elems=37 * 7)  # 8 uneven blocks
    dist = ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # exact pairwise squared distance
    p = torch.softmax(dist / 0.7, dim=1)
    want = torch.special.entr(p).sum(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    g_got = torch.autograd.grad(got, (z, c))
    g_want = torch.autograd.grad(want, (z, c))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# -------------------------------------------------------------------------------------- lookup precision


def test_default_lookup_ignores_bf16_autocast_and_bf16_option_matches_hand_lookup() -> None:
    torch.manual_seed(0)
    q32 = build_quantizer({"name": "gsq", "dim": 4, "codebook_size": 4096, "groups": 2}).eval()
    q16 = build_quantizer({"name": "gsq", "dim": 4, "codebook_size": 4096, "groups": 2, "lookup_precision": "bf16"}).eval()
    q16.load_state_dict(q32.state_dict())
    z = torch.randn(2, 4, 8, 8, generator=_gen(7))
    plain = q32(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = q32(z).indices
        official_style = _official_bf16_autocast_lookup(z, q32.codebook.weight)
    assert torch.equal(plain, auto)
    # hand-written bf16 lookup (spec §2.3): fp32 norms, bf16 matmul rounded to bf16, fp32 subtraction
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 2), dim=1)
    cn = F.normalize(q32.codebook.weight.detach(), dim=1)
    dot = (zn.bfloat16() @ cn.bfloat16().T).float()
    hand = ((zn * zn).sum(1, keepdim=True) + (cn * cn).sum(1) - 2 * dot).argmin(dim=1).view(2, 8, 8, 2)
    got = q16(z).indices
    assert torch.equal(got, hand)
    assert torch.equal(got, official_style)
    assert not torch.equal(got, plain)  # at V = 4096, d = 2 the bf16 grid changes codes (spec §2.3)


def _official_bf16_autocast_lookup(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The official compute_dist + argmin, run as-is inside the caller's bf16 autocast."""
    x = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 2), dim=-1)
    c = F.normalize(codebook.detach(), dim=-1)
    dist = torch.sum(x**2, dim=1, keepdim=True) + torch.sum(c**2, dim=1) - 2 * torch.matmul(x, c.t())
    return torch.argmin(dist, dim=-1).view(2, 8, 8, 2)


# ---------------------------------------------------------------------------------------- chunked search


@pytest.mark.parametrize("v,d,codes_per_block,block_elems", [(1000, 2, 384, 384 * 37), (777, 8, 100, 100 * 64), (3000, 16, 1 << 16, 1 << 22)])
def test_nearest_code_matches_full_argmin_when_tie_free(v: int, d: int, codes_per_block: int, block_elems: int) -> None:
    x = torch.randn(300, d, generator=_gen(v))
    c = torch.randn(v, d, generator=_gen(v + 1))
    got = nearest_code(x, c, max_codes_per_block=codes_per_block, block_elems=block_elems)
    dist = torch.cdist(x.double(), c.double()) ** 2
    two = dist.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4 * (1 + two[:, 0])  # rows whose winner is not within fp32 noise
    assert clear.float().mean() > 0.9
    assert torch.equal(got[clear], dist.argmin(dim=1)[clear])


def test_nearest_code_first_index_on_exact_ties_across_blocks() -> None:
    # small integers make every distance exact in fp32, so ties are real ties; duplicates span blocks
    c = torch.randint(-3, 4, (200, 3), generator=_gen(8)).float()
    c[150:] = c[:50]  # rows 150.. duplicate rows 0.. (different blocks of 64)
    x = torch.randint(-3, 4, (500, 3), generator=_gen(9)).float()
    got = nearest_code(x, c, max_codes_per_block=64, block_elems=64 * 50)
    want = (torch.cdist(x.double(), c.double()) ** 2).round().argmin(dim=1)  # torch.argmin: first index
    assert torch.equal(got, want)
    assert (got < 150).all()


# ------------------------------------------------------------------------------------------------ FSQ


def _fsq_spec(z: torch.Tensor, levels: list[int], eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §8.3 (paper appendix formula), channel-last z: (pre-round bounded value, centred code)."""
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 - eps) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    shift = torch.tan(offset / half_l)
    bounded = torch.tanh(z.double() + shift) * half_l - offset
    return bounded, torch.round(bounded) / torch.floor(lv / 2)


def test_fsq_matches_spec_and_vector_quantize_pytorch() -> None:
    from vector_quantize_pytorch import FSQ

    levels = [8, 5, 5, 3, 4]
    ours = build_quantizer({"name": "fsq", "levels": levels}).eval()
    ref = FSQ(levels=levels).eval()
    z = torch.randn(4, 5, 6, 7, generator=_gen(10)) * 1.5
    out = ours(z)
    ref_codes, ref_idx = ref(z)
    bounded, spec_codes = _fsq_spec(z.permute(0, 2, 3, 1), levels)
    torch.testing.assert_close(out.z_q.permute(0, 2, 3, 1).double(), spec_codes, rtol=0, atol=1e-7)
    # vqtorch uses atanh and (1 + eps) in the bound: only values within ~0.004 of a rounding edge may differ
    away = (bounded - bounded.floor() - 0.5).abs() > 0.02
    assert away.float().mean() > 0.95
    assert torch.equal(out.z_q.permute(0, 2, 3, 1)[away], ref_codes.permute(0, 2, 3, 1)[away])
    all_away = away.all(dim=-1)
    assert torch.equal(out.indices[..., 0][all_away], ref_idx.long()[all_away])  # same mixed radix
    assert torch.equal(ours.indices_to_codes(out.indices).permute(0, 2, 3, 1)[all_away],
                       ref.indices_to_codes(ref_idx).permute(0, 2, 3, 1)[all_away])


def test_fsq_level_sets_and_presets() -> None:
    for levels in ([8, 6, 5], [7, 4, 3]):
        q = build_quantizer({"name": "fsq", "levels": levels}).eval()
        z = torch.linspace(-8, 8, 4001).view(1, 1, 1, -1).expand(1, len(levels), 1, 4001).contiguous()
        codes = q(z.permute(0, 3, 2, 1).reshape(1, 4001, len(levels), 1).permute(0, 2, 1, 3)).z_q
        for k, lv in enumerate(levels):
            got = sorted(set(codes[0, k].flatten().tolist()))
            half = lv // 2
            want = [(i - half) / half for i in range(lv)]  # centred levels, values in [-1, 1]
            assert got == pytest.approx(want)
    assert build_quantizer({"name": "fsq", "codebook_size": 8192}).levels == [8, 8, 8, 4, 4]
    big = build_quantizer({"name": "fsq", "codebook_size": 262144})
    assert big.levels == [8, 8, 8, 8, 8, 8] and big.codebook_size == 262144 and big.dim == 6


# ------------------------------------------------------------------------------------------------ LFQ


def _bit_reverse(idx: torch.Tensor, k: int) -> torch.Tensor:
    bits = (idx[..., None] >> torch.arange(k - 1, -1, -1)) & 1  # vqtorch: channel 0 most significant
    return (bits * (2 ** torch.arange(k))).sum(-1)


def test_lfq_matches_vector_quantize_pytorch_values_indices_and_losses() -> None:
    from vector_quantize_pytorch import LFQ

    k = 5
    ours = build_quantizer({"name": "lfq", "dim": k}).train()  # commitment 0.25, entropy 0.1, tau 0.01
    ref = LFQ(dim=k, entropy_loss_weight=0.1, commitment_loss_weight=0.25, diversity_gamma=1.0).train()
    # small latents keep every code's probability above vqtorch's 1e-5 log clamp, so entropies are exact
    z = torch.randn(3, k, 4, 4, generator=_gen(11)) * 1e-3
    z[0, 0, 0, 0] = 0.0  # sign(0) → −1 in both
    out = ours(z)
    (ref_out, ref_idx, ref_aux), parts = ref(z, return_loss_breakdown=True)
    torch.testing.assert_close(out.z_q, ref_out, rtol=0, atol=1e-6)
    assert set(out.z_q.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out.indices[..., 0], _bit_reverse(ref_idx.long(), k))
    torch.testing.assert_close(out.stats["per_sample_entropy"], parts.per_sample_entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.stats["batch_entropy"], parts.batch_entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sum(out.losses.values()), ref_aux, rtol=1e-4, atol=1e-6)
    ours.eval()
    ref.eval()
    ref_eval, _, _ = ref(z)
    assert torch.equal(ours(z).z_q, ref_eval)


def test_lfq_chunked_entropy_equals_full_softmax_including_gradient() -> None:
    mod = _module_of("lfq")
    k, tau = 8, 0.01
    # float64 end to end, so the comparison tests the blocking and the hand-written backward, not fp32 rounding
    z = (torch.randn(64, k, generator=_gen(12), dtype=torch.float64) * 0.01).requires_grad_(True)
    per_sample, batch = mod.lfq_entropy_terms(z, tau, block_elems=64 * 23)  # 12 blocks, last one partial
    codes = ((torch.arange(2**k)[:, None] >> torch.arange(k)) & 1).double() * 2 - 1  # channel 0 LSB
    p = torch.softmax(2 * z @ codes.T / tau, dim=1)  # spec §8.4 logits over all 2^K codes
    want_ps = torch.special.entr(p).sum(1).mean()
    want_b = torch.special.entr(p.mean(0)).sum()
    torch.testing.assert_close(per_sample, want_ps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batch, want_b, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(per_sample - batch, z)[0]
    g_want = torch.autograd.grad(want_ps - want_b, z)[0]
    torch.testing.assert_close(g, g_want, rtol=1e-8, atol=1e-10)


def test_lfq_index_convention() -> None:
    q = build_quantizer({"name": "lfq", "codebook_size": 16}).eval()
    z = torch.tensor([0.3, -0.1, 0.0, 2.0]).view(1, 4, 1, 1)
    out = q(z)
    assert out.indices.item() == 1 + 8  # channel 0 least significant; z = 0 maps to −1
    assert out.z_q.flatten().tolist() == [1.0, -1.0, -1.0, 1.0]


# ------------------------------------------------------------------------------------------------ VQ-EMA


def test_vq_ema_one_step_by_hand() -> None:
    q = build_quantizer({"name": "vq", "dim": 2, "codebook_size": 3, "ema": True, "ema_decay": 0.9,
                         "ema_eps": 1e-5, "commitment_weight": 0.25})
    c0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]])
    with torch.no_grad():
        q.codebook.weight.copy_(c0)
        q.ema_embed_sum.copy_(c0)
    pts = torch.tensor([[0.1, -0.2], [0.9, 1.2], [1.1, 0.7], [0.2, 0.1]])  # → codes 0, 1, 1, 0; code 2 unused
    z = pts.T.reshape(1, 2, 1, 4).requires_grad_(True)
    out = q.train()(z)
    assert out.indices.flatten().tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(out.z_q, c0[[0, 1, 1, 0]].T.reshape(1, 2, 1, 4))  # pre-update rows
    torch.testing.assert_close(out.losses["quantizer"], 0.25 * ((pts - c0[[0, 1, 1, 0]]) ** 2).mean())
    # hand step: N ← .9·N + .1·n (N starts at 1), S ← .9·S + .1·Σz, Laplace smoothing, C = S / N̂
    n = torch.tensor([2.0, 2.0, 0.0])
    s = torch.stack([pts[0] + pts[3], pts[1] + pts[2], torch.zeros(2)])
    big_n = 0.9 * torch.ones(3) + 0.1 * n
    big_s = 0.9 * c0 + 0.1 * s
    total = big_n.sum()
    smoothed = (big_n + 1e-5) / (total + 3 * 1e-5) * total
    torch.testing.assert_close(q.codebook.weight, big_s / smoothed[:, None])
    torch.testing.assert_close(q.ema_cluster_size, big_n)
    assert not q.codebook.weight.requires_grad
    out.losses["quantizer"].backward()
    assert q.codebook.weight.grad is None and z.grad is not None


def test_vq_default_is_papers_baseline() -> None:
    torch.manual_seed(0)
    q = build_quantizer({"name": "vq", "dim": 4, "codebook_size": 64})
    assert q.codebook.weight.abs().max() <= 1 / 64 and q.norm == "none"
    z = torch.randn(2, 4, 3, 3, generator=_gen(13))
    out = q.train()(z)
    zl = z.permute(0, 2, 3, 1).reshape(-1, 4)
    idx = torch.cdist(zl.double(), q.codebook.weight.double()).argmin(1)
    assert torch.equal(out.indices.flatten(), idx)
    want = 1.25 * ((q.codebook.weight[idx] - zl) ** 2).mean()
    torch.testing.assert_close(out.losses["quantizer"], want)


def test_vq_restart_replaces_dead_codes_with_batch_latents() -> None:
    torch.manual_seed(0)
    q = build_quantizer({"name": "vq", "dim": 2, "codebook_size": 8, "restart_dead_codes": True,
                         "dead_code_threshold": 0.5})
    with torch.no_grad():
        q.codebook.weight.copy_(torch.full((8, 2), 100.0))
        q.codebook.weight[0] = 0.0  # only code 0 is ever nearest
    z = torch.randn(1, 2, 4, 4, generator=_gen(14))
    q.train()(z)
    lat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    rows = q.codebook.weight.detach()[1:]
    assert all(any(torch.equal(r, l) for l in lat) for r in rows)  # every dead row is now a batch latent
    assert math.isclose(float(q.codebook.weight.detach()[0].abs().sum()), 0.0)


_DDP_SCRIPT = '''
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from gsqbench.registry import build_quantizer
    torch.manual_seed(0)
    q = build_quantizer({"name": "vq", "dim": 2, "codebook_size": 4, "ema": True, "ema_decay": 0.9}).train()
    z = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))  # the global batch
    q(z[rank:rank + 1])  # each rank sees its half
    torch.save(q.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


@pytest.mark.slow
def test_vq_ema_all_reduces_statistics_across_two_gloo_ranks(tmp_path) -> None:
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_vq.py"
    script.write_text(_DDP_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    single = build_quantizer({"name": "vq", "dim": 2, "codebook_size": 4, "ema": True, "ema_decay": 0.9}).train()
    half = build_quantizer({"name": "vq", "dim": 2, "codebook_size": 4, "ema": True, "ema_decay": 0.9}).train()
    half.load_state_dict(single.state_dict())
    z = torch.randn(2, 2, 3, 3, generator=_gen(1))
    single(z)  # one process on the whole global batch
    half(z[:1])  # what rank 0 would hold without the all-reduce
    for key, value in single.state_dict().items():
        torch.testing.assert_close(r0[key], value)
        torch.testing.assert_close(r1[key], value)
    assert not torch.allclose(half.codebook.weight, single.codebook.weight)


def test_gsq_tie_break_options_training_only() -> None:
    # official `gsq` class options: 'random' picks uniformly among exactly tied codes, 'softmax' samples
    # softmax(−dist/τ); evaluation always takes the first index
    torch.manual_seed(0)
    q = build_quantizer({"name": "gsq", "dim": 2, "codebook_size": 70000, "tie_break": "random"})
    with torch.no_grad():
        q.codebook.weight[:] = torch.tensor([0.0, -1.0])
        q.codebook.weight[3] = torch.tensor([1.0, 0.0])
        q.codebook.weight[69000] = torch.tensor([2.0, 0.0])  # same direction: an exact tie after l2 norm, other block
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 10, 10).contiguous()
    picked = q.train()(z).indices.flatten()
    assert set(picked.tolist()) == {3, 69000} and 0.3 < (picked == 3).float().mean() < 0.7
    assert set(q.eval()(z).indices.flatten().tolist()) == {3}
    q.tie_break = "softmax"
    q.softmax_tau = 1e-3  # near-argmax: the two tied codes only (others are ≥ 2 away in squared distance)
    assert set(q.train()(z).indices.flatten().tolist()) <= {3, 69000}
    q.softmax_tau = 1e6  # near-uniform over all V codes
    spread = q.train()(z).indices.flatten()
    assert spread.unique().numel() > 90


def test_vq_ema_codebook_is_not_updated_by_a_no_grad_forward():
    """The D step re-runs the generator under no_grad in train mode; only the G step may move EMA statistics."""
    from gsqbench.registry import build_quantizer, discover_quantizers

    discover_quantizers()
    torch.manual_seed(0)
    q = build_quantizer({"name": "vq", "dim": 4, "codebook_size": 16, "ema": True}).train()
    z = torch.randn(2, 4, 3, 3)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q(z)  # a grad-enabled training forward does update them
    assert not all(torch.equal(before[k], v) for k, v in q.state_dict().items())
