"""Open-MAGVIT2's LFQ tokenizers (IN256_L f16, IN128_L f8), reimplemented with the upstream key names.

Follows TencentARC/SEED-Voken (formerly TencentARC/Open-MAGVIT2; read at commit b9a17eac)
`src/Open_MAGVIT2/models/lfqgan.py` `VQModel` (inference: `encoder` → `quantize` (LFQ) → `decoder`, no
quant_conv), `src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py` and
`src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py`:

- ResBlock: GroupNorm(32, eps 1e-6) → swish → 3×3 conv (no bias), twice; 1×1 `nin_shortcut` (no bias) on the
  input when the width changes. No attention.
- Encoder: `conv_in` (3×3, no bias); per level `down[i].block[j]` and, except at the last level,
  `down[i].downsample` = a 3×3 stride-2 conv with symmetric padding 1 (bias); `mid_block[j]` (num_res_blocks
  ResBlocks); `norm_out`; `conv_out` 1×1 → z_channels (18).
- Decoder: `conv_in` (3×3, bias); `mid_block[j]`; for level i = n−1 … 0: `adaptive[i]` (AdaptiveGroupNorm
  conditioned on the decoder input), `up[i].block[j]`, and for i > 0 `up[i].upsample.conv1` (C → 4C, 3×3)
  followed by depth-to-space (DCR order: output channel c at offset (a, b) reads input channel (2a + b)·C + c);
  `norm_out`; `conv_out`.
- AdaptiveGroupNorm: GroupNorm(32, eps 1e-6, affine=False)(x) · gamma(sqrt(var + 1e-6)) + beta(mean), with
  mean and var over the h·w positions of the quantised latent per channel. `torch.var`'s default is the
  UNBIASED (n − 1) estimate, which upstream uses (its comment "not unbias" notwithstanding).
- LFQ (2^18, 18 dims, one codebook): q = +1 where z > 0, else −1 (z = 0 maps to −1); index = Σ_k [z_k > 0]·2^k,
  i.e. channel k is bit k, least significant first (upstream's docstring says "big endian" but its masks are
  2^arange(d), little endian). Codes from indices: bit k → ±1 in channel k (`get_codebook_entry`).

The release is a Lightning checkpoint whose `model_ema.*` buffers hold the EMA weights the authors evaluate
(`ema_scope` in `evaluation_image.py`); gsqbench.importers.magvit2 maps them back onto these modules.
Images in [-1, 1] as upstream.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.errors import UserError
from gsqbench.models.published import (PublishedTokenizer, check_positive, config_from_dict, quantizer_kwargs,
                                       register_architecture)
from gsqbench.models.vqgan_blocks import GN_EPS, ResnetBlock, group_norm
from gsqbench.quantizer import QuantizerBase, QuantizerOutput, straight_through

ARCHITECTURE = "open-magvit2"


@dataclass(frozen=True)
class MagvitConfig:
    """`ddconfig` fields that shape the weights (defaults: IN256_L)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 18

    def __post_init__(self) -> None:
        check_positive("model", in_channels=self.in_channels, out_ch=self.out_ch, ch=self.ch, ch_mult=self.ch_mult,
                       num_res_blocks=self.num_res_blocks, z_channels=self.z_channels)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _res(cin: int, cout: int) -> ResnetBlock:
    return ResnetBlock(cin, cout, bias=False)


def depth_to_space(x: Tensor, block: int = 2) -> Tensor:
    """DCR depth-to-space: (b, s²·C, h, w) → (b, C, s·h, s·w), channel (a·s + b)·C + c → (c, s·y + a, s·x + b)."""
    b, c, h, w = x.shape
    out = c // (block * block)
    x = x.view(b, block, block, out, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, out, h * block, w * block)


class Upsampler(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    def __init__(self, z_channels: int, channels: int) -> None:
        super().__init__()
        self.gn = group_norm(channels, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        flat = style.flatten(2)  # (b, z, h·w)
        scale = self.gamma(torch.sqrt(flat.var(dim=-1, unbiased=True) + GN_EPS))
        shift = self.beta(flat.mean(dim=-1))
        return scale[..., None, None] * self.gn(x) + shift[..., None, None]


class Encoder(nn.Module):
    def __init__(self, cfg: MagvitConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = block_out = cfg.ch
        for i in range(n):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(_res(block_in, block_out))
                block_in = block_out
            if i < n - 1:
                level.downsample = nn.Conv2d(block_out, block_out, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList([_res(block_in, block_in) for _ in range(cfg.num_res_blocks)])
        self.norm_out = group_norm(block_out)
        self.conv_out = nn.Conv2d(block_out, cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MagvitConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid_block = nn.ModuleList([_res(block_in, block_in) for _ in range(cfg.num_res_blocks)])
        up: list[nn.Module] = []
        adaptive: list[nn.Module] = []
        for i in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i]
            adaptive.insert(0, AdaptiveGroupNorm(cfg.z_channels, block_in))  # width entering level i
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(_res(block_in, block_out))
                block_in = block_out
            if i > 0:
                level.upsample = Upsampler(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.adaptive = nn.ModuleList(adaptive)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        style = z
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i](h, style)
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQ(QuantizerBase):
    """Lookup-free quantizer with one codebook of 2^d sign patterns; no learned state (nothing in the state dict)."""

    def __init__(self, dim: int = 18, codebook_size: int = 2 ** 18) -> None:
        super().__init__()
        if codebook_size != 2 ** dim:
            raise UserError(f"quantizer: LFQ codebook_size {codebook_size} must be 2^dim = {2 ** dim}")
        self.dim, self.codebook_size, self.groups = int(dim), int(codebook_size), 1
        self.register_buffer("bit_values", 2 ** torch.arange(dim, dtype=torch.long), persistent=False)
        # a float buffer that follows .to()/.double(), so codes from indices come out in the model's dtype
        self.register_buffer("unit", torch.ones(()), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}"

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"quantizer expects a (b, {self.dim}, h, w) latent, got shape {tuple(z.shape)}")
        positive = z > 0
        q = torch.where(positive, torch.ones_like(z), -torch.ones_like(z))
        indices = (positive.permute(0, 2, 3, 1).long() * self.bit_values).sum(-1, keepdim=True)
        return QuantizerOutput(straight_through(z, q), indices)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        if indices.ndim != 4 or indices.shape[-1] != 1:
            raise ValueError(f"indices must be (b, h, w, 1), got shape {tuple(indices.shape)}")
        bits = (indices & self.bit_values) != 0  # (b, h, w, d)
        codes = bits.to(self.unit.dtype) * 2.0 - 1.0
        return codes.permute(0, 3, 1, 2).contiguous()


class OpenMagvit2(PublishedTokenizer):
    """Open-MAGVIT2 `VQModel` inference path (encoder → LFQ → decoder) with upstream key names."""

    architecture = ARCHITECTURE

    def __init__(self, config: MagvitConfig, codebook_size: int = 2 ** 18) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = LFQ(config.z_channels, codebook_size)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def latent(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_latent(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)


def quantizer_spec(dim: int) -> dict[str, Any]:
    return {"name": "open-magvit2-lfq", "codebook_size": 2 ** dim, "dim": dim}


@register_architecture(ARCHITECTURE)
def build(model: Mapping[str, Any], quantizer: Mapping[str, Any]) -> OpenMagvit2:
    cfg = config_from_dict(MagvitConfig, model, "model")
    q = quantizer_kwargs(quantizer, "open-magvit2-lfq", ("codebook_size", "dim"), {})
    if int(q["dim"]) != cfg.z_channels:
        raise UserError(f"model.json: quantizer dim {q['dim']} must equal model.z_channels {cfg.z_channels}")
    return OpenMagvit2(cfg, int(q["codebook_size"]))
