"""LlamaGen's VQ tokenizers (VQ-16, VQ-8), reimplemented with the upstream module tree and key names.

Follows FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py` (read at commit 0b3a62be, the last
change to that file): `VQModel` = `Encoder` → `quant_conv` (1×1, z_channels → 8) → `VectorQuantizer`
(16384 × 8, latents and codes l2-normalised) → `post_quant_conv` → `Decoder`. The encoder stores one
`conv_blocks[i]` per level with `res[j]` ResBlocks, `attn[j]` after each of them only at the last
(lowest-resolution) level, and a `downsample` except at the last level; `mid` = [ResBlock, AttnBlock,
ResBlock]. The decoder lists its `conv_blocks` from the lowest resolution up (attention in the first one,
num_res_blocks + 1 ResBlocks per level, an `upsample` after all but the last). VQ-16: ch_mult (1, 1, 2, 2, 4);
VQ-8: (1, 2, 2, 4); ch 128, z_channels 256, 2 ResBlocks per level. Images in [-1, 1] as upstream.

Not part of the evaluated model: `quantize.codebook_used`, a training-only ring buffer of recent indices
(the importer drops and records it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.models.published import (PublishedTokenizer, check_positive, config_from_dict, quantizer_kwargs,
                                       register_architecture)
from gsqbench.models.vqgan_blocks import AttnBlock, CodebookVQ, Downsample, ResnetBlock, Upsample, group_norm

ARCHITECTURE = "llamagen-vq"


@dataclass(frozen=True)
class LlamaGenConfig:
    """`ModelArgs` + Encoder/Decoder kwargs that shape the weights (upstream defaults: VQ-16)."""

    in_channels: int = 3
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256

    def __post_init__(self) -> None:
        check_positive("model", in_channels=self.in_channels, ch=self.ch, num_res_blocks=self.num_res_blocks,
                       z_channels=self.z_channels, encoder_ch_mult=self.encoder_ch_mult,
                       decoder_ch_mult=self.decoder_ch_mult)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class Encoder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig) -> None:
        super().__init__()
        n = len(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + tuple(cfg.encoder_ch_mult)
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for level in range(n):
            block = nn.Module()
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * cfg.encoder_ch_mult[level]
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level == n - 1:
                    block.attn.append(AttnBlock(block_in))
            if level != n - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig) -> None:
        super().__init__()
        n = len(cfg.decoder_ch_mult)
        block_in = cfg.ch * cfg.decoder_ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n)):  # stored lowest resolution first
            block = nn.Module()
            block_out = cfg.ch * cfg.decoder_ch_mult[level]
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level == n - 1:
                    block.attn.append(AttnBlock(block_in))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LlamaGenVQ(PublishedTokenizer):
    """LlamaGen `VQModel` (inference path); key names as upstream (`quant_conv`, `quantize.embedding`, ...)."""

    architecture = ARCHITECTURE

    def __init__(self, config: LlamaGenConfig, codebook_size: int = 16384, codebook_embed_dim: int = 8,
                 l2_norm: bool = True, lookup_precision: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = CodebookVQ(codebook_size, codebook_embed_dim, l2_norm=l2_norm,
                                   lookup_precision=lookup_precision)
        self.quant_conv = nn.Conv2d(config.z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def latent(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))


def quantizer_spec(codebook_size: int, dim: int, l2_norm: bool = True) -> dict[str, Any]:
    return {"name": "llamagen-vq", "codebook_size": codebook_size, "dim": dim, "l2_norm": l2_norm}


@register_architecture(ARCHITECTURE)
def build(model: Mapping[str, Any], quantizer: Mapping[str, Any]) -> LlamaGenVQ:
    cfg = config_from_dict(LlamaGenConfig, model, "model")
    q = quantizer_kwargs(quantizer, "llamagen-vq", ("codebook_size", "dim"),
                         {"l2_norm": True, "lookup_precision": None})
    return LlamaGenVQ(cfg, codebook_size=int(q["codebook_size"]), codebook_embed_dim=int(q["dim"]),
                      l2_norm=bool(q["l2_norm"]), lookup_precision=q["lookup_precision"])
