"""The taming-transformers VQGAN (e.g. ImageNet f16-16384), reimplemented with the upstream key names.

Follows CompVis/taming-transformers (read at commit 3ba01b24) `taming/models/vqgan.py` `VQModel` (inference
path: `encoder` → `quant_conv` → `quantize` (`VectorQuantizer2`, raw codebook, no normalisation) →
`post_quant_conv` → `decoder`) and `taming/modules/diffusionmodules/model.py` `Encoder`/`Decoder` with
`double_z=False`, `resamp_with_conv=True`, no timestep embedding (`temb_ch = 0`, so ResBlocks have no
`temb_proj`). Encoder: `down[i].block[j]`, `down[i].attn[j]` where the level's resolution is in
`attn_resolutions`, `down[i].downsample` (all but the last level); `mid.block_1`, `mid.attn_1`, `mid.block_2`;
`norm_out`, `conv_out`. Decoder: `mid`, then `up[i]` for i = n−1 … 0 (stored at index i; num_res_blocks + 1
ResBlocks, attention at the same levels as the encoder, `upsample` for i > 0), `norm_out`, `conv_out`.

Which levels attend is decided upstream by `resolution` and `attn_resolutions` (f16-16384: resolution 256,
attn_resolutions [16] → the last level only); here it is the level list itself (`attn_levels`), because that
is what the weights show. Images in [-1, 1] as upstream (`x / 127.5 − 1`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.errors import UserError
from gsqbench.models.published import (PublishedTokenizer, check_positive, config_from_dict, quantizer_kwargs,
                                       register_architecture)
from gsqbench.models.vqgan_blocks import AttnBlock, CodebookVQ, Downsample, ResnetBlock, Upsample, group_norm

ARCHITECTURE = "taming-vqgan"


@dataclass(frozen=True)
class TamingConfig:
    """`ddconfig` fields that shape the weights (defaults: the ImageNet f16-16384 release)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (4,)
    z_channels: int = 256

    def __post_init__(self) -> None:
        check_positive("model", in_channels=self.in_channels, out_ch=self.out_ch, ch=self.ch, ch_mult=self.ch_mult,
                       num_res_blocks=self.num_res_blocks, z_channels=self.z_channels)
        if any(not isinstance(i, int) or not 0 <= i < len(self.ch_mult) for i in self.attn_levels):
            raise UserError(f"model.attn_levels: {list(self.attn_levels)} must be level indices in "
                            f"[0, {len(self.ch_mult)})")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attn)
    return level


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[j](h)
    return h


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: TamingConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i in range(n):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i in cfg.attn_levels:
                    attn.append(AttnBlock(block_in))
            level = _level(blocks, attn)
            if i != n - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: TamingConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i in cfg.attn_levels:
                    attn.append(AttnBlock(block_in))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # upstream prepends: up[i] is level i
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            h = _run_level(self.up[i], h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TamingVQGAN(PublishedTokenizer):
    """taming `VQModel` inference path with upstream key names (`quantize.embedding.weight`, `quant_conv`, ...)."""

    architecture = ARCHITECTURE

    def __init__(self, config: TamingConfig, n_embed: int = 16384, embed_dim: int = 256,
                 lookup_precision: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = CodebookVQ(n_embed, embed_dim, l2_norm=False, lookup_precision=lookup_precision)
        self.quant_conv = nn.Conv2d(config.z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def latent(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))


def quantizer_spec(codebook_size: int, dim: int) -> dict[str, Any]:
    return {"name": "taming-vq", "codebook_size": codebook_size, "dim": dim}


@register_architecture(ARCHITECTURE)
def build(model: Mapping[str, Any], quantizer: Mapping[str, Any]) -> TamingVQGAN:
    cfg = config_from_dict(TamingConfig, model, "model")
    q = quantizer_kwargs(quantizer, "taming-vq", ("codebook_size", "dim"), {"lookup_precision": None})
    return TamingVQGAN(cfg, n_embed=int(q["codebook_size"]), embed_dim=int(q["dim"]),
                       lookup_precision=q["lookup_precision"])
