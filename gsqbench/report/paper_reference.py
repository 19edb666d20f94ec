"""Published GSQ numbers as data (gsq-reference.md §7.7, §7.8, §7.9), for the reports' reference tables.

These are ImageNet 256² results under the paper's own protocol: context only. Reports show them in separate
tables labelled "paper, ImageNet 256²" and never rank them against measured rows. Usage is a fraction in [0, 1]
(reports render percent); None means the paper gives no number.
"""
from __future__ import annotations

from typing import Optional

LABEL = "paper, ImageNet 256²"
SOURCE = "Wang et al. 2024, Scaling Image Tokenizers with Grouped Spherical Quantization"

#: §7.7 group decomposition (GSQ-GAN, 50k steps): (model, G×d, rFID, IS, LPIPS, PSNR, SSIM, usage, PPL, note)
GroupRow = tuple[str, str, Optional[float], Optional[float], Optional[float], Optional[float], Optional[float],
                 Optional[float], Optional[float], str]
GROUP_DECOMPOSITION: tuple[GroupRow, ...] = (
    ("Open-MAGVIT2 LFQ F16-D18, V=256k (ref)", "18×1", 1.17, None, None, None, None, None, None, ""),
    ("GSQ F8-D64, V=8k", "1×64", 0.63, 205, 0.08, 22.95, 0.67, 0.9987, 8055, ""),
    ("GSQ F8-D64, V=8k", "2×32", 0.32, 220, 0.05, 25.42, 0.76, 1.0, 8157, ""),
    ("GSQ F8-D64, V=8k", "4×16", 0.18, 226, 0.03, 28.02, 0.83, 1.0, 8143, "SSIM: paper typo 0.08"),
    ("GSQ F8-D64, V=8k", "16×4", 0.03, 233, 0.004, 34.61, 0.91, 0.9998, 6775, ""),
    ("GSQ F16-D16, V=256k", "1×16", 1.63, 179, 0.13, 20.70, 0.56, 1.0, 254044, "rFID README/HF; paper v1 1.42"),
    ("GSQ F16-D16, V=256k", "2×8", 0.82, 199, 0.09, 22.20, 0.63, 1.0, 257273, ""),
    ("GSQ F16-D16, V=256k", "4×4", 0.74, 202, 0.08, 22.75, 0.63, 0.6246, 43767, ""),
    ("GSQ F16-D16, V=256k", "8×2", 0.50, 211, 0.06, 23.62, 0.66, 0.4683, 22181, ""),
    ("GSQ F16-D16, V=256k", "16×1", 0.52, 210, 0.06, 23.54, 0.66, 0.5081, 181, ""),
    ("GSQ F16-D16, V=256k", "16×1 (clip)", 0.51, 210, 0.06, 23.52, 0.66, 0.5264, 748, ""),
    ("GSQ F32-D32, V=256k", "1×32", 6.84, 95, 0.24, 17.83, 0.40, 1.0, 245715, ""),
    ("GSQ F32-D32, V=256k", "2×16", 3.31, 139, 0.18, 19.01, 0.47, 1.0, 253369, ""),
    ("GSQ F32-D32, V=256k", "4×8", 1.77, 173, 0.13, 20.60, 0.53, 1.0, 253199, ""),
    ("GSQ F32-D32, V=256k", "8×4", 1.67, 176, 0.12, 20.88, 0.54, 0.59, 40307, ""),
    ("GSQ F32-D32, V=256k", "16×2", 1.13, 190, 0.10, 21.73, 0.57, 0.46, 30302, ""),
    ("GSQ F32-D32, V=256k", "32×1", 1.21, 187, 0.10, 21.64, 0.57, 0.54, 247, ""),
)
GROUP_COLUMNS = ("model", "G×d", "rFID", "IS", "LPIPS", "PSNR", "SSIM", "usage", "PPL", "note")

#: §7.8 state of the art, rFID: (method, f, tokens, D, V, rFID, note)
SOTA: tuple[tuple[str, int, str, str, str, float, str], ...] = (
    ("GSQ", 8, "32×32", "8 (d8, G1)", "8k", 0.48, ""),
    ("GSQ", 8, "32×32", "8 (d8, G1)", "256k", 0.36, ""),
    ("GSQ", 8, "32×32", "16 (d16, G1)", "256k", 0.51, "figure: 0.389; 0.519 is V16k"),
    ("GSQ", 8, "32×32", "64 (d4, G16)", "8k", 0.03, ""),
    ("VQGAN", 8, "32×32", "–", "8k", 1.49, ""),
    ("VQGAN-LC", 8, "1024", "8", "100k", 1.29, ""),
    ("ViT-VQGAN-SL", 8, "32×32", "32", "8k", 1.28, ""),
    ("OmniTokenizer", 8, "32×32", "8", "8k", 1.11, ""),
    ("OmniTokenizer (KL)", 8, "32×32", "8", "∞", 0.69, ""),
    ("LlamaGen", 8, "32×32", "8", "16k", 0.59, ""),
    ("BSQ", 8, "32×32", "36", "2^36", 0.41, ""),
    ("Open-MAGVIT2", 8, "32×32", "18", "256k", 0.34, ""),
    ("GSQ w/ attention", 16, "16×16", "8 (d1, G8)", "512k", 0.95, ""),
    ("GSQ", 16, "16×16", "16 (d16, G1)", "256k", 1.42, ""),
    ("GSQ", 16, "16×16", "16 (d1, G16)", "256k", 0.52, ""),
    ("VQGAN-LC", 16, "256", "8", "100k", 2.62, ""),
    ("MaskGIT", 16, "16×16", "256", "1k", 2.28, ""),
    ("LlamaGen", 16, "16×16", "8", "16k", 2.19, ""),
    ("TiTok-B", 16, "128", "–", "4k", 1.70, ""),
    ("MaskBit", 16, "16×16", "256", "1024", 1.66, ""),
    ("ImageFolder", 16, "265", "–", "4k", 1.57, ""),
    ("MAGVIT2", 16, "16×16", "18", "256k", 1.15, ""),
    ("Open-MAGVIT2", 16, "16×16", "18", "256k", 1.17, ""),
)
SOTA_COLUMNS = ("method", "f", "tokens", "D", "V", "rFID", "note")
SOTA_NOTE = "Peer numbers use their own protocols; they are context, not comparable rows."

#: §7.9 latent dim × vocabulary (F8, G=1): rFID[V][D]
DIM_VOCAB_D = (8, 16, 32, 64)
DIM_VOCAB_RFID: dict[int, tuple[float, ...]] = {
    8192: (0.488, 0.586, 0.621, 0.637),
    16384: (0.443, 0.519, 0.555, 0.586),
    65536: (0.389, 0.449, 0.486, 0.512),
    262144: (0.365, 0.389, 0.426, 0.475),
    524288: (0.355, 0.357, 0.397, 0.453),
}
#: §7.9 spatial compression × latent capacity (d=16, G=D/16, V=256k inferred): rFID[f][D]
SPATIAL_D = (16, 32, 64, 128)
SPATIAL_RFID: dict[int, tuple[float, ...]] = {
    8: (0.39, 0.23, 0.14, 0.09),
    16: (1.63, 0.82, 0.45, 0.27),
    32: (7.09, 3.31, 1.63, 0.83),
}
