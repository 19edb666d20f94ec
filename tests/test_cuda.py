"""Checks that only mean something on a CUDA GPU. Marked `cuda`: skipped, with the reason, where
torch.cuda.is_available() is False; `benchmarks/gpu.py` runs them on a GPU, and `--cuda-dry-run` (what
`benchmarks/gpu.py --device cpu --tiny` passes in CI) runs them on the CPU at small sizes so their code cannot rot.

1. NCCL: under a one-process torchrun environment gsqbench.distributed initialises NCCL on CUDA (gloo in the dry
   run), its reductions work on device tensors, a DDP-wrapped step gives the plain step's gradients, and
   shutdown ends the group.
2. The official bf16 lookup: `lookup_precision: bf16` indices equal the official compute_dist + argmin written out
   here and run as-is under bf16 autocast on the device (on CUDA: cuBLAS's bf16 GEMM, rounded to bf16), at F16's
   d = 2, G = 8 and V = 262,144. Oracle: the official formula itself; and the bf16 picks are shown not to be the
   nearest codes (the lookup-precision study), so the check is about the bf16 grid, not a coincidence.
3. Evaluation on CUDA equals evaluation on the CPU for PSNR, SSIM and codebook usage on the same checkpoint (the
   F16 GSQ-GAN architecture, random init, V = 262,144). Tolerances, and why (see the test's docstring): cuDNN and
   the CPU convolutions round differently (TF32 is off in evaluation, so both are fp32, ~1e-6 relative per layer);
   at d = 2 and V = 262,144 neighbouring codes are ~2.4e-5 rad apart, so that rounding moves some tokens to a
   neighbouring code. Every such token is checked to be explained: each device's pick is the float64 nearest code
   of the rows that device computed (so the lookup is right on both and only its inputs differ).
"""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gsqbench import distributed as ddp
from gsqbench.lookup import nearest_code
from gsqbench.registry import build_quantizer, discover_quantizers

pytestmark = pytest.mark.cuda
discover_quantizers()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- NCCL


def test_torchrun_single_process_initialises_nccl_reduces_and_shuts_down(cuda_device, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "gsqbench-test")  # what torchrun sets in its workers
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    assert ddp.init_from_env(cuda_device.type, timeout_s=120)
    try:
        assert dist.get_backend() == ("nccl" if cuda_device.type == "cuda" else "gloo")
        assert ddp.world_size() == 1 and ddp.is_main()
        dev = ddp.resolve_device(cuda_device.type)
        assert dev.type == cuda_device.type
        exact = torch.tensor([0.1, 2.0**53, -3.0], dtype=torch.float64, device=dev)
        total = ddp.all_reduce_sum(exact)
        assert total.dtype == torch.float64 and total.device == exact.device and torch.equal(total, exact)
        assert torch.equal(ddp.all_reduce_max(torch.tensor([7], device=dev)).cpu(), torch.tensor([7]))
        assert ddp.gather_per_image(["b", "a"], [2, 1]) == (["a", "b"], [1, 2])
        assert ddp.broadcast_object({"k": [1, 2]}) == {"k": [1, 2]}
        # a DDP step (gradients all-reduced through the backend) gives the plain step's gradients at world size 1
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4)).to(dev)
        wrapped_module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4)).to(dev)
        wrapped_module.load_state_dict(plain.state_dict())
        wrapped = ddp.wrap(wrapped_module, dev, find_unused=False)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        x = torch.randn(2, 3, 8, 8, generator=_gen(1)).to(dev)
        plain(x).square().mean().backward()
        wrapped(x).square().mean().backward()
        for a, b in zip(plain.parameters(), wrapped_module.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
        ddp.barrier()
    finally:
        ddp.shutdown()
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------------- bf16 lookup


def _official_bf16_lookup(z: torch.Tensor, codebook: torch.Tensor, groups: int) -> torch.Tensor:
    """The official GSQ lookup as written (compute_dist + argmin), run as-is in the caller's autocast."""
    d = codebook.shape[1]
    x = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)  # channels last, G consecutive groups of d
    c = F.normalize(codebook.detach(), dim=-1)
    dist_ = torch.sum(x**2, dim=1, keepdim=True) + torch.sum(c**2, dim=1) - 2 * torch.matmul(x, c.t())
    b, _, h, w = z.shape
    return torch.argmin(dist_, dim=-1).view(b, h, w, groups)


def test_bf16_lookup_equals_official_compute_dist_under_autocast(cuda_device):
    on_gpu = cuda_device.type == "cuda"
    v, side = (262_144, 16) if on_gpu else (4_096, 4)  # F16: 256 positions × 8 groups against V codes
    torch.manual_seed(0)
    q = build_quantizer({"name": "gsq", "dim": 16, "codebook_size": v, "groups": 8,
                         "lookup_precision": "bf16"}).to(cuda_device).eval()
    z = torch.randn(1, 16, side, side, generator=_gen(7)).to(cuda_device)
    with torch.no_grad():
        got = q(z).indices
        with torch.autocast(cuda_device.type, dtype=torch.bfloat16):
            official = _official_bf16_lookup(z, q.codebook.weight, 8)
            inside = q(z).indices  # the mode, not the caller's autocast, decides the lookup
    differ = int((got != official).sum())
    assert differ == 0, f"{differ} of {got.numel()} bf16 indices differ from the official lookup under autocast"
    assert torch.equal(inside, got)
    # the official bf16 grid is not the nearest code at d = 2 (spec §2.3): most picks differ from `exact`
    rows = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 2), dim=-1)
    nearest = nearest_code(rows, F.normalize(q.codebook.weight.detach(), dim=-1)).view_as(got)
    assert float((nearest == got).double().mean()) < 0.5


# ---------------------------------------------------------------------------------- evaluation CUDA vs CPU


def _float64_nearest(rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """argmin of Σ(x − c)² in float64, lowest index on ties (the `exact` definition), for a few rows."""
    x, c = rows.double(), codes.double()
    d64 = (x[:, None, 0] - c[None, :, 0]).square()
    for k in range(1, x.shape[1]):
        d64 = d64 + (x[:, None, k] - c[None, :, k]).square()
    return d64.argmin(dim=1)


def _evaluate_recording(checkpoint, dataset, settings, device):
    """Evaluate the checkpoint on `device`, recording the rows and codebook the quantizer's lookup received."""
    from gsqbench.checkpoints import load_tokenizer
    from gsqbench.evaluate import evaluate

    tok, _ = load_tokenizer(checkpoint)
    tok = tok.to(device).eval()
    quantizer, seen = tok.quantizer, []
    lookup = quantizer._lookup

    def recording(rows, codebook):
        idx = lookup(rows, codebook)
        seen.append((rows.float().cpu(), codebook.float().cpu(), idx.cpu()))
        return idx

    quantizer._lookup = recording
    result = evaluate(tok, dataset, settings, device=device)
    rows = torch.cat([r for r, _, _ in seen])
    idx = torch.cat([i for _, _, i in seen])
    return result, rows, seen[0][1], idx


def test_evaluation_on_cuda_equals_cpu_on_the_same_checkpoint(cuda_device, tmp_path, record_property):
    """PSNR, SSIM and usage of one checkpoint evaluated on the CPU and on CUDA (gsqbench mode: fp32, TF32 off).

    Tolerances. (1) Tokens: a token may take a different code on the two devices only if each device's pick is
    the float64 nearest code of the rows that device computed, i.e. the lookup is exact on both and only its
    inputs differ by rounding (checked for every differing token). (2) Usage: each differing token moves one
    count, so Σ|Δ code counts| ≤ 2 × differing tokens (equal counts, hence equal usage, when none differ).
    (3) PSNR per image within 0.05 dB and SSIM within 1e-3, means within 0.01 dB and 2e-4: fp32 rounding
    (~1e-5 relative at the output) moves an 8-bit value by one level only near a rounding boundary, a change of
    (2e + 1)/pixels in an image's MSE per moved value (e its error in levels): ~1e-3 dB; a token that moved to a
    neighbouring code (~2.4e-5 rad away) changes the decoder input by as little. A wrong lookup, TF32 left on or
    a device-dependent uint8 conversion gives differences orders of magnitude larger. On the CPU dry run both
    sides are CPU and must agree exactly.
    """
    from gsqbench.checkpoints import save_tokenizer
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import EvalSettings
    from gsqbench.models.tokenizer import build_tokenizer

    on_gpu = cuda_device.type == "cuda"
    preset, size, n_images, v = ("f16", 256, 4, 262_144) if on_gpu else ("tiny-f8", 32, 2, 4_096)
    model_spec = {"preset": preset, "latent_dim": 16}
    q_spec = {"name": "gsq", "dim": 16, "codebook_size": v, "groups": 8}
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint"
    save_tokenizer(ckpt, build_tokenizer(model_spec, q_spec).eval(), model_spec, q_spec, {"weights": "raw"})
    data = build_dataset("synthetic", resolution=size, n=n_images)
    settings = EvalSettings(batch_size=2, samples=0, metrics=("psnr", "ssim", "codebook"), progress=False)

    cpu, rows_cpu, codes_cpu, idx_cpu = _evaluate_recording(ckpt, data, settings, torch.device("cpu"))
    acc, rows_acc, codes_acc, idx_acc = _evaluate_recording(ckpt, data, settings, cuda_device)

    moved = (idx_cpu != idx_acc).nonzero().squeeze(1)
    record_property("tokens", idx_cpu.numel())
    record_property("tokens_on_another_code", moved.numel())
    record_property("max_row_difference", float((rows_cpu - rows_acc).abs().max()))
    if moved.numel():
        assert moved.numel() <= 0.5 * idx_cpu.numel(), f"{moved.numel()} of {idx_cpu.numel()} tokens moved"
        take = moved[:512]  # the float64 check on at most 512 tokens (each is a pass over V codes)
        assert torch.equal(_float64_nearest(rows_cpu[take], codes_cpu), idx_cpu[take])
        assert torch.equal(_float64_nearest(rows_acc[take], codes_acc), idx_acc[take])
    assert int(np.abs(cpu.code_counts.astype(np.int64) - acc.code_counts.astype(np.int64)).sum()) \
        <= 2 * moved.numel()

    psnr = np.abs(np.array(cpu.per_image["psnr"]) - np.array(acc.per_image["psnr"]))
    ssim = np.abs(np.array(cpu.per_image["ssim"]) - np.array(acc.per_image["ssim"]))
    record_property("max_psnr_difference_db", float(psnr.max()))
    record_property("max_ssim_difference", float(ssim.max()))
    assert cpu.per_image["image_id"] == acc.per_image["image_id"]
    assert psnr.max() <= 0.05 and ssim.max() <= 1e-3
    assert abs(cpu.value("psnr") - acc.value("psnr")) <= 0.01 and abs(cpu.value("ssim") - acc.value("ssim")) <= 2e-4
    usage = abs(cpu.value("usage_pooled") - acc.value("usage_pooled"))
    record_property("usage_pooled_difference", usage)
    assert usage <= moved.numel() / v + 1e-12
    if not on_gpu:  # dry run: CPU against CPU is the same computation
        assert moved.numel() == 0 and psnr.max() == 0 and ssim.max() == 0
    assert math.isfinite(acc.value("psnr"))
