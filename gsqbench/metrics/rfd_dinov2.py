"""`rfd@dinov2`: the Fréchet distance of reconstructions vs originals in DINOv2 ViT-L/14 feature space.

Follows Stein et al., NeurIPS 2023 ("Exposing flaws of generative model evaluation metrics"), whose reference code
(layer6ai-labs/dgm-eval, `dgm_eval/models/dinov2.py`, default `clean_resize=False`) computes FD_DINOv2 as:
- encoder `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`: ViT-L/14 (1024-d, 24 blocks, 16 heads,
  LayerScale, no registers), weights `dinov2_vitl14_pretrain.pth`, its position table made for 518² (37×37 patches);
- per image: PIL `Resize((224, 224), BICUBIC)` (torchvision on a PIL image, i.e. PIL's antialiased bicubic with
  uint8 output), `ToTensor` (/255), `Normalize` with the ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225) in float32;
- feature: the model's output, `head(x_norm_clstoken)` with an identity head: the class token after the final
  LayerNorm, 1024-d;
- FD of the two feature sets (the same formula as FID).

gsqbench runs that network as a timm `VisionTransformer` (same module tree and key names as the FB file, which is
loaded with weights_only=True; `mask_token` is training-only and dropped). At 224² FB resamples the 37×37 position
table to 16×16 on every forward with `interpolate_pos_encoding` (bicubic, no antialias, scale factor
(16 + 0.1)/37 — the historical offset, which shifts the sampling grid compared with a plain 16/37 resize); the same
resampling is done once here at load time. The image resize runs on the CPU with PIL, as in dgm-eval; the network
in float32 with TF32 off; statistics, distance and the reference-statistics cache are the shared Fréchet code path
(gsqbench/metrics/frechet.py) used by rFID.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gsqbench.errors import UserError
from gsqbench.io import sha256_file
from gsqbench.metrics.base import Facts, Metric, MetricContext, MetricValue
from gsqbench.metrics.common import check_image_pair, exact_fp32, resolve_weights, shared_object
from gsqbench.metrics.frechet import FeatureStats, RealReference, frechet_value
from gsqbench.registry import register_metric

log = logging.getLogger(__name__)

KEY = "rfd@dinov2"
WEIGHT_NAME = "dinov2-vitl14"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_OFFSET = 0.1  # FB interpolate_offset
RESIZE_MODE = "PIL bicubic 224x224 (torchvision Resize on PIL, dgm-eval clean_resize=False), uint8"
NORMALIZE = "u8/255, ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225), float32"
FEATURE = "class token after the final LayerNorm (x_norm_clstoken)"
DTYPES = "extractor float32 (tf32 off); statistics float64"


@dataclass(frozen=True)
class DinoArch:
    """A DINOv2 ViT shape; the metric uses `VITL14` only (other shapes exist for tests of the same code path)."""

    name: str
    embed_dim: int
    depth: int
    heads: int
    patch: int = 14
    mlp_ratio: float = 4.0


VITL14 = DinoArch("vitl14", embed_dim=1024, depth=24, heads=16)  # FB dinov2/models/vision_transformer.py vit_large


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and network


def dgm_eval_preprocess(images_u8: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (b, 3, H, W) → float32 (b, 3, size, size): PIL bicubic resize, /255, ImageNet normalisation."""
    from PIL import Image

    arr = images_u8.detach().to("cpu").numpy()
    out = np.empty((arr.shape[0], size, size, 3), dtype=np.uint8)

    def resize(i: int) -> None:
        pil = Image.fromarray(np.ascontiguousarray(arr[i].transpose(1, 2, 0)))
        out[i] = np.asarray(pil.resize((size, size), Image.BICUBIC))

    if len(arr) >= 8:  # PIL releases the GIL while resizing: a few threads keep up with a GPU ViT-L
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(resize, range(len(arr))))
    else:
        for i in range(len(arr)):
            resize(i)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[None, :, None, None]
    return (x - mean) / std


def fb_resample_pos_embed(pos: torch.Tensor, grid: int, offset: float = POS_OFFSET) -> torch.Tensor:
    """(1, 1 + M², D) → (1, 1 + grid², D) as FB `interpolate_pos_encoding` does for a grid×grid patch input:
    bicubic, no antialias, scale factor (grid + offset)/M (not a plain size), class position kept."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise UserError(f"DINOv2 pos_embed: {n} patch positions is not a square grid")
    if m == grid:
        return pos.float()
    cls_pos, patches = pos[:, :1].float(), pos[:, 1:].float()
    scale = float(grid + offset) / m
    resized = F.interpolate(patches.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                            mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != (grid, grid):
        raise AssertionError(f"position table resampled to {tuple(resized.shape[-2:])}, expected {(grid, grid)}")
    return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def fb_to_timm(state: Mapping[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """FB dinov2 (no registers) state dict → timm VisionTransformer keys (identical names; chunked blocks
    'blocks.<chunk>.<i>.' unchunked, `mask_token` dropped, position table resampled to the input grid)."""
    if "register_tokens" in state:
        raise UserError("DINOv2 weights: this file has register tokens (a *_reg4 model); rfd@dinov2 uses "
                        "dinov2_vitl14_pretrain.pth without registers, as dgm-eval")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
            key = ".".join([parts[0], *parts[2:]])
        out[key] = value.float()
    if "pos_embed" not in out:
        raise UserError("DINOv2 weights: no 'pos_embed'; expected a facebookresearch/dinov2 ViT state dict")
    out["pos_embed"] = fb_resample_pos_embed(out["pos_embed"], grid)
    return out


def timm_vit(arch: DinoArch, img_size: int = INPUT_SIZE) -> nn.Module:
    """timm's VisionTransformer in the FB DINOv2 shape (class token, no registers, LayerScale, final norm, pooled
    output = class token), on the meta device: the weight file fills every tensor."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        return VisionTransformer(img_size=img_size, patch_size=arch.patch, embed_dim=arch.embed_dim,
                                 depth=arch.depth, num_heads=arch.heads, mlp_ratio=arch.mlp_ratio, init_values=1e-5,
                                 num_classes=0, global_pool="token")


class DinoV2Features(nn.Module):
    """uint8 images → (b, D) DINOv2 class-token features at dgm-eval's preprocessing (see the module docstring)."""

    def __init__(self, vit: nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.vit, self.device = vit, torch.device(device)

    @torch.no_grad()
    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = dgm_eval_preprocess(images_u8).to(self.device)
        with exact_fp32():
            return self.vit(x)


def build_dinov2(weights_path: str | Path, device: torch.device | str = "cpu",
                 arch: DinoArch = VITL14) -> DinoV2Features:
    """The feature extractor from a local FB-layout file (weights_only=True), strictly loaded, frozen, eval mode."""
    from gsqbench.tensorfile import load_state_file

    state = load_state_file(weights_path, "DINOv2 weights", unwrap="model")
    vit = timm_vit(arch)
    grid = INPUT_SIZE // arch.patch
    mapped = fb_to_timm(state, grid)
    vit = vit.to_empty(device="cpu")
    try:
        vit.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        first = str(exc).replace("\n", " ")[:300]
        raise UserError(f"DINOv2 weights {weights_path}: not a DINOv2 {arch.name} state dict ({first})") from None
    return DinoV2Features(vit.to(device).eval().requires_grad_(False), device)


# ---------------------------------------------------------------------------------------------------------------
# Metric


@register_metric(KEY)
class DinoFDMetric(Metric):
    """Fréchet distance of reconstructions vs originals on DINOv2 ViT-L/14 features, as dgm-eval (opt-in).

    Stein et al. 2023; see the module docstring for the preprocessing and the network."""

    family, card_group = "rfd", "rfd"
    outputs = {KEY: "lower"}
    weights = (WEIGHT_NAME,)
    reference_stats = True
    selected_by_default = False

    def __init__(self, device: torch.device | str = "cpu", *, weights_path: Optional[str | Path] = None,
                 required: bool = False, reference: Optional[Mapping[str, Any]] = None,
                 cache_dir: Optional[str | Path] = None, arch: DinoArch = VITL14,
                 extractor: Optional[Any] = None, shared: Optional[dict] = None) -> None:
        self.device, self.arch = torch.device(device), arch
        path, self._unavailable = resolve_weights(WEIGHT_NAME, weights_path, required)
        self.weights_path = path
        self.model = None
        self.reference: Optional[RealReference] = None
        if path is not None:
            self.model = extractor if extractor is not None else shared_object(
                shared, ("dinov2", str(path), str(self.device), arch), lambda: build_dinov2(path, self.device, arch))
            self.reference = RealReference(what="FD-DINOv2", prefix="fd-dinov2-ref", dim=arch.embed_dim,
                                           extractor_fields=self._extractor_fields(), reference=reference,
                                           cache_dir=cache_dir)
        self.real = FeatureStats(arch.embed_dim, self.device)
        self.fake = FeatureStats(arch.embed_dim, self.device)

    @classmethod
    def create(cls, ctx: MetricContext) -> "DinoFDMetric":
        return cls(ctx.device, required=ctx.requires_any(tuple(cls.outputs)), reference=ctx.fid_reference,
                   cache_dir=ctx.settings.fid_cache_dir, shared=ctx.shared)

    @classmethod
    def comparable(cls, key: str, facts: Facts) -> Optional[str]:
        dim = VITL14.embed_dim
        if facts.n_images < dim + 1:
            return (f"FD on {dim}-d DINOv2 features needs N >= {dim + 1} images per side for a full-rank "
                    f"covariance; N = {facts.n_images}, the value is dominated by its N-dependent bias")
        return None

    def _extractor_fields(self) -> dict:
        import timm

        return {"extractor": f"dinov2-{self.arch.name} (timm {timm.__version__} VisionTransformer)",
                "weights_sha256": sha256_file(self.weights_path), "feature": FEATURE, "resize": RESIZE_MODE,
                "normalize": NORMALIZE, "pos_embed": f"FB interpolate_pos_encoding, offset {POS_OFFSET}",
                "dtypes": DTYPES}

    @property
    def uses_cached_reference(self) -> bool:
        return self.reference is not None and self.reference.precomputed

    @torch.no_grad()
    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        if self.model is None:
            return
        check_image_pair(real_u8, fake_u8, what="FD-DINOv2")
        if not self.uses_cached_reference:
            self.real.update(self.model(real_u8))
        self.fake.update(self.model(fake_u8))

    def sync(self) -> None:
        if self.model is not None:
            self.real.sync()
            self.fake.sync()

    def state_dict(self) -> dict:
        """Streaming state for a resumed evaluation: each side's float64 (N, μ, M2) and rows not merged yet."""
        return {side: stats.state_dict() for side, stats in (("real", self.real), ("fake", self.fake))}

    def load_state_dict(self, state: dict) -> None:
        for side, stats in (("real", self.real), ("fake", self.fake)):
            stats.load_state_dict(state[side])

    def check_reference(self, fields: Mapping[str, Any]) -> bool:
        """After the pass: verify file/cache statistics against the complete key (frechet.RealReference.check)."""
        return self.reference.check(fields) if self.reference is not None else False

    @torch.no_grad()
    def update_real(self, real_u8, image_ids: Sequence[str]) -> None:
        """Real side only (the second read after a stale cache)."""
        if self.model is not None:
            self.real.update(self.model(real_u8))

    def compute(self) -> list[MetricValue]:
        if self.model is None:
            return [MetricValue.missing(KEY, self._unavailable, "lower")]
        return [frechet_value(KEY, self.real, self.fake, self.reference, "FD-DINOv2")]

    def card(self) -> dict:
        ref = self.reference
        fields = self._extractor_fields() if self.model is not None else {}
        return {"rfd_reference_code": "Stein et al. 2023, layer6ai-labs/dgm-eval (DINOv2Encoder, FD)",
                "rfd_extractor": f"DINOv2 {self.arch.name} ({self.arch.embed_dim}-d, {self.arch.depth} blocks)",
                "rfd_weights_sha256": fields.get("weights_sha256"), "rfd_feature": FEATURE,
                "rfd_resize": RESIZE_MODE, "rfd_normalize": NORMALIZE, "rfd_dtypes": DTYPES,
                "rfd_pos_embed": f"518^2 table resampled to {INPUT_SIZE // self.arch.patch}^2 as FB "
                                 f"interpolate_pos_encoding (bicubic, offset {POS_OFFSET}, no antialias)",
                "rfd_reference_key": ref.key_sha if ref is not None else None,
                "rfd_reference_source": ref.source if ref is not None else "computed",
                "rfd_n_real": ref.n if ref is not None and ref.precomputed else int(self.real.n),
                "rfd_n_fake": int(self.fake.n), "rfd_min_images": self.arch.embed_dim + 1}
