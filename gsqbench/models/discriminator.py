"""GAN discriminators for tokenizer training: PatchGAN (NLD) and the official frozen-DINOv2 projected discriminator.

Both take images in [0, 1] (the official trainer feeds x01 = 0.5·x + 0.5 to every discriminator; spec §5.1)
and return logits (b, ...) for the losses in `gsqbench.losses`.

- `PatchGANDiscriminator`: taming-transformers' NLayerDiscriminator (pix2pix PatchGAN): 64 filters, 3 layers,
  kernel 4, BatchNorm2d, LeakyReLU 0.2; DCGAN init N(0, 0.02) and, as in the official `taming_discriminator`,
  the last conv's weight scaled by 0.1 (gsq-reference.md §5.3, "NLD").
- `DinoDiscriminator`: the official DD (`flex_gen/discriminators/dino_Discriminator.py`,
  `flex_gen/layers/projected_gan_t/discriminator.py`, after StyleGAN-T's projected discriminator;
  gsq-reference.md §5.3). A frozen DINOv2 ViT-S/14 with 4 registers, built with timm
  (`vit_small_patch14_reg4_dinov2`, pretrained=False) and filled from a LOCAL file (weight manager name
  `dinov2-vits14-reg`, the FB `dinov2_vits14_reg4_pretrain.pth`; the facebookresearch key layout is mapped to
  timm's here, timm-layout files are accepted too). Per call: DiffAugment (independent draws), a random crop to
  `img_size` only when the input is wider (p_crop), area resize to `img_size` (518 = the hub default the
  official code runs at; 224 is the StyleGAN-T reading, spec §9 item 7), ImageNet mean/std. Features: all
  tokens (cls + 4 registers + patches) after the patch/position embedding and after blocks 2, 5, 8, 11 (no
  final norm), (b, 384, T) each; one trainable head per feature map; logits concatenated to (b, 5·T).
  The backbone is always in eval mode with requires_grad False; gradients still flow through it to the input.
  Its tensors are left out of `state_dict()` (the heads and their BatchNorm statistics are what trains).
  DiffAugment runs inside (`diffaug=True`, as the official code); a trainer must not augment again outside.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.augment import DEFAULT_POLICY, diff_augment, parse_policy
from gsqbench.errors import UserError
from gsqbench.registry import register_discriminator

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_TIMM_NAME = "vit_small_patch14_reg4_dinov2"
DINO_WEIGHT_NAME = "dinov2-vits14-reg"
DINO_HOOKS = (2, 5, 8, 11)
DINO_EMBED_DIM = 384
DINO_PATCH = 14

# ---------------------------------------------------------------------------------------------------------------
# PatchGAN / NLD
# ---------------------------------------------------------------------------------------------------------------


@register_discriminator("patchgan")
class PatchGANDiscriminator(nn.Module):
    """PatchGAN (NLD, taming-transformers): strided 4×4 convs with BatchNorm and LeakyReLU, per-patch logits."""

    input_range = "[0,1]"
    augments_inside = False  # the trainer applies DiffAugment before calling it

    @classmethod
    def example_config(cls) -> dict:
        return {"num_filters": 8, "num_layers": 2}

    def __init__(self, in_channels: int = 3, num_filters: int = 64, num_layers: int = 3, last_layer_scale: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, num_filters, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(num_filters * prev, num_filters * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(num_filters * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(num_filters * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self._init_weights(last_layer_scale)

    def _init_weights(self, last_layer_scale: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.main[-1].weight.mul_(last_layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (b, 1, h', w') patch logits


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 weights: facebookresearch layout → timm layout
# ---------------------------------------------------------------------------------------------------------------


def _unchunk_block_key(key: str) -> str:
    """FB training checkpoints may store blocks in chunks, 'blocks.<chunk>.<i>.…'; hub files use 'blocks.<i>.…'."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
        return ".".join([parts[0]] + parts[2:])
    return key


def dinov2_fb_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a facebookresearch/dinov2 ViT state dict (with registers) to timm's no_embed_class layout.

    FB adds pos_embed[:, 0] to the class token and keeps registers outside the position embedding; timm stores
    the class token with its position already added and pos_embed over patches only. `mask_token` is training-
    only. Files already in timm layout (no `register_tokens`) pass through unchanged.
    """
    if "register_tokens" not in state:
        return dict(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in ("mask_token", "register_tokens", "cls_token", "pos_embed"):
            continue
        out[_unchunk_block_key(key)] = value
    pos = state["pos_embed"]  # (1, 1 + N, C)
    out["cls_token"] = state["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    out["reg_token"] = state["register_tokens"]
    return out


def _fit_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample a (1, N, C) patch position table to the model's grid (bicubic, antialiased, as DINOv2-reg does)."""
    from timm.layers import resample_abs_pos_embed

    side = int(round(math.sqrt(pos.shape[1])))
    if (side, side) == tuple(grid):
        return pos
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side], num_prefix_tokens=0,
                                  interpolation="bicubic", antialias=True)


def load_dinov2_backbone(model: nn.Module, path: str | Path) -> None:
    """Fill a timm DINOv2 ViT from a local file (FB or timm layout); UserError naming the file if it doesn't fit."""
    from gsqbench.tensorfile import load_state_file

    state = load_state_file(path, "DINOv2 weight file", unwrap="model")
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise UserError(f"DINOv2 weight file {path}: not a DINOv2 ViT state dict (no 'pos_embed'); expected "
                        "dinov2_vits14_reg4_pretrain.pth (FB layout) or a timm state dict")
    state = dinov2_fb_to_timm(state)
    state["pos_embed"] = _fit_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    state = {k: v.float() for k, v in state.items() if not k.startswith("head.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).replace("\n", " ")[:300]
        raise UserError(f"DINOv2 weight file {path}: does not match ViT-S/14-reg4 ({first})") from None


def build_dinov2_backbone(img_size: int, weights: str | Path | None, allow_random: bool = False) -> tuple[nn.Module, str]:
    """timm ViT-S/14-reg4 at `img_size`, frozen; returns (model, source) where source is the file or 'random'."""
    import timm

    path = Path(weights) if weights is not None else _dino_weight_path(allow_random)
    if path is None:
        model = timm.create_model(DINO_TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    else:
        if not path.is_file():
            raise UserError(f"discriminator.weights: DINOv2 file '{path}' does not exist")
        # Skip the random init the file overwrites anyway; the strict load then fills every tensor
        # (this ViT has no non-persistent buffers that to_empty would leave uninitialised).
        with torch.device("meta"):
            model = timm.create_model(DINO_TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
        model = model.to_empty(device="cpu")
        load_dinov2_backbone(model, path)
    source = str(path) if path is not None else "random"
    return model.eval().requires_grad_(False), source


def _dino_weight_path(allow_random: bool) -> Optional[Path]:
    from gsqbench.weights import WeightsUnavailable, weight_path

    try:
        return weight_path(DINO_WEIGHT_NAME)
    except WeightsUnavailable as exc:
        if not allow_random:
            raise UserError(f"DINO discriminator needs the DINOv2 weights: {exc}; or use discriminator "
                            "'patchgan' for offline smoke runs") from None
        log.warning("DINO discriminator backbone is RANDOM (non-conformant): %s", exc)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Projected discriminator heads
# ---------------------------------------------------------------------------------------------------------------


def _conv_bn_lrelu(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        nn.BatchNorm1d(channels), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2.0)  # keeps the variance of the sum at that of one branch


class DiscHead(nn.Module):
    """One head on a (b, C, T) token map: k1 block → residual k9 circular block → Conv1d(C, 1) → (b, T)."""

    def __init__(self, channels: int = DINO_EMBED_DIM):
        super().__init__()
        self.main = nn.Sequential(_conv_bn_lrelu(channels, 1), _Residual(_conv_bn_lrelu(channels, 9)))
        self.cls = nn.Conv1d(channels, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.main(x)).flatten(1)


def _drop_backbone_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[key]


def _keep_backbone_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loading a heads-only state dict keeps the current backbone (a file with backbone keys still loads them)."""
    for key, value in module.backbone.state_dict().items():
        state_dict.setdefault(f"{prefix}backbone.{key}", value)


@register_discriminator("dino")
class DinoDiscriminator(nn.Module):
    """Frozen DINOv2-ViT-S/14-reg backbone + 5 trainable heads (the paper's DD); logits (b, 5·T)."""

    input_range = "[0,1]"
    augments_inside = True  # DiffAugment inside, per call (official layout); takes `diffaug` and `aug_policy`

    @classmethod
    def example_config(cls) -> dict:
        return {"img_size": 28, "allow_random_backbone": True}

    @classmethod
    def backbone_choice(cls, options: dict) -> dict:
        """Which DINOv2 weights a run with these options will load, decided before training (gsqbench.effective):
        {"source": "file" | "weights:<name>" | "random", "path", "sha256", "fallback": note or None}. Building the
        discriminator with `weights=path` (or `allow_random_backbone` and no path, for 'random') loads exactly this.
        """
        from gsqbench.io import sha256_file
        from gsqbench.weights import WeightsUnavailable, verified_file

        if options.get("weights") is not None:
            path = Path(options["weights"]).expanduser()
            if not path.is_file():
                raise UserError(f"config key 'shared.gan.options.weights': DINOv2 file '{path}' does not exist")
            return {"source": "file", "path": str(path), "sha256": sha256_file(path), "fallback": None}
        try:
            path, sha = verified_file(DINO_WEIGHT_NAME)
        except WeightsUnavailable as exc:
            if not options.get("allow_random_backbone"):
                raise UserError(f"DINO discriminator needs the DINOv2 weights: {exc}; or use discriminator "
                                "'patchgan' for offline smoke runs") from None
            return {"source": "random", "path": None, "sha256": None,
                    "fallback": f"discriminator backbone → random (non-conformant): {exc.reason}"}
        return {"source": f"weights:{DINO_WEIGHT_NAME}", "path": str(path), "sha256": sha, "fallback": None}

    def __init__(self, *, img_size: int = 518, weights: str | Path | None = None, diffaug: bool = True,
                 aug_policy: str = DEFAULT_POLICY, p_crop: float = 1.0, hooks: Sequence[int] = DINO_HOOKS,
                 allow_random_backbone: bool = False, generator: Optional[torch.Generator] = None):
        super().__init__()
        if img_size < DINO_PATCH or img_size % DINO_PATCH:
            raise UserError(f"discriminator.img_size: {img_size} is not valid; expected a multiple of 14 (518, 224)")
        self.img_size, self.diffaug, self.p_crop = img_size, diffaug, p_crop
        self.aug_policy = ",".join(parse_policy(aug_policy))
        self.hooks = tuple(int(h) for h in hooks)
        self.generator = generator
        self.backbone, self.backbone_source = build_dinov2_backbone(img_size, weights, allow_random_backbone)
        if max(self.hooks) >= len(self.backbone.blocks):
            raise UserError(f"discriminator.hooks: {self.hooks} exceed the {len(self.backbone.blocks)} blocks")
        self.heads = nn.ModuleList(DiscHead(DINO_EMBED_DIM) for _ in range(len(self.hooks) + 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # The frozen backbone comes from its weight file at construction; checkpoints carry only the heads
        # (88 MB less per save, and DINOv2 weights never get copied into training states).
        self.register_state_dict_post_hook(_drop_backbone_keys)
        self.register_load_state_dict_pre_hook(_keep_backbone_keys)

    @property
    def num_tokens(self) -> int:
        """T per feature map: patches + class token + registers (1374 at 518, 261 at 224)."""
        return self.backbone.patch_embed.num_patches + self.backbone.num_prefix_tokens

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen: its norms/dropouts never switch to training behaviour
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "DinoDiscriminator":
        """Toggle the heads only: the backbone stays frozen even when a trainer toggles the whole D for a G step."""
        self.heads.requires_grad_(requires_grad)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def _randint(self, high: int) -> int:
        """Uniform integer in [0, high) from the module's generator (CPU or CUDA) or the global RNG."""
        g = self.generator
        return int(torch.randint(0, high, (1,), generator=g, device=g.device if g is not None else "cpu"))

    def _random_crop(self, x: Tensor) -> Tensor:
        """One random img_size crop for the whole batch (as torchvision RandomCrop on a batch tensor)."""
        s, (h, w) = self.img_size, x.shape[-2:]
        top = self._randint(h - s + 1) if h > s else 0
        left = self._randint(w - s + 1)
        return x[..., top:top + s, left:left + s]

    def _preprocess(self, x: Tensor) -> Tensor:
        if self.diffaug:
            x = diff_augment(x, self.aug_policy, self.generator)
        # Official: crop only when wider than the backbone input, with probability p_crop (1.0 by default).
        if x.shape[-1] > self.img_size and self._randint(1 << 24) < self.p_crop * (1 << 24):
            x = self._random_crop(x)
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="area")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: Tensor) -> list[Tensor]:
        """Token maps (b, C, T): after patch + position embedding, then after each hooked block (no final norm)."""
        vit = self.backbone
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # (b, T, C) = cls, registers, patches
        feats = [tokens]
        for i, block in enumerate(vit.blocks[: max(self.hooks) + 1]):
            tokens = block(tokens)
            if i in self.hooks:
                feats.append(tokens)
        return [f.transpose(1, 2) for f in feats]

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(self._preprocess(x))
        return torch.cat([head(f) for head, f in zip(self.heads, feats)], dim=1)  # (b, 5·T)
