"""Tests of the published-tokenizer importers (issue 19): LlamaGen, Open-MAGVIT2, MaskGIT VQGAN, taming VQGAN.

For each tokenizer this file (and never gsqbench.models) generates the release's key → shape table by
transcribing the upstream constructors (the loops of LlamaGen `vq_model.py`, taming `diffusionmodules/model.py`,
1d-tokenizer `maskgit_vqgan.py`, SEED-Voken `improved_model.py` + `ema.py`), fills it with random weights, saves
it in the release layout (`{"model": sd}`, a Lightning `.ckpt`, a plain `.bin`), imports it through the CLI and
compares our forward with a float64 functional restatement of the upstream forward (F.conv2d / F.group_norm on
the raw state dict). Widths are reduced (ch 32 instead of 128) but depth, key names and module order are the
release's; a separate check compares the full-size key/shape tables with our models built on the meta device.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gsqbench.checkpoints import load_tokenizer
from gsqbench.cli import main
from gsqbench.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================== transcriptions of the upstream module trees


class Shapes(dict):
    """key → shape, filled with the upstream constructors' parameter shapes."""

    def conv(self, p, cout, cin, k, bias=True):
        self[f"{p}.weight"] = (cout, cin, k, k)
        if bias:
            self[f"{p}.bias"] = (cout,)

    def gn(self, p, c):
        self[f"{p}.weight"], self[f"{p}.bias"] = (c,), (c,)

    def linear(self, p, cout, cin):
        self[f"{p}.weight"], self[f"{p}.bias"] = (cout, cin), (cout,)


def _taming_res(s, p, cin, cout, bias=True):  # taming/LlamaGen ResnetBlock (temb_channels = 0)
    s.gn(f"{p}.norm1", cin)
    s.conv(f"{p}.conv1", cout, cin, 3, bias)
    s.gn(f"{p}.norm2", cout)
    s.conv(f"{p}.conv2", cout, cout, 3, bias)
    if cin != cout:
        s.conv(f"{p}.nin_shortcut", cout, cin, 1, bias)


def _attn(s, p, c):
    s.gn(f"{p}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        s.conv(f"{p}.{name}", c, c, 1)


def llamagen_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, z=256, embed=8, V=16384):
    """LlamaGen VQModel(ModelArgs(encoder_ch_mult=ch_mult, decoder_ch_mult=ch_mult, ...))."""
    s, n = Shapes(), len(ch_mult)
    s.conv("encoder.conv_in", ch, 3, 3)
    in_mult = (1,) + tuple(ch_mult)
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(nrb):
            _taming_res(s, f"encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == n - 1:
                _attn(s, f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != n - 1:
            s.conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    _taming_res(s, "encoder.mid.0", block_in, block_in)
    _attn(s, "encoder.mid.1", block_in)
    _taming_res(s, "encoder.mid.2", block_in, block_in)
    s.gn("encoder.norm_out", block_in)
    s.conv("encoder.conv_out", z, block_in, 3)
    block_in = ch * ch_mult[-1]
    s.conv("decoder.conv_in", block_in, z, 3)
    _taming_res(s, "decoder.mid.0", block_in, block_in)
    _attn(s, "decoder.mid.1", block_in)
    _taming_res(s, "decoder.mid.2", block_in, block_in)
    for k, i in enumerate(reversed(range(n))):
        block_out = ch * ch_mult[i]
        for j in range(nrb + 1):
            _taming_res(s, f"decoder.conv_blocks.{k}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == n - 1:
                _attn(s, f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if i != 0:
            s.conv(f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in, 3)
    s.gn("decoder.norm_out", block_in)
    s.conv("decoder.conv_out", 3, block_in, 3)
    s["quantize.embedding.weight"] = (V, embed)
    s["quantize.codebook_used"] = (65536,)
    s.conv("quant_conv", embed, z, 1)
    s.conv("post_quant_conv", z, embed, 1)
    return dict(s)


def taming_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, attn_resolutions=(16,), resolution=256, z=256, embed=256,
                V=16384):
    """taming VQModel(ddconfig, n_embed=V, embed_dim=embed), double_z False, without the `loss.` modules."""
    s, n = Shapes(), len(ch_mult)
    s.conv("encoder.conv_in", ch, 3, 3)
    curr_res = resolution
    in_mult = (1,) + tuple(ch_mult)
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(nrb):
            _taming_res(s, f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_resolutions:
                _attn(s, f"encoder.down.{i}.attn.{j}", block_in)
        if i != n - 1:
            s.conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            curr_res //= 2
    _taming_res(s, "encoder.mid.block_1", block_in, block_in)
    _attn(s, "encoder.mid.attn_1", block_in)
    _taming_res(s, "encoder.mid.block_2", block_in, block_in)
    s.gn("encoder.norm_out", block_in)
    s.conv("encoder.conv_out", z, block_in, 3)
    block_in = ch * ch_mult[-1]
    curr_res = resolution // 2 ** (n - 1)
    s.conv("decoder.conv_in", block_in, z, 3)
    _taming_res(s, "decoder.mid.block_1", block_in, block_in)
    _attn(s, "decoder.mid.attn_1", block_in)
    _taming_res(s, "decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(n)):
        block_out = ch * ch_mult[i]
        for j in range(nrb + 1):
            _taming_res(s, f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_resolutions:
                _attn(s, f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            s.conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            curr_res *= 2
    s.gn("decoder.norm_out", block_in)
    s.conv("decoder.conv_out", 3, block_in, 3)
    s["quantize.embedding.weight"] = (V, embed)
    s.conv("quant_conv", embed, z, 1)
    s.conv("post_quant_conv", z, embed, 1)
    return dict(s)


def _maskgit_res(s, p, cin, cout):  # 1d-tokenizer ResnetBlock: bias-free Conv2dSame, shortcut out → out
    s.gn(f"{p}.norm1", cin)
    s.conv(f"{p}.conv1", cout, cin, 3, bias=False)
    s.gn(f"{p}.norm2", cout)
    s.conv(f"{p}.conv2", cout, cout, 3, bias=False)
    if cin != cout:
        s.conv(f"{p}.nin_shortcut", cout, cout, 1, bias=False)


def maskgit_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, z=256, V=1024):
    """1d-tokenizer PretrainedTokenizer: Encoder(conf), Decoder(conf), VectorQuantizer(V, z)."""
    s, n = Shapes(), len(ch_mult)
    s.conv("encoder.conv_in", ch, 3, 3, bias=False)
    in_mult = (1,) + tuple(ch_mult)
    for i in range(n):  # DownsamplingBlock(block_idx=i)
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(nrb):
            _maskgit_res(s, f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
    mid = ch * ch_mult[-1]
    for j in range(nrb):
        _maskgit_res(s, f"encoder.mid.{j}", mid, mid)
    s.gn("encoder.norm_out", mid)
    s.conv("encoder.conv_out", z, mid, 1)
    s.conv("decoder.conv_in", mid, z, 3)
    for j in range(nrb):
        _maskgit_res(s, f"decoder.mid.{j}", mid, mid)
    for i in range(n):  # UpsamplingBlock(block_idx=i), list reversed twice → up[i] is block i
        block_in = ch * ch_mult[-1] if i == n - 1 else ch * ch_mult[i + 1]
        block_out = ch * ch_mult[i]
        for j in range(nrb):
            _maskgit_res(s, f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            s.conv(f"decoder.up.{i}.upsample_conv", block_out, block_out, 3)
    s.gn("decoder.norm_out", ch * ch_mult[0])
    s.conv("decoder.conv_out", 3, ch * ch_mult[0], 3)
    s["quantize.embedding.weight"] = (V, z)
    return dict(s)


def _magvit_res(s, p, cin, cout):  # improved_model.ResBlock(use_agn=False, use_conv_shortcut=False)
    s.gn(f"{p}.norm1", cin)
    s.gn(f"{p}.norm2", cout)
    s.conv(f"{p}.conv1", cout, cin, 3, bias=False)
    s.conv(f"{p}.conv2", cout, cout, 3, bias=False)
    if cin != cout:
        s.conv(f"{p}.nin_shortcut", cout, cin, 1, bias=False)


def magvit2_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=4, z=18):
    """SEED-Voken improved_model Encoder/Decoder (the LFQ has no persistent state)."""
    s, n = Shapes(), len(ch_mult)
    s.conv("encoder.conv_in", ch, 3, 3, bias=False)
    in_mult = (1,) + tuple(ch_mult)
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(nrb):
            _magvit_res(s, f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i < n - 1:
            s.conv(f"encoder.down.{i}.downsample", block_out, block_out, 3)
    for j in range(nrb):
        _magvit_res(s, f"encoder.mid_block.{j}", block_in, block_in)
    s.gn("encoder.norm_out", block_out)
    s.conv("encoder.conv_out", z, block_out, 1)
    block_in = ch * ch_mult[-1]
    s.conv("decoder.conv_in", block_in, z, 3)
    for j in range(nrb):
        _magvit_res(s, f"decoder.mid_block.{j}", block_in, block_in)
    for i in reversed(range(n)):
        block_out = ch * ch_mult[i]
        s.linear(f"decoder.adaptive.{i}.gamma", block_in, z)  # adaptive.insert(0, ...) → index i
        s.linear(f"decoder.adaptive.{i}.beta", block_in, z)
        for j in range(nrb):
            _magvit_res(s, f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i > 0:
            s.conv(f"decoder.up.{i}.upsample.conv1", 4 * block_in, block_in, 3)
    s.gn("decoder.norm_out", block_in)
    s.conv("decoder.conv_out", 3, block_in, 3)
    return dict(s)


def random_state(shapes, seed):
    """Random fp32 weights, fan-in scaled so activations stay O(1); GroupNorm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if k.endswith("codebook_used"):
            t = torch.zeros(shape)
        elif k.endswith("weight") and len(shape) >= 2 and "embedding" not in k:
            t /= math.sqrt(math.prod(shape[1:]))
        elif k.endswith("weight") and len(shape) == 1:
            t = 1 + 0.1 * t
        elif k.endswith("bias"):
            t *= 0.1
        out[k] = t
    return out


# ============================================================== float64 restatements of the upstream forwards


def gn(h, sd, p, affine=True):
    return F.group_norm(h, 32, sd[f"{p}.weight"] if affine else None, sd[f"{p}.bias"] if affine else None, 1e-6)


def swish(x):
    return x * torch.sigmoid(x)


def conv(h, sd, p, stride=1, padding=1):
    return F.conv2d(h, sd[f"{p}.weight"], sd.get(f"{p}.bias"), stride=stride, padding=padding)


def conv_same(h, sd, p):
    """1d-tokenizer Conv2dSame (stride 1): pad (k−1) split floor/ceil, then an unpadded conv."""
    k = sd[f"{p}.weight"].shape[-1]
    pad = max((math.ceil(h.shape[-1] / 1) - 1) * 1 + (k - 1) + 1 - h.shape[-1], 0)
    h = F.pad(h, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
    return F.conv2d(h, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def res_ref(h, sd, p):
    """taming / LlamaGen / Open-MAGVIT2 ResBlock: pre-activation, shortcut on the input."""
    r = conv(swish(gn(h, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    r = conv(swish(gn(r, sd, f"{p}.norm2")), sd, f"{p}.conv2")
    return (conv(h, sd, f"{p}.nin_shortcut", padding=0) if f"{p}.nin_shortcut.weight" in sd else h) + r


def attn_ref(h, sd, p):
    n = gn(h, sd, f"{p}.norm")
    q, k, v = (conv(n, sd, f"{p}.{x}", padding=0) for x in "qkv")
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    out = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return h + conv(out, sd, f"{p}.proj_out", padding=0)


def down_ref(h, sd, p):
    return conv(F.pad(h, (0, 1, 0, 1), mode="constant", value=0), sd, p, stride=2, padding=0)


def up_ref(h, sd, p):
    return conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, p)


def count(sd, pattern):
    i = 0
    while any(k.startswith(pattern.format(i) + ".") for k in sd):
        i += 1
    return i


def vq_ref(z, weight, l2):
    """argmin of z² + e² − 2 z·e over rows (LlamaGen: both l2-normalised), z_q = the (normalised) row."""
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if l2:
        zf, weight = F.normalize(zf, p=2, dim=-1), F.normalize(weight, p=2, dim=-1)
    d = (zf ** 2).sum(1, keepdim=True) + (weight ** 2).sum(1) - 2 * zf @ weight.T
    idx = torch.argmin(d, dim=1)
    b, _, h, w = z.shape
    return weight[idx].view(b, h, w, -1).permute(0, 3, 1, 2), idx.view(b, h, w, 1)


def llamagen_forward(sd, x):
    h = conv(x, sd, "encoder.conv_in")
    for i in range(count(sd, "encoder.conv_blocks.{}")):
        p = f"encoder.conv_blocks.{i}"
        for j in range(count(sd, p + ".res.{}")):
            h = res_ref(h, sd, f"{p}.res.{j}")
            if f"{p}.attn.0.q.weight" in sd:
                h = attn_ref(h, sd, f"{p}.attn.{j}")
        if f"{p}.downsample.conv.weight" in sd:
            h = down_ref(h, sd, f"{p}.downsample.conv")
    h = res_ref(attn_ref(res_ref(h, sd, "encoder.mid.0"), sd, "encoder.mid.1"), sd, "encoder.mid.2")
    h = conv(swish(gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z = conv(h, sd, "quant_conv", padding=0)
    z_q, idx = vq_ref(z, sd["quantize.embedding.weight"], l2=True)
    h = conv(conv(z_q, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    h = res_ref(attn_ref(res_ref(h, sd, "decoder.mid.0"), sd, "decoder.mid.1"), sd, "decoder.mid.2")
    for k in range(count(sd, "decoder.conv_blocks.{}")):
        p = f"decoder.conv_blocks.{k}"
        for j in range(count(sd, p + ".res.{}")):
            h = res_ref(h, sd, f"{p}.res.{j}")
            if f"{p}.attn.0.q.weight" in sd:
                h = attn_ref(h, sd, f"{p}.attn.{j}")
        if f"{p}.upsample.conv.weight" in sd:
            h = up_ref(h, sd, f"{p}.upsample.conv")
    return z, z_q, idx, conv(swish(gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def taming_forward(sd, x):
    h = conv(x, sd, "encoder.conv_in")
    n = count(sd, "encoder.down.{}")
    for i in range(n):
        for j in range(count(sd, f"encoder.down.{i}.block.{{}}")):
            h = res_ref(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.0.q.weight" in sd:
                h = attn_ref(h, sd, f"encoder.down.{i}.attn.{j}")
        if i != n - 1:
            h = down_ref(h, sd, f"encoder.down.{i}.downsample.conv")
    h = res_ref(attn_ref(res_ref(h, sd, "encoder.mid.block_1"), sd, "encoder.mid.attn_1"), sd, "encoder.mid.block_2")
    z = conv(conv(swish(gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out"), sd, "quant_conv", padding=0)
    z_q, idx = vq_ref(z, sd["quantize.embedding.weight"], l2=False)
    h = conv(conv(z_q, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    h = res_ref(attn_ref(res_ref(h, sd, "decoder.mid.block_1"), sd, "decoder.mid.attn_1"), sd, "decoder.mid.block_2")
    for i in reversed(range(n)):
        for j in range(count(sd, f"decoder.up.{i}.block.{{}}")):
            h = res_ref(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.0.q.weight" in sd:
                h = attn_ref(h, sd, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = up_ref(h, sd, f"decoder.up.{i}.upsample.conv")
    return z, z_q, idx, conv(swish(gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def maskgit_res_ref(h, sd, p):
    r = conv_same(F.silu(gn(h, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    r = conv_same(F.silu(gn(r, sd, f"{p}.norm2")), sd, f"{p}.conv2")
    residual = conv_same(r, sd, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in sd else h
    return r + residual


def maskgit_forward(sd, x01):
    """x in [0, 1] as upstream; returns (latent, z_q, indices, decoder output in [0, 1] space, unclamped)."""
    h = conv_same(x01, sd, "encoder.conv_in")
    n = count(sd, "encoder.down.{}")
    for i in range(n):
        for j in range(count(sd, f"encoder.down.{i}.block.{{}}")):
            h = maskgit_res_ref(h, sd, f"encoder.down.{i}.block.{j}")
        if i != n - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    for j in range(count(sd, "encoder.mid.{}")):
        h = maskgit_res_ref(h, sd, f"encoder.mid.{j}")
    z = conv_same(F.silu(gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z_q, idx = vq_ref(z, sd["quantize.embedding.weight"], l2=False)
    h = conv_same(z_q, sd, "decoder.conv_in")
    for j in range(count(sd, "decoder.mid.{}")):
        h = maskgit_res_ref(h, sd, f"decoder.mid.{j}")
    for i in reversed(range(n)):
        for j in range(count(sd, f"decoder.up.{i}.block.{{}}")):
            h = maskgit_res_ref(h, sd, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = conv_same(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample_conv")
    return z, z_q, idx, conv_same(F.silu(gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def magvit2_forward(sd, x):
    h = conv(x, sd, "encoder.conv_in")
    n = count(sd, "encoder.down.{}")
    for i in range(n):
        for j in range(count(sd, f"encoder.down.{i}.block.{{}}")):
            h = res_ref(h, sd, f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            h = conv(h, sd, f"encoder.down.{i}.downsample", stride=2, padding=1)
    for j in range(count(sd, "encoder.mid_block.{}")):
        h = res_ref(h, sd, f"encoder.mid_block.{j}")
    z = conv(swish(gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=0)
    # LFQ: +1 where z > 0 else −1; index Σ [z_k > 0]·2^k (upstream `mask = 2 ** arange(codebook_dim)`)
    z_q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
    idx = ((z > 0).long() * (2 ** torch.arange(z.shape[1]))[:, None, None]).sum(1, keepdim=True)
    style, h = z_q, conv(z_q, sd, "decoder.conv_in")
    for j in range(count(sd, "decoder.mid_block.{}")):
        h = res_ref(h, sd, f"decoder.mid_block.{j}")
    for i in reversed(range(n)):
        flat = style.flatten(2)
        mean = flat.sum(-1) / flat.shape[-1]
        var = ((flat - mean[..., None]) ** 2).sum(-1) / (flat.shape[-1] - 1)  # torch.var default: unbiased
        scale = F.linear(torch.sqrt(var + 1e-6), sd[f"decoder.adaptive.{i}.gamma.weight"],
                         sd[f"decoder.adaptive.{i}.gamma.bias"])
        shift = F.linear(mean, sd[f"decoder.adaptive.{i}.beta.weight"], sd[f"decoder.adaptive.{i}.beta.bias"])
        h = scale[..., None, None] * F.group_norm(h, 32, eps=1e-6) + shift[..., None, None]
        for j in range(count(sd, f"decoder.up.{i}.block.{{}}")):
            h = res_ref(h, sd, f"decoder.up.{i}.block.{j}")
        if i > 0:
            y = conv(h, sd, f"decoder.up.{i}.upsample.conv1")
            C = y.shape[1] // 4
            h = y.new_empty(y.shape[0], C, 2 * y.shape[2], 2 * y.shape[3])
            for a in range(2):
                for b in range(2):
                    h[:, :, a::2, b::2] = y[:, (2 * a + b) * C:(2 * a + b + 1) * C]  # DCR depth-to-space
    out = conv(swish(gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")
    return z, z_q, idx.permute(0, 2, 3, 1), out


# ============================================================== release files


def loss_state(seed):
    """Stand-ins for the `loss.` modules of VQLPIPSWithDiscriminator (discriminator trainable, LPIPS frozen)."""
    g = torch.Generator().manual_seed(seed)
    return {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4, generator=g),
            "loss.discriminator.main.0.bias": torch.randn(8, generator=g),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3, generator=g)}


SMALL = dict(ch=32)  # widths /4, everything else as released


def _compare(tok, forward, sd, x, *, to_model=lambda x: x, from_model=lambda y: y):
    tok = tok.double()
    sd = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        z_ref, zq_ref, idx_ref, out_ref = forward(sd, to_model(x))
        assert torch.allclose(tok.latent(to_model(x)), z_ref, rtol=0, atol=1e-9)
        qout = tok.encode(x)
        assert qout.indices.dtype == torch.int64 and qout.indices.shape == idx_ref.shape
        assert torch.equal(qout.indices, idx_ref)
        assert len(torch.unique(idx_ref)) > 1  # the check is not vacuous
        assert torch.allclose(qout.z_q, zq_ref, rtol=0, atol=1e-12)
        x_hat, _ = tok(x)
        assert torch.allclose(x_hat, from_model(out_ref), rtol=0, atol=1e-9)
        assert torch.equal(tok.decode_indices(qout.indices), tok.decode(qout.z_q))
        assert torch.equal(tok.quantizer.indices_to_codes(qout.indices), qout.z_q)


def _import(tmp_path, src, kind, capsys, extra=()):
    out = tmp_path / "ours"
    assert main(["import", str(src), "--kind", kind, "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert f"kind {kind}" in printed
    tok, meta = load_tokenizer(out)
    spec = json.loads((out / "model.json").read_text())
    assert spec["architecture"] == meta["architecture"]
    return tok, meta, printed


# ============================================================== 1. per tokenizer: strict import, same function


@pytest.mark.parametrize("variant,ch_mult", [("vq16", (1, 1, 2, 2, 4)), ("vq8", (1, 2, 2, 4))])
def test_llamagen_release_imports_strictly_and_computes_upstream_forward(tmp_path, capsys, variant, ch_mult):
    sd = random_state(llamagen_keys(ch_mult=ch_mult, z=32, embed=8, V=64, **SMALL), seed=1)
    src = tmp_path / f"vq_ds{2 ** (len(ch_mult) - 1)}_c2i.pt"
    torch.save({"model": sd}, src)
    tok, meta, printed = _import(tmp_path, src, "llamagen", capsys)
    assert meta["dropped"] == [{"prefix": "quantize.codebook_used", "keys": 1, "reason": meta["dropped"][0]["reason"]}]
    assert "dropped 1 keys 'quantize.codebook_used'" in printed
    assert set(tok.state_dict()) == set(sd) - {"quantize.codebook_used"}
    assert all(torch.equal(tok.state_dict()[k], v) for k, v in sd.items() if k in tok.state_dict())
    assert meta["weights"] == "raw" and meta["weights_entry"] == "model" and meta["variant"] is None
    assert tok.quantizer.codebook_size == 64 and tok.quantizer.dim == 8 and tok.quantizer.groups == 1
    assert hasattr(tok.quantizer, "lookup_precision")
    f = 2 ** (len(ch_mult) - 1)
    x = torch.rand(2, 3, 2 * f, 2 * f, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _compare(tok, llamagen_forward, sd, x)
    direct, direct_meta = load_tokenizer(src)  # the release file itself (what `gsqbench eval FILE` uses)
    assert direct_meta["checkpoint_sha256"] == meta["checkpoint_sha256"]
    assert torch.equal(direct.quantize.embedding.weight, sd["quantize.embedding.weight"])


def test_taming_lightning_release_imports_strictly_and_computes_upstream_forward(tmp_path, capsys, monkeypatch, fake_global):
    keys = taming_keys(z=32, embed=16, V=64, **SMALL)
    assert any(".attn." in k for k in keys) and "encoder.down.4.attn.1.q.weight" in keys  # the f16 attention level
    sd = random_state(keys, seed=2)
    callback = fake_global("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    src = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.0.8",
                "state_dict": {**sd, **loss_state(3)},
                "callbacks": {callback: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                "optimizer_states": [], "lr_schedulers": []}, src)
    tok, meta, printed = _import(tmp_path, src, "taming", capsys)
    assert meta["pickled_stand_ins"] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert [(d["prefix"], d["keys"]) for d in meta["dropped"]] == [("loss.", 3)]
    assert set(tok.state_dict()) == set(sd) and meta["model_spec"]["attn_levels"] == [4]
    assert "callbacks" in meta["ignored_entries"] and "read as inert stand-ins" in printed
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _compare(tok, taming_forward, sd, x)


def test_maskgit_release_imports_strictly_and_computes_upstream_forward_in_its_range(tmp_path, capsys):
    sd = random_state(maskgit_keys(z=32, V=64, **SMALL), seed=4)
    src = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(sd, src)
    tok, meta, _ = _import(tmp_path, src, "maskgit", capsys)
    assert set(tok.state_dict()) == set(sd) and meta["dropped"] == []
    assert meta["input_range"].startswith("[0, 1]")
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # upstream sees (x + 1) / 2 and its output y means 2y − 1 in gsqbench's range
    _compare(tok, maskgit_forward, sd, x, to_model=lambda x: (x + 1) / 2, from_model=lambda y: 2 * y - 1)


def _magvit_release(tmp_path, ch_mult, seed):
    raw = random_state(magvit2_keys(ch_mult=ch_mult, **SMALL), seed=seed)
    ema = random_state(magvit2_keys(ch_mult=ch_mult, **SMALL), seed=seed + 100)  # differs from raw on purpose
    loss = loss_state(seed)
    trainable = {**raw, **{k: v for k, v in loss.items() if "discriminator" in k}}
    state = {**raw, **loss, "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(-1)}
    for k in trainable:  # LitEma: every trainable parameter, '.' removed
        state["model_ema." + k.replace(".", "")] = ema[k] if k in ema else trainable[k] + 1
    src = tmp_path / f"imagenet_{256 if len(ch_mult) == 5 else 128}_L.ckpt"
    torch.save({"epoch": 269, "global_step": 10, "pytorch-lightning_version": "2.2.1", "state_dict": state,
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 269}}}},
                "callbacks": {"ModelCheckpoint{'monitor': None}": {"dirpath": "../../checkpoints"}},
                "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": argparse.Namespace(learning_rate=1e-4, use_ema=True)}, src)
    return src, raw, ema


@pytest.mark.parametrize("ch_mult", [(1, 1, 2, 2, 4), (1, 2, 2, 4)])
def test_open_magvit2_release_imports_ema_strictly_and_computes_upstream_forward(tmp_path, capsys, ch_mult):
    src, raw, ema = _magvit_release(tmp_path, ch_mult, seed=5)
    tok, meta, printed = _import(tmp_path, src, "open-magvit2", capsys)
    assert meta["weights"] == "ema" and meta["pickled_stand_ins"] == ["argparse.Namespace"]
    assert meta["ema_state"] == {"decay": pytest.approx(0.999), "num_updates": -1}
    dropped = {d["prefix"]: d["keys"] for d in meta["dropped"]}
    assert dropped == {"loss.": 3, "model_ema.loss": 2, "model_ema.decay": 1, "model_ema.num_updates": 1,
                       "encoder./decoder.": len(raw)}
    assert set(tok.state_dict()) == set(raw)
    assert all(torch.equal(tok.state_dict()[k], ema[k]) for k in raw)  # the EMA copy, not the raw weights
    assert tok.quantizer.codebook_size == 2 ** 18 and tok.quantizer.dim == 18
    assert tok.quantizer.lookup_precision is None  # LFQ has no nearest-code lookup
    f = 2 ** (len(ch_mult) - 1)
    x = torch.rand(2, 3, 2 * f, 2 * f, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _compare(tok, magvit2_forward, ema, x)
    assert main(["import", str(src), "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0  # kind recognised
    raw_tok, raw_meta = load_tokenizer(tmp_path / "raw")
    assert raw_meta["weights"] == "raw" and raw_meta["kind"] == "open-magvit2"
    assert all(torch.equal(raw_tok.state_dict()[k], raw[k]) for k in raw)


def test_open_magvit2_lfq_index_bit_order_and_sign():
    # independent of the release machinery: channel k is bit k (LSB first), z > 0 → +1, z ≤ 0 (incl. 0) → −1
    from gsqbench.models.magvit2 import LFQ

    q = LFQ(dim=4, codebook_size=16)
    z = torch.tensor([0.5, -0.1, 0.0, 2.0]).view(1, 4, 1, 1)
    out = q(z)
    assert out.indices.item() == 1 + 8
    assert out.z_q.flatten().tolist() == [1.0, -1.0, -1.0, 1.0]
    assert torch.equal(q.indices_to_codes(out.indices), out.z_q)


# ============================================================== full-size structure, CLI and format details


@pytest.mark.parametrize("name,keys,build", [
    ("llamagen VQ-16", lambda: llamagen_keys(), lambda m: m.llamagen.LlamaGenVQ(m.llamagen.LlamaGenConfig())),
    ("llamagen VQ-8", lambda: llamagen_keys(ch_mult=(1, 2, 2, 4)),
     lambda m: m.llamagen.LlamaGenVQ(m.llamagen.LlamaGenConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)))),
    ("taming f16-16384", lambda: taming_keys(), lambda m: m.taming.TamingVQGAN(m.taming.TamingConfig())),
    ("maskgit", lambda: maskgit_keys(), lambda m: m.maskgit.MaskGITVQGAN(m.maskgit.MaskGITConfig())),
    ("open-magvit2 IN256_L", lambda: magvit2_keys(), lambda m: m.magvit2.OpenMagvit2(m.magvit2.MagvitConfig())),
    ("open-magvit2 IN128_L", lambda: magvit2_keys(ch_mult=(1, 2, 2, 4)),
     lambda m: m.magvit2.OpenMagvit2(m.magvit2.MagvitConfig(ch_mult=(1, 2, 2, 4)))),
])
def test_full_size_release_layouts_match_our_modules(name, keys, build):
    import gsqbench.models.llamagen
    import gsqbench.models.magvit2
    import gsqbench.models.maskgit
    import gsqbench.models.taming  # noqa: F401

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build(gsqbench.models).state_dict().items()}
    expected = {k: v for k, v in keys().items() if k != "quantize.codebook_used"}
    assert ours == expected, name


def test_release_kind_is_recognised_and_wrong_kind_names_missing_keys(tmp_path, capsys):
    sd = random_state(maskgit_keys(z=32, V=64, **SMALL), seed=4)
    src = tmp_path / "maskgit.bin"
    torch.save(sd, src)
    assert main(["import", str(src), "--out", str(tmp_path / "a")]) == 0
    assert "kind maskgit" in capsys.readouterr().out
    assert main(["import", str(src), "--kind", "taming", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gsqbench: error:") and "\n" not in err
    assert "weights do not fit the model architecture" in err and "missing keys: encoder.conv_in.bias" in err
    assert main(["import", str(src), "--out", str(tmp_path / "a")]) == 2  # no overwrite without --force
    assert "already holds a checkpoint" in capsys.readouterr().err
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    assert main(["import", str(tmp_path / "other.pt"), "--out", str(tmp_path / "c")]) == 2
    assert "cannot tell which published tokenizer" in capsys.readouterr().err


def test_strict_load_refuses_extra_and_missing_keys(tmp_path):
    sd = random_state(llamagen_keys(ch_mult=(1, 2, 2, 4), z=32, embed=8, V=64, **SMALL), seed=1)
    extra = {**sd, "decoder.extra.weight": torch.zeros(3)}
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="1 unexpected keys: decoder.extra.weight"):
        load_tokenizer(tmp_path / "extra.pt")
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_blocks.0.attn.1.q.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="1 missing keys: decoder.conv_blocks.0.attn.1.q.bias"):
        load_tokenizer(tmp_path / "missing.pt")


def test_magvit2_without_ema_needs_weights_raw(tmp_path):
    raw = random_state(magvit2_keys(ch_mult=(1, 2, 2, 4), **SMALL), seed=7)
    torch.save({"state_dict": raw}, tmp_path / "noema.ckpt")
    with pytest.raises(UserError, match="--weights raw"):
        load_tokenizer(tmp_path / "noema.ckpt")
    from gsqbench.importers.releases import load_release

    tok, meta = load_release(tmp_path / "noema.ckpt", weights="raw")
    assert meta["weights"] == "raw" and set(tok.state_dict()) == set(raw)


def test_cli_kind_choices_match_the_importer_registry():
    from gsqbench.commands.import_ import KIND_CHOICES
    from gsqbench.importers.releases import KINDS

    assert set(KIND_CHOICES) == set(KINDS)


def test_eval_runs_unchanged_on_a_release_file(tmp_path, capsys):
    # the evaluator treats an imported tokenizer like any other: MaskGIT, whose [0, 1] range is the riskiest
    sd = random_state(maskgit_keys(z=32, V=64, **SMALL), seed=4)
    src = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(sd, src)
    out = tmp_path / "res"
    assert main(["eval", str(src), "--data", "synthetic", "--resolution", "32", "--n", "2", "--metrics", "pixel",
                 "--metrics", "codebook", "--samples", "0", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "psnr" in printed and "usage_pooled" in printed
    run = json.loads((out / "run.json").read_text())
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    # a loaded subject: evaluated as released; which file and kind it was is run-specific (not in the card hash)
    assert run["card"]["model"]["weights"] == "as-released"
    assert run["card"]["model"]["loaded"]["source"] == "published-release"
    assert run["card"]["model"]["loaded"]["kind"] == "maskgit"
    assert run["card"]["model"]["checkpoint_sha256"] == sha
    assert run["loaded"]["sha256"] == sha and run["fairness_hash"]


def test_model_json_architecture_errors_are_one_line(tmp_path, capsys):
    sd = random_state(maskgit_keys(z=32, V=64, **SMALL), seed=4)
    torch.save(sd, tmp_path / "m.bin")
    out = tmp_path / "ours"
    assert main(["import", str(tmp_path / "m.bin"), "--out", str(out)]) == 0
    spec_path = out / "model.json"
    spec = json.loads(spec_path.read_text())
    assert spec["architecture"] == "maskgit-vqgan" and spec["quantizer"]["name"] == "maskgit-vq"
    spec_path.write_text(json.dumps({**spec, "architecture": "maskgit-vqgn"}))
    with pytest.raises(UserError, match="architecture 'maskgit-vqgn' is not known; did you mean 'maskgit-vqgan'"):
        load_tokenizer(out)
    spec_path.write_text(json.dumps({**spec, "quantizer": {**spec["quantizer"], "l2norm": True}}))
    with pytest.raises(UserError, match="quantizer key 'l2norm' is not known"):
        load_tokenizer(out)
    spec_path.write_text(json.dumps({**spec, "model": {**spec["model"], "chanel_mult": [1]}}))
    with pytest.raises(UserError, match="unknown key 'chanel_mult'; did you mean 'channel_mult'"):
        load_tokenizer(out)
