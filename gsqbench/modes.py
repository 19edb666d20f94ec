"""Evaluation modes: the pinned `gsqbench` protocol and the compatibility modes, one table entry each.

A mode names every setting in which an evaluation departs from the pinned protocol (metrics-protocol.md): how the
model input is made from the uint8 images, how each side becomes uint8 for the metrics, what the Inception reads for
rFID, the crop protocol, the model precision, the nearest-code lookup, TF32 and the weights. `gsq-compat` reproduces
the official GSQ evaluation (metrics-protocol.md §14); the others reproduce the published protocol of one imported
tokenizer (docs/tokenizers/), from the upstream files named in `reproduces`. Each entry lists, in `differences`,
exactly what differs from the pinned protocol (the protocol card's `compat` group carries it, so it is part of the
card hash), and in `not_reproduced` what of the upstream protocol gsqbench does not reproduce and why.

This module is data only (no torch): `gsqbench.config` validates `eval.mode` against it, `gsqbench.card` describes the
conversion from it, `gsqbench.compat` implements the named conversion rules and `gsqbench.evaluate` applies them.
A new mode is one `EvalMode` in `MODES` (with new conversion rules, one function each in gsqbench/compat.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gsqbench.errors import UserError, did_you_mean

PINNED = "gsqbench"


@dataclass(frozen=True)
class EvalMode:
    """One evaluation protocol (module docstring). Rule names are those of gsqbench/compat.py."""

    name: str
    reproduces: str  # whose protocol, with the upstream files it follows
    tokenizer: Optional[str] = None  # release kind (gsqbench import --kind) the mode is for; None = any subject
    model_input: str = "u8/127.5-1"  # rule: uint8 → model input in [-1, 1]
    real_uint8: str = "as-read"  # rule: the real side the metrics see
    fake_uint8: str = "round-half-even"  # rule: the reconstruction the metrics see
    fid_input: str = "uint8"  # "uint8": the TF-FID Inception reads the uint8 pair; "float01": pytorch-fid on floats
    crop: Optional[str] = None  # the eval crop protocol the mode prescribes; None = the data's own (default gsq)
    precision: str = "fp32"  # model precision when eval.precision is not given
    lookup: str = "exact"  # nearest-code lookup when eval.lookup is not given
    tf32: bool = False  # TF32 matmul/cuDNN while the model runs (CUDA only; metrics always run without it)
    weights: Optional[str] = None  # the weights the mode requires ("ema"); None = what the checkpoint holds
    card_uint8_rule: str = ""  # the card's conversion.uint8_rule / model_input / metric_inputs texts
    card_model_input: str = ""
    card_metric_inputs: str = "uint8"
    differences: tuple[str, ...] = ()
    not_reproduced: tuple[str, ...] = ()

    @property
    def is_compat(self) -> bool:
        return self.name != PINNED

    def compat_card(self) -> dict:
        """The card's `compat` group: what this mode reproduces and every way it differs from the pinned protocol."""
        return {"reproduces": self.reproduces, "tokenizer": self.tokenizer, "differences": list(self.differences),
                "not_reproduced": list(self.not_reproduced)}


MODES: dict[str, EvalMode] = {m.name: m for m in (
    EvalMode(
        name=PINNED, reproduces="the pinned gsqbench protocol (docs/metrics-protocol.md)",
        card_uint8_rule="round-half-even", card_model_input="u8/127.5-1 fp32"),
    EvalMode(
        name="gsq-compat", reproduces="official GSQ evaluation (HelmholtzAI-FZJ/flex_gen; gsq-reference.md §6)",
        model_input="normalize", real_uint8="trunc", fake_uint8="trunc-bf16", precision="bf16",
        lookup="bf16", card_uint8_rule="trunc-compat", card_model_input="ToTensor+Normalize(0.5,0.5) fp32",
        card_metric_inputs="PSNR/SSIM/LPIPS: official float [0,1] (real fp32, fake bf16); others: uint8 (trunc-compat)",
        differences=(
            "model input: ToTensor + Normalize(0.5, 0.5) in fp32 instead of u8/127.5 - 1",
            "real side: the Normalize output truncated back to uint8 (loses one level at values 1-63)",
            "reconstruction: bf16, truncated to uint8 instead of round-half-even",
            "model and nearest-code lookup under bf16 autocast instead of fp32 / exact",
            "PSNR/SSIM/LPIPS: the official float [0, 1] pair (real fp32, fake bf16), never rounded, instead of uint8",
        ),
        not_reproduced=()),
    EvalMode(
        name="llamagen-compat", tokenizer="llamagen",
        reproduces="LlamaGen tokenizer/tokenizer_image/reconstruction_vq_ddp.py + evaluations/c2i (ADM evaluator)",
        model_input="normalize", fake_uint8="round-half-up", crop="adm", lookup="fp32-expanded", tf32=True,
        card_uint8_rule="real: as read; fake: clamp(127.5x+128, 0, 255) truncated (round-half-up)",
        card_model_input="ToTensor+Normalize(0.5,0.5) fp32",
        differences=(
            "crop: ADM center_crop_arr (crop protocol adm) instead of gsq",
            "model input: ToTensor + Normalize(0.5, 0.5) in fp32 instead of u8/127.5 - 1",
            "reconstruction: clamp(127.5x + 128, 0, 255) cast to uint8, i.e. round-half-up instead of round-half-even",
            "nearest-code lookup: LlamaGen's expanded fp32 distance (fp32-expanded) instead of the exact nearest code",
            "TF32 allowed for matmul and cuDNN while the model runs (LlamaGen sets allow_tf32 = True); off otherwise",
            "rFID reference: statistics of the evaluated (ADM-cropped) val images themselves, as the published 2.19 "
            "(the ADM training reference batch gives 4.28, LlamaGen issue #34)",
        ),
        not_reproduced=(
            "FID extractor: torch-fidelity's port of the TF Inception graph instead of the ADM TensorFlow evaluator",
            "PSNR/SSIM: LlamaGen keeps the ground truth float ((x+1)/2) and uses skimage SSIM with data_range 2.0; "
            "gsqbench's PSNR/SSIM read the uint8 pair",
        )),
    EvalMode(
        name="magvit2-compat", tokenizer="open-magvit2",
        reproduces="Open-MAGVIT2 (TencentARC/SEED-Voken) evaluation_image.py + metrics/inception.py (pytorch-fid)",
        real_uint8="trunc", fake_uint8="trunc", fid_input="float01", crop="torchvision", weights="ema",
        card_uint8_rule="real and fake: (255*(x+1)/2) truncated in fp32 (x the model input / clamped output)",
        card_model_input="u8/127.5-1 fp32",
        card_metric_inputs="rFID/IS: float [0,1] (never rounded); other metrics: uint8 (truncated)",
        differences=(
            "crop: torchvision Resize(S) bilinear + CenterCrop(S) (crop protocol torchvision) instead of gsq",
            "rFID/IS: float images (x+1)/2 in [0, 1], never rounded to uint8, through pytorch-fid's front end "
            "(F.interpolate bilinear to 299, align_corners False, then 2x-1) into the FID Inception",
            "rFID reference: statistics of the evaluated val images from the same pass (no reference file or cache)",
            "other metrics: both sides (255*(x+1)/2) truncated to uint8, as its PSNR/SSIM, instead of round-half-even",
            "weights: EMA required (the authors evaluate inside ema_scope)",
        ),
        not_reproduced=(
            "FID trunk: torch-fidelity's inception-v3-compat layers (same 2015-12-05 FID weights as pytorch-fid's "
            "FIDInceptionA/C/E); only the front end is pytorch-fid's",
            "SSIM: skimage's default 7x7 uniform window on float u8/255; gsqbench's SSIM on the uint8 pair",
            "LPIPS: upstream feeds float [-1, 1] images; gsqbench's LPIPS reads the uint8 pair",
        )),
    EvalMode(
        name="taming-compat", tokenizer="taming",
        reproduces="taming-transformers README (torch-fidelity against ImageNet val) + taming/data/base.py, main.py",
        fake_uint8="trunc", crop="albumentations", lookup="fp32-expanded",
        card_uint8_rule="real: as read; fake: (255*(clamp(x)+1)/2) truncated in fp32 (taming's ImageLogger)",
        card_model_input="u8/127.5-1 fp32",
        differences=(
            "crop: albumentations SmallestMaxSize(S) (bilinear, no antialiasing) + CenterCrop(S) (crop protocol "
            "albumentations) instead of gsq",
            "reconstruction: (255*(x+1)/2) truncated to uint8 (taming's ImageLogger conversion; the repository has "
            "no evaluation script) instead of round-half-even",
            "nearest-code lookup: taming's expanded fp32 distance (fp32-expanded) instead of the exact nearest code",
            "rFID reference: the evaluated val images (the published 4.98 column; 7.41 is against train)",
        ),
        not_reproduced=(
            "resize: cv2 INTER_LINEAR's fixed-point arithmetic is restated in float (may differ by one level)",
            "the image count and conversion of the published 4.98 are not recorded upstream; gsqbench assumes these",
        )),
    EvalMode(
        name="maskgit-compat", tokenizer="maskgit",
        reproduces="bytedance/1d-tokenizer (its MaskGIT-VQGAN port): data/webdataset_reader.py, utils/train_utils.py,"
                   " evaluator/evaluator.py",
        real_uint8="trunc-u8-over-255", fake_uint8="round-then-trunc", crop="torchvision-bicubic",
        lookup="fp32-expanded",
        card_uint8_rule="real: (255*(u8/255)) truncated; fake: (255*(round(255*y)/255)) truncated, y = clamp((x+1)/2)",
        card_model_input="u8/127.5-1 fp32 (the wrapper feeds the upstream (x+1)/2 in [0, 1])",
        differences=(
            "crop: torchvision Resize(S, bicubic, antialias) + CenterCrop(S) (crop protocol torchvision-bicubic) "
            "instead of gsq",
            "real side: (255 * (u8/255)) in fp32 cast to uint8 (the evaluator's (x*255).to(uint8); a value can drop "
            "one level)",
            "reconstruction: y = clamp((x+1)/2, 0, 1), round(255*y)/255, then (255*.) cast to uint8 "
            "(train_utils + evaluator) instead of round-half-even",
            "nearest-code lookup: the port's expanded fp32 distance (addmm; fp32-expanded) instead of the exact "
            "nearest code",
        ),
        not_reproduced=(
            "the published MaskGIT-VQGAN rFID (2.28) comes from the original Jax MaskGIT pipeline, whose protocol is "
            "not in public code; this mode reproduces 1d-tokenizer's evaluation of the PyTorch port instead",
            "IS: 1d-tokenizer sums probabilities over the whole set (no splits); gsqbench's IS uses 10 splits",
            "input: the wrapper feeds the upstream (x+1)/2 of x = u8/127.5 - 1, which equals ToTensor's u8/255 to "
            "within one float32 ulp, not bit for bit",
        )),
)}


def check_mode(name: object, where: str) -> EvalMode:
    """The mode called `name`, or a one-line UserError naming `where`, the value and the valid modes."""
    if isinstance(name, str) and name in MODES:
        return MODES[name]
    hint = did_you_mean(str(name), MODES)
    valid = ", ".join(MODES)
    hint = f"; valid: {valid}" if hint.startswith("; valid:") else f"{hint} (valid: {valid})"
    raise UserError(f"{where}: {name!r} is not a valid mode{hint}")


def get_mode(name: str) -> EvalMode:
    """The mode called `name` (a name already validated); a programming error otherwise."""
    return MODES[name]
