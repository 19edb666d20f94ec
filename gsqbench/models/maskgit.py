"""MaskGIT's VQGAN (PyTorch port used by TiTok), reimplemented with the upstream key names.

Follows bytedance/1d-tokenizer `modeling/modules/maskgit_vqgan.py` (read at commit be0b076c, the last change
to that file; itself a port of huggingface/open-muse `modeling_maskgit_vqgan.py`, converted from the Jax
google-research/maskgit weights) and `modeling/titok.py` `PretrainedTokenizer` (channel_mult (1, 1, 2, 2, 4),
hidden 128, 2 ResBlocks per level, z_channels 256, codebook 1024 × 256, f = 16):

- no attention anywhere; all convs are stride 1 with "same" padding (for odd kernels at stride 1 exactly
  `padding = k // 2`); the ResBlock and input convs have no bias;
- the width-changing ResBlock shortcut is applied to the residual branch's output (`nin_shortcut(h)`,
  C_out → C_out), an upstream quirk the released weights depend on (see vqgan_blocks.ResnetBlock);
- downsampling is a 2×2 average pool after every level but the last; upsampling is nearest ×2 then
  `upsample_conv`;
- `quantize` has no quant_conv around it: the encoder's 1×1 `conv_out` produces the 256-d latent directly.

Pixel range: the upstream model takes images in [0, 1] and its decode clamps to [0, 1]. The wrapper maps
gsqbench's [-1, 1] input to (x + 1) / 2 and the decoder output y back to 2·y − 1 (unclamped; gsqbench's
uint8 conversion clamps, which is the same clamp).
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
from gsqbench.models.vqgan_blocks import CodebookVQ, ResnetBlock, group_norm

ARCHITECTURE = "maskgit-vqgan"


@dataclass(frozen=True)
class MaskGITConfig:
    """The OmegaConf fields of `PretrainedTokenizer` that shape the weights (defaults: the released model)."""

    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256

    def __post_init__(self) -> None:
        check_positive("model", num_channels=self.num_channels, hidden_channels=self.hidden_channels,
                       channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks, z_channels=self.z_channels)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _res(cin: int, cout: int) -> ResnetBlock:
    return ResnetBlock(cin, cout, bias=False, shortcut_on_output=True)


class Encoder(nn.Module):
    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__()
        n, ch, mult = len(cfg.channel_mult), cfg.hidden_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(cfg.num_channels, ch, 3, padding=1, bias=False)
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        for i in range(n):
            block_in, block_out = ch * in_mult[i], ch * mult[i]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(_res(block_in, block_out))
                block_in = block_out
            self.down.append(level)
        mid = ch * mult[-1]
        self.mid = nn.ModuleList([_res(mid, mid) for _ in range(cfg.num_res_blocks)])
        self.norm_out = group_norm(mid)
        self.conv_out = nn.Conv2d(mid, cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__()
        n, ch, mult = len(cfg.channel_mult), cfg.hidden_channels, cfg.channel_mult
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = nn.ModuleList([_res(top, top) for _ in range(cfg.num_res_blocks)])
        self.up = nn.ModuleList()
        for i in range(n):  # up[i] is level i; run from the last level down
            block_in = top if i == n - 1 else ch * mult[i + 1]
            block_out = ch * mult[i]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(_res(block_in, block_out))
                block_in = block_out
            if i != 0:
                level.upsample_conv = nn.Conv2d(block_out, block_out, 3, padding=1)
            self.up.append(level)
        self.norm_out = group_norm(ch * mult[0])
        self.conv_out = nn.Conv2d(ch * mult[0], cfg.num_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITVQGAN(PublishedTokenizer):
    """`PretrainedTokenizer` (encoder, decoder, quantize) with the [0, 1] ↔ [-1, 1] conversion at the boundary."""

    architecture = ARCHITECTURE

    def __init__(self, config: MaskGITConfig, num_embeddings: int = 1024, lookup_precision: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = CodebookVQ(num_embeddings, config.z_channels, l2_norm=False, lookup_precision=lookup_precision)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def to_model_input(self, x: Tensor) -> Tensor:
        return (x + 1.0) / 2.0

    def from_model_output(self, y: Tensor) -> Tensor:
        return y * 2.0 - 1.0

    def latent(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_latent(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)


def quantizer_spec(codebook_size: int, dim: int) -> dict[str, Any]:
    return {"name": "maskgit-vq", "codebook_size": codebook_size, "dim": dim}


@register_architecture(ARCHITECTURE)
def build(model: Mapping[str, Any], quantizer: Mapping[str, Any]) -> MaskGITVQGAN:
    cfg = config_from_dict(MaskGITConfig, model, "model")
    q = quantizer_kwargs(quantizer, "maskgit-vq", ("codebook_size", "dim"), {"lookup_precision": None})
    if int(q["dim"]) != cfg.z_channels:
        raise UserError(f"model.json: quantizer dim {q['dim']} must equal model.z_channels {cfg.z_channels}")
    return MaskGITVQGAN(cfg, num_embeddings=int(q["codebook_size"]), lookup_precision=q["lookup_precision"])
