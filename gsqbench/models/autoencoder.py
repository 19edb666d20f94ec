"""The GSQ-GAN convolutional encoder/decoder, state-dict compatible with the official FlexTokenizer.

Follows gsq-reference.md §3 (HelmholtzAI-FZJ/flex_gen, `flex_gen/autoencoders/flexTokenizer/`): MAGVIT-style
ResBlocks, strided-conv downsampling, depth-to-space (DCR order) or nearest upsampling, adaptive GroupNorm
conditioned on the quantised latent, optional single-head attention. Module names, ModuleList order and
Sequential indices are kept exactly (including the upstream spelling `fianl_layers`) so that released
`checkpoint.pt` files load with `strict=True` and without a rename table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.errors import UserError, did_you_mean

GN_GROUPS = 32  # every GroupNorm in the official model uses 32 groups
RES_GN_EPS = 1e-5  # PyTorch default, used by ResBlocks and the final layers
ADAGN_EPS = 1e-6  # inner GroupNorm and variance epsilon of AdaptiveGroupNorm2D
ATTN_GN_EPS = 1e-6
SILU_GAIN = 1.6761  # official init: compensates the variance lost after a SiLU
RESIDUAL_SCALE = 0.70711  # official init: second conv of a ResBlock scaled by 1/sqrt(2)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Official FlexTokenizer constructor kwargs (spec §3.1); defaults are the upstream class defaults."""

    input_channels: int = 3
    hidden_channels: int = 128
    encoder_layer_configs: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_layer_configs: tuple[int, ...] = (3, 4, 3, 4, 4)
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    mid_block_attn: bool = False
    attention_resolutions: tuple[int, ...] = ()
    embedding_dim: int = 4
    use_adaptive_norm: bool = False
    use_learnable_up_down_sample: bool = False
    residual_conv_kernel_size: int = 3
    input_conv_kernel_size: int = 3
    output_conv_kernel_size: int = 3
    dropout_probability: float = 0.0
    quantizer_aux_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        # YAML/JSON give lists; keep the dataclass hashable and comparable by storing tuples.
        for name in ("encoder_layer_configs", "decoder_layer_configs", "channel_multipliers", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,)
            if value is None:
                value = ()
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise UserError(f"model.{name}: {value!r} is not a list of integers")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        self._validate()

    def _validate(self) -> None:
        for name in ("input_channels", "hidden_channels", "embedding_dim"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise UserError(f"model.{name}: {getattr(self, name)!r} must be a positive integer")
        for name in ("residual_conv_kernel_size", "input_conv_kernel_size", "output_conv_kernel_size"):
            k = getattr(self, name)
            if not _is_int(k) or k < 1 or k % 2 == 0:
                raise UserError(f"model.{name}: {k!r} must be a positive odd integer (same-size padding)")
        n = len(self.channel_multipliers)
        if n == 0 or any(m < 1 for m in self.channel_multipliers):
            raise UserError(f"model.channel_multipliers: {list(self.channel_multipliers)} must be positive integers")
        for name in ("encoder_layer_configs", "decoder_layer_configs"):
            layers = getattr(self, name)
            if len(layers) != n + 1 or any(v < 0 for v in layers):
                raise UserError(
                    f"model.{name}: {list(layers)} must have len(channel_multipliers)+1 = {n + 1} non-negative "
                    "entries (one per stage, the last is the number of middle blocks)"
                )
        for m in self.channel_multipliers:
            if (self.hidden_channels * m) % GN_GROUPS:
                raise UserError(
                    f"model.hidden_channels: {self.hidden_channels} x multiplier {m} = {self.hidden_channels * m} "
                    f"channels, not divisible by the {GN_GROUPS} GroupNorm groups"
                )
        if not 0.0 <= float(self.dropout_probability) < 1.0:
            raise UserError(f"model.dropout_probability: {self.dropout_probability!r} must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready kwargs (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "model") -> "AutoencoderConfig":
        """Build from a mapping; unknown keys are errors with a did-you-mean suggestion."""
        cls.check_keys(values, where=where)
        return cls(**dict(values))

    @classmethod
    def check_keys(cls, values: Mapping[str, Any], *, where: str = "model") -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise UserError(f"{where}: unknown key '{key}'{did_you_mean(str(key), known)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tiny(multipliers: tuple[int, ...]) -> AutoencoderConfig:
    """Small CPU presets: same block types as the paper models, hidden 32 so 32-group GroupNorm still fits."""
    n = len(multipliers)
    return AutoencoderConfig(
        hidden_channels=32, channel_multipliers=multipliers, encoder_layer_configs=(1,) * (n + 1),
        decoder_layer_configs=(1,) * (n + 1), use_adaptive_norm=True, use_learnable_up_down_sample=True,
    )


def _paper(multipliers: tuple[int, ...]) -> AutoencoderConfig:
    """Released GSQ-GAN backbones: hidden 128, two ResBlocks per stage, AdaGN and depth-to-space on."""
    n = len(multipliers)
    return AutoencoderConfig(
        hidden_channels=128, channel_multipliers=multipliers, encoder_layer_configs=(2,) * (n + 1),
        decoder_layer_configs=(2,) * (n + 1), use_adaptive_norm=True, use_learnable_up_down_sample=True,
    )


# embedding_dim is set per model by preset_config (it must match the quantizer's latent width).
PRESETS: dict[str, AutoencoderConfig] = {
    "f8": _paper((1, 2, 2, 4)),
    "f16": _paper((1, 1, 2, 2, 4)),
    "f32": _paper((1, 1, 2, 2, 4, 4)),
    # f = 2^(len(multipliers) - 1): three stages for f4, four for f8
    "tiny-f4": _tiny((1, 2, 2)),
    "tiny-f8": _tiny((1, 1, 2, 2)),
}


def preset_config(name: str, embedding_dim: int) -> AutoencoderConfig:
    """The named backbone with the given latent width D."""
    if name not in PRESETS:
        raise UserError(f"model.preset: unknown preset '{name}'{did_you_mean(str(name), PRESETS)}")
    return dataclasses.replace(PRESETS[name], embedding_dim=embedding_dim)


# ----------------------------------------------------------------------------------------------- blocks


def _kaiming_linear_(conv: nn.Conv2d, scale: float = 1.0) -> None:
    """Official init: kaiming-normal with linear gain, optionally rescaled (spec §3.2 table)."""
    if conv.weight.is_meta:  # shape-only builds (parameter counts, architecture inference): no values to set
        return
    nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
    if scale != 1.0:
        with torch.no_grad():
            conv.weight.mul_(scale)


class ResBlock(nn.Module):
    """GN → SiLU → Conv → GN → SiLU → Dropout2d → Conv, plus a 1×1 skip when the width changes.

    Sequential indices 0/2/3/6 carry the parameters, as in the official state dict.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.GroupNorm(GN_GROUPS, cin, eps=RES_GN_EPS),
            nn.SiLU(),
            nn.Conv2d(cin, cout, kernel_size, padding=pad),
            nn.GroupNorm(GN_GROUPS, cout, eps=RES_GN_EPS),
            nn.SiLU(),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(cout, cout, kernel_size, padding=pad),
        )
        self.skip: nn.Module = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        if isinstance(self.skip, nn.Conv2d):
            _kaiming_linear_(self.skip)
        _kaiming_linear_(self.net[2], SILU_GAIN)
        _kaiming_linear_(self.net[6], SILU_GAIN * RESIDUAL_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + self.skip(x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv, channels unchanged."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=2, padding=(kernel_size - 1) // 2)
        _kaiming_linear_(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv: the decoder's upsampler when use_learnable_up_down_sample is off."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        _kaiming_linear_(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def depth_to_space_dcr(x: Tensor, block: int = 2) -> Tensor:
    """DCR depth-to-space: out[c, b·h+i, b·w+j] = in[(b·i+j)·C + c, h, w].

    Not `nn.PixelShuffle` (which reads in[c·b² + b·i + j]); the official weights assume DCR.
    """
    n, c4, h, w = x.shape
    c = c4 // (block * block)
    x = x.view(n, block, block, c, h, w)  # (n, i, j, c, h, w)
    x = x.permute(0, 3, 4, 1, 5, 2)  # (n, c, h, i, w, j)
    return x.reshape(n, c, h * block, w * block)


class DepthToSpaceUpsample(nn.Module):
    """3×3 conv C→4C followed by DCR depth-to-space ×2 (official `DepthToSpace2DWithConv`, PyTorch-default init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space_dcr(self.conv(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, rescaled/shifted from the spatial statistics of the quantised latent.

    y = Linear_γ(sqrt(var_hw(q) + eps)) · GN(x) + Linear_β(mean_hw(q)). The variance is torch's default
    *unbiased* estimate, as in the official code (its comment says otherwise), so h·w must be at least 2.
    The statistics are taken in fp32 (at least): under bf16 autocast the official decoder conditions on the
    fp32 codebook rows, so its var/mean run in fp32; only the two Linear layers run in bf16 there.
    """

    def __init__(self, channels: int, cond_channels: int, eps: float = ADAGN_EPS) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(GN_GROUPS, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(cond_channels, channels)
        self.beta = nn.Linear(cond_channels, channels)
        self.eps = eps

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        flat = cond.flatten(2)  # (b, D, h·w)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())[:, :, None, None]
        shift = self.beta(flat.mean(dim=-1))[:, :, None, None]
        return scale * self.gn(x) + shift


class AttentionBlock(nn.Module):
    """Single-head self-attention over h·w positions with a residual (official, unused by the releases)."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.channels = channels
        self.dropout = dropout
        self.norm = nn.GroupNorm(GN_GROUPS, channels, eps=ATTN_GN_EPS)
        self.qkv_conv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_conv = nn.Conv2d(channels, channels, 1)
        _kaiming_linear_(self.qkv_conv)
        _kaiming_linear_(self.proj_conv)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_conv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, 3 * c)
        q, k, v = qkv.split(c, dim=2)  # (b, hw, c) each
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_conv(out)


# ------------------------------------------------------------------------------------ encoder / decoder


class Encoder(nn.Module):
    """conv_in → blocks (stages with transition ResBlocks and stride-2 convs, then middle blocks) → fianl_layers."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        k, drop = cfg.residual_conv_kernel_size, cfg.dropout_probability
        self.conv_in = nn.Conv2d(cfg.input_channels, cfg.hidden_channels, cfg.input_conv_kernel_size,
                                 padding=cfg.input_conv_kernel_size // 2)
        _kaiming_linear_(self.conv_in)
        self.blocks = nn.ModuleList()
        cin, factor = cfg.hidden_channels, 1
        last = len(cfg.channel_multipliers) - 1
        for i, mult in enumerate(cfg.channel_multipliers):
            ch = cfg.hidden_channels * mult
            if cin != ch:  # MAGVIT transition block changes the width before the stage's blocks
                self.blocks.append(ResBlock(cin, ch, k, drop))
            for _ in range(cfg.encoder_layer_configs[i]):
                self.blocks.append(ResBlock(ch, ch, k, drop))
                if factor in cfg.attention_resolutions:
                    self.blocks.append(AttentionBlock(ch))
            if i < last:
                self.blocks.append(Downsample(ch))
                factor *= 2
            cin = ch
        n_mid = cfg.encoder_layer_configs[-1]
        for j in range(n_mid):
            self.blocks.append(ResBlock(cin, cin, k, drop))
            if cfg.mid_block_attn and j < n_mid - 1:
                self.blocks.append(AttentionBlock(cin))
        # Upstream spelling kept on purpose: it is the state-dict key of every released checkpoint.
        self.fianl_layers = nn.Sequential(
            nn.GroupNorm(GN_GROUPS, cin, eps=RES_GN_EPS), nn.SiLU(), nn.Conv2d(cin, cfg.embedding_dim, 1),
        )
        _kaiming_linear_(self.fianl_layers[2], SILU_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        return self.fianl_layers(h)


class Decoder(nn.Module):
    """conv_in → middle blocks → [AdaGN] → reversed stages with upsampling (+AdaGN) → final_layers.

    Every AdaGN is conditioned on the decoder input itself (the quantised latent), whatever its resolution.
    """

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        k, drop, D = cfg.residual_conv_kernel_size, cfg.dropout_probability, cfg.embedding_dim
        mults = cfg.channel_multipliers
        ch = cfg.hidden_channels * mults[-1]
        self.use_adaptive_norm = cfg.use_adaptive_norm
        self.conv_in = nn.Conv2d(D, ch, k, padding=k // 2)
        _kaiming_linear_(self.conv_in)
        self.blocks = nn.ModuleList()
        n_mid = cfg.decoder_layer_configs[-1]
        for j in range(n_mid):
            self.blocks.append(ResBlock(ch, ch, k, drop))
            if cfg.mid_block_attn and j < n_mid - 1:
                self.blocks.append(AttentionBlock(ch))
        if cfg.use_adaptive_norm:
            self.blocks.append(AdaptiveGroupNorm(ch, D))
        stage_layers = cfg.decoder_layer_configs[:-1][::-1]
        cin, factor = ch, cfg.downsample_factor
        for i, mult in enumerate(mults[::-1]):
            ch = cfg.hidden_channels * mult
            if cin != ch:
                self.blocks.append(ResBlock(cin, ch, k, drop))
            for _ in range(stage_layers[i]):
                self.blocks.append(ResBlock(ch, ch, k, drop))
                if factor in cfg.attention_resolutions:
                    self.blocks.append(AttentionBlock(ch))
            if i < len(mults) - 1:
                up = DepthToSpaceUpsample(ch) if cfg.use_learnable_up_down_sample else Upsample(ch)
                self.blocks.append(up)
                if cfg.use_adaptive_norm:
                    self.blocks.append(AdaptiveGroupNorm(ch, D))
                factor //= 2
            cin = ch
        self.final_layers = nn.Sequential(
            nn.GroupNorm(GN_GROUPS, cin, eps=RES_GN_EPS), nn.SiLU(),
            nn.Conv2d(cin, cfg.input_channels, cfg.output_conv_kernel_size, padding=cfg.output_conv_kernel_size // 2),
        )
        _kaiming_linear_(self.final_layers[2], SILU_GAIN)

    def forward(self, q: Tensor) -> Tensor:
        if self.use_adaptive_norm and q.shape[-1] * q.shape[-2] < 2:
            raise UserError(
                f"decoder input: latent grid {q.shape[-2]}x{q.shape[-1]} is too small for adaptive GroupNorm "
                "(unbiased variance needs at least 2 positions); use a larger image"
            )
        h = self.conv_in(q)
        for block in self.blocks:
            h = block(h, q) if isinstance(block, AdaptiveGroupNorm) else block(h)
        return self.final_layers(h)
