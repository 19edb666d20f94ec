"""The official GSQ evaluation's float metric inputs and its PSNR / SSIM arithmetic, restated with their dtypes.

Used by `gsq-compat` only (metrics-protocol.md §1, §14; gsq-reference.md §6, §9 items 5 and 15). The official
evaluation (flex_gen `evaluation/eval_tokenizer.py` driving `flex_gen/utils/metrics/metrics.py`) never quantises
the images it hands PSNR, SSIM and LPIPS. For a timm Normalize output x (fp32) and the decoder output x̂ of a bf16
autocast forward (bf16) it feeds torchmetrics

    real = clamp(clamp(x, −1, 1)·0.5 + 0.5, 0, 1)   in fp32
    fake = clamp(clamp(x̂, −1, 1)·0.5 + 0.5, 0, 1)   every step rounded in bf16

(`rescale_image_tensor` computes `img * std + mean` in the tensor's own dtype), and wraps each metric update in an
autocast context of the metric's device: bf16 for PSNR and LPIPS, fp32 for SSIM. The official runs were on CUDA,
where that gives:

- PSNR (`PeakSignalNoiseRatio(data_range=1.0)`, `dim=None`): Σ(fake − real)² with the bf16 fake promoted to fp32,
  pooled over the whole set: 10·log10(1 / (ΣSE / Σn)). Here the squared errors are summed in float64 (the exact
  value of that definition; torchmetrics sums in fp32, about 1e-7 relative away).
- SSIM (`StructuralSimilarityIndexMeasure(data_range=1.0)`: Gaussian 11 taps, σ 1.5, K1 0.01, K2 0.03, reflect pad
  5): torchmetrics casts the target to the prediction's dtype, so both images are bf16; the products x², y², xy are
  rounded in bf16; the window taps are built in the input dtype, so i/σ is rounded to bf16 before the fp32
  exp (CUDA autocast runs pow, exp and sum in fp32 and the outer-product matmul in the autocast dtype, fp32); the
  depthwise conv2d runs in fp32 (autocast casts its bf16 inputs up); the moments are fp32; the contrast terms
  2σxy + C2 and σx² + σy² + C2 are rounded to bf16 (`.to(dtype)` with the input dtype); the ratio and the
  per-image mean are fp32. Per-image values are averaged over the set.
- SSIM border: torchmetrics 1.4.0–1.4.1 average the map over the valid interior (the 5-px frame the reflect
  padding reaches is cropped: `valid`, = skimage); ≥ 1.4.2 average the whole reflect-padded map (`reflect-full`,
  torchmetrics PR #2721; 1.4.1 → 1.4.2 changed nothing else in this path, and nothing up to 1.9.0 did). Both
  clamp the variances at 0 (added in 1.4.0; older versions did not, which this module does not reproduce). The
  official code pins no torchmetrics version (its environment script pins torch 2.4.0 and installs torchmetrics
  unpinned), so which border the paper's tables used cannot be told; `ssim_border` records the choice.

This module always restates the CUDA arithmetic, on whichever device it runs. The same official code run on a CPU
computes something else: `torch.autocast("cpu", dtype=float32)` is disabled with a warning (SSIM entirely in bf16),
and CPU kernels round a Python scalar to bf16 before a bf16 op (C2 in the contrast terms) where CUDA keeps it fp32.
What the restatement does not reproduce bit for bit is the order of the fp32 sums: the 11-tap normalisation and
the depthwise filter (on CUDA an fp32 contiguous depthwise conv runs PyTorch's own kernel, not cuDNN, so TF32 never
applies; it accumulates the 121 taps one by one with FMA). Summing the filter in float64 instead moves this SSIM by
about 1e-5 relative on the sample photos: the size of difference to expect from a CUDA run.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

SSIM_RADIUS, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 5, 1.5, 0.01, 0.03
OfficialBorder = Literal["valid", "reflect-full"]

#: what PSNR / SSIM / LPIPS receive in gsq-compat (recorded in the protocol card)
OFFICIAL_INPUTS = "float [0,1], not quantised: real fp32, fake bf16 (flex_gen Metrics)"
#: the torchmetrics behaviour each SSIM border reproduces
BORDER_REFERENCE = {"valid": "torchmetrics 1.4.0-1.4.1 (valid interior, = skimage)",
                    "reflect-full": "torchmetrics >= 1.4.2 (full reflect-padded map, PR #2721)"}
SSIM_ARITHMETIC = ("official, torchmetrics under CUDA fp32 autocast: both images bf16 (target cast to the "
                   "prediction's dtype), products bf16, window from bf16 i/sigma with fp32 exp, fp32 conv2d (no "
                   "TF32) and moments, variances clamped at 0, contrast terms rounded to bf16 (C2 added in fp32), "
                   "fp32 ratio and mean")


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def official_real01(x: torch.Tensor) -> torch.Tensor:
    """The official real side for PSNR/SSIM/LPIPS: clamp(clamp(x, −1, 1)·0.5 + 0.5, 0, 1) in fp32."""
    return (x.float().clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)


def official_fake01(x_hat: torch.Tensor) -> torch.Tensor:
    """The official fake side: the same on the bf16 decoder output, every step rounded in bf16."""
    return (x_hat.to(torch.bfloat16).clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0)


def truncate_to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """The official uint8 for FID/IS: `(x * 255).type(torch.uint8)`, the product in x's own dtype, truncated."""
    return (x01 * 255).to(torch.uint8)  # float → uint8 casts truncate toward zero


def check_official_pair(real01: torch.Tensor, fake01: torch.Tensor, what: str) -> None:
    """The official float pair: real fp32 and fake bf16, (b, 3, H, W) of one shape, values in [0, 1]."""
    if real01.dtype != torch.float32 or fake01.dtype != torch.bfloat16:
        raise TypeError(f"{what}: official inputs are real fp32 and fake bf16, got {real01.dtype} and {fake01.dtype}")
    if real01.shape != fake01.shape or real01.ndim != 4 or real01.shape[1] != 3:
        raise ValueError(f"{what}: shapes {tuple(real01.shape)} and {tuple(fake01.shape)}; expected (b, 3, H, W)")


# ---------------------------------------------------------------------------------------------------------------
# PSNR


def official_squared_error_sums(real01: torch.Tensor, fake01: torch.Tensor) -> torch.Tensor:
    """Per-image Σ(fake − real)² (b,) in float64: the bf16 fake and fp32 real values differ exactly in float64."""
    check_official_pair(real01, fake01, "PSNR")
    diff = fake01.to(torch.float64) - real01.to(torch.float64)
    return (diff * diff).sum(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------
# SSIM


def official_ssim_window(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 11×11 fp32 window torchmetrics builds for bf16 inputs under CUDA fp32 autocast.

    The offsets −5…5 are bf16 (exact) and i/σ is rounded to bf16; the square, exp, sum and normalisation run in
    fp32 (autocast's fp32 ops), and the 2-D window is the fp32 outer product of the 1-D taps.
    """
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float32, device=device)  # exact in bf16
    # i/σ is not autocast: a bf16 result; CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
    scaled = (offsets * (1.0 / SSIM_SIGMA)).to(torch.bfloat16).float()
    gauss = torch.exp(-scaled.pow(2) / 2)
    taps = gauss / gauss.sum()
    return taps[:, None] * taps[None, :]


def official_ssim_per_image(real01: torch.Tensor, fake01: torch.Tensor, border: OfficialBorder = "valid",
                            window: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM (b,) float64 of the official float pair, with the official dtypes (module docstring).

    `border` picks the torchmetrics averaging: `valid` (≤ 1.4.1) or `reflect-full` (≥ 1.4.2). `window` replaces
    the official 11×11 window (a sensitivity study only).
    """
    if border not in BORDER_REFERENCE:
        raise ValueError(f"ssim_border: {border!r}; expected one of {', '.join(BORDER_REFERENCE)}")
    check_official_pair(real01, fake01, "SSIM")
    preds, target = fake01, real01.to(torch.bfloat16)  # torchmetrics: target.to(preds.dtype)
    channels, r = preds.shape[1], SSIM_RADIUS
    preds = F.pad(preds, (r, r, r, r), mode="reflect")
    target = F.pad(target, (r, r, r, r), mode="reflect")
    kernel = official_ssim_window(preds.device) if window is None else window.to(preds.device, torch.float32)
    kernel = kernel.expand(channels, 1, *kernel.shape[-2:])
    stacked = torch.cat((preds, target, preds * preds, target * target, preds * target))  # products in bf16
    moments = F.conv2d(stacked.float(), kernel, groups=channels)  # autocast: fp32 conv of the bf16 values
    mu_p, mu_t, e_pp, e_tt, e_pt = moments.split(preds.shape[0])
    mu_pp, mu_tt, mu_pt = mu_p.pow(2), mu_t.pow(2), mu_p * mu_t
    var_p = torch.clamp(e_pp - mu_pp, min=0.0)
    var_t = torch.clamp(e_tt - mu_tt, min=0.0)
    cov = e_pt - mu_pt
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data_range 1.0
    # torchmetrics: `2 * cov.to(dtype) + c2` and `(var_p + var_t).to(dtype) + c2`, bf16 results. On CUDA a Python
    # scalar enters a bf16 op at fp32 (opmath); a CPU op would round C2 to bf16 first. Written out in fp32 so the
    # CUDA values come out on any device.
    upper = (cov.to(torch.bfloat16).float() * 2 + c2).to(torch.bfloat16)
    lower = ((var_p + var_t).to(torch.bfloat16).float() + c2).to(torch.bfloat16)
    ssim_map = ((2 * mu_pt + c1) * upper) / ((mu_pp + mu_tt + c1) * lower)  # fp32 (bf16 promoted)
    if border == "valid":
        ssim_map = ssim_map[..., r:-r, r:-r]
    return ssim_map.reshape(ssim_map.shape[0], -1).to(torch.float64).mean(dim=-1)
