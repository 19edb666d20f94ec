"""Tests of the GSQ-GAN autoencoder and the Tokenizer: parameter counts against gsq-reference.md §3.5,
depth-to-space against the DCR index formula, adaptive GroupNorm against its formula, presets and config
errors, and the decode_indices/decode round trip for every registered quantizer."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gsqbench.errors import UserError
from gsqbench.models.autoencoder import (
    PRESETS,
    AdaptiveGroupNorm,
    AutoencoderConfig,
    DepthToSpaceUpsample,
    depth_to_space_dcr,
    preset_config,
)
from gsqbench.models.tokenizer import Tokenizer, build_tokenizer, resolve_model_config
from gsqbench.registry import build_quantizer, discover_quantizers


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- 1. parameter and tensor counts (spec §3.5)

# (preset, D, G, V) -> (total params in M as printed in the spec, tensors incl. codebook)
SPEC_COUNTS = [
    ("f8", 64, 16, 8192, 71.43, 241),
    ("f16", 16, 8, 262144, 73.46, 281),
    ("f32", 128, 8, 262144, 108.89, 321),
]


def _meta_backbone(preset: str, D: int, quantizer: dict) -> Tokenizer:
    # encoder/decoder on the meta device: shapes only, no memory, no compute. The codebook (at most 4M floats)
    # is built on CPU: meta-device norms pull in torch._dynamo, seconds of import for nothing.
    q = build_quantizer(quantizer)
    with torch.device("meta"):
        return Tokenizer(preset_config(preset, D), q)


@pytest.mark.parametrize("preset,D,G,V,millions,tensors", SPEC_COUNTS)
def test_parameter_and_tensor_counts_match_spec(preset, D, G, V, millions, tensors):
    tok = _meta_backbone(preset, D, {"name": "gsq", "dim": D, "codebook_size": V, "groups": G})
    n = sum(p.numel() for p in tok.parameters())
    assert round(n / 1e6, 2) == millions
    assert len(tok.state_dict()) == tensors
    assert tok.quantizers.codebook.weight.shape == (V, D // G)
    assert tok.proj_in is None and tok.proj_out is None


def test_f8_encoder_decoder_split_matches_spec():
    tok = _meta_backbone("f8", 64, {"name": "gsq", "dim": 64, "codebook_size": 8192, "groups": 16})
    enc = sum(p.numel() for p in tok.encoder.parameters())
    dec = sum(p.numel() for p in tok.decoder.parameters())
    assert (round(enc / 1e6, 2), round(dec / 1e6, 2)) == (30.16, 41.24)
    assert len(tok.encoder.blocks) == 15 and len(tok.decoder.blocks) == 19


# ---------------------------------------------------------------- 3. depth-to-space and adaptive GroupNorm


def _d2s_loops(x: torch.Tensor) -> torch.Tensor:
    """out[c, 2h+i, 2w+j] = in[(2i+j)·C + c, h, w], written with explicit loops (spec §3.2)."""
    b, c4, H, W = x.shape
    C = c4 // 4
    out = torch.empty(b, C, 2 * H, 2 * W, dtype=x.dtype)
    for n in range(b):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    for i in range(2):
                        for j in range(2):
                            out[n, c, 2 * h + i, 2 * w + j] = x[n, (2 * i + j) * C + c, h, w]
    return out


def test_depth_to_space_is_dcr_not_pixel_shuffle():
    x = torch.randn(2, 12, 3, 4)
    ours = depth_to_space_dcr(x, 2)
    assert torch.equal(ours, _d2s_loops(x))
    assert not torch.equal(ours, F.pixel_shuffle(x, 2))  # the two orders really differ


def test_depth_to_space_module_uses_conv_then_dcr():
    torch.manual_seed(0)
    m = DepthToSpaceUpsample(32).double()
    x = torch.randn(1, 32, 3, 3, dtype=torch.float64)
    expected = _d2s_loops(F.conv2d(x, m.conv.weight, m.conv.bias, padding=1))
    assert m.conv.weight.shape == (128, 32, 3, 3)
    assert torch.allclose(m(x), expected, atol=1e-12)


def _adagn_formula(x, q, gw, gb, bw, bb, eps=1e-6):
    b, c, h, w = x.shape
    n = q.shape[2] * q.shape[3]
    mean = q.sum(dim=(2, 3)) / n
    var = ((q - mean[:, :, None, None]) ** 2).sum(dim=(2, 3)) / (n - 1)  # unbiased, N-1
    scale = torch.sqrt(var + eps) @ gw.T + gb
    shift = mean @ bw.T + bb
    xg = x.reshape(b, 32, -1)
    mu = xg.mean(-1, keepdim=True)
    v = ((xg - mu) ** 2).mean(-1, keepdim=True)  # GroupNorm itself uses the biased variance
    normed = ((xg - mu) / torch.sqrt(v + eps)).reshape(b, c, h, w)
    return scale[:, :, None, None] * normed + shift[:, :, None, None]


def test_adaptive_groupnorm_matches_formula_with_unbiased_variance():
    torch.manual_seed(1)
    m = AdaptiveGroupNorm(64, 6).double()
    x = torch.randn(2, 64, 5, 4, dtype=torch.float64) * 3 + 1
    q = torch.randn(2, 6, 3, 2, dtype=torch.float64)
    expected = _adagn_formula(x, q, m.gamma.weight, m.gamma.bias, m.beta.weight, m.beta.bias)
    assert torch.allclose(m(x, q), expected, atol=1e-12)
    # the biased variance gives a measurably different result, so the test can tell them apart
    q_biased_scale = torch.sqrt(q.flatten(2).var(-1, unbiased=False) + 1e-6) @ m.gamma.weight.T + m.gamma.bias
    q_unbiased_scale = torch.sqrt(q.flatten(2).var(-1) + 1e-6) @ m.gamma.weight.T + m.gamma.bias
    assert (q_biased_scale - q_unbiased_scale).abs().max() > 1e-3
    assert m.gn.eps == 1e-6 and not m.gn.affine


def test_decoder_refuses_single_position_latent_with_adaptive_norm():
    tok = build_tokenizer({"preset": "tiny-f8", "latent_dim": 8}, {"name": "gsq", "dim": 8, "codebook_size": 16})
    with pytest.raises(UserError, match="too small"):
        tok.decode(torch.randn(1, 8, 1, 1))


# ---------------------------------------------------------------- config and presets


def test_presets_follow_spec_and_tiny_widths_fit_groupnorm():
    assert PRESETS["f8"].channel_multipliers == (1, 2, 2, 4)
    assert PRESETS["f16"].channel_multipliers == (1, 1, 2, 2, 4)
    assert PRESETS["f32"].channel_multipliers == (1, 1, 2, 2, 4, 4)
    for name in ("f8", "f16", "f32"):
        cfg = PRESETS[name]
        n = len(cfg.channel_multipliers)
        assert cfg.hidden_channels == 128 and cfg.encoder_layer_configs == (2,) * (n + 1)
        assert cfg.decoder_layer_configs == (2,) * (n + 1)
        assert cfg.use_adaptive_norm and cfg.use_learnable_up_down_sample
    assert PRESETS["tiny-f4"].downsample_factor == 4 and PRESETS["tiny-f8"].downsample_factor == 8
    assert preset_config("f16", 16).embedding_dim == 16


def test_unknown_preset_and_bad_config_are_user_errors():
    with pytest.raises(UserError, match="did you mean 'tiny-f8'"):
        preset_config("tiny_f8", 8)
    with pytest.raises(UserError, match="not divisible by the 32 GroupNorm groups"):
        AutoencoderConfig(hidden_channels=48)
    with pytest.raises(UserError, match="encoder_layer_configs"):
        AutoencoderConfig(channel_multipliers=(1, 2), encoder_layer_configs=(1, 1))
    with pytest.raises(UserError, match="did you mean 'hidden_channels'"):
        resolve_model_config({"preset": "tiny-f4", "hiden_channels": 64})
    with pytest.raises(UserError, match="conflicts"):
        resolve_model_config({"latent_dim": 8, "embedding_dim": 4})


def test_overrides_and_latent_default_to_quantizer_dim():
    cfg = resolve_model_config({"preset": "tiny-f8", "channel_multipliers": [1, 2], "encoder_layer_configs": [1, 1, 1],
                                "decoder_layer_configs": [1, 1, 1]}, quantizer_dim=12)
    assert cfg.channel_multipliers == (1, 2) and cfg.embedding_dim == 12 and cfg.hidden_channels == 32
    assert dataclasses.replace(cfg).to_dict()["channel_multipliers"] == [1, 2]


def test_bad_image_shape_is_user_error():
    tok = build_tokenizer({"preset": "tiny-f4", "latent_dim": 8}, {"name": "gsq", "dim": 8, "codebook_size": 16})
    with pytest.raises(UserError, match="divisible by the downsampling factor 4"):
        tok.encode(torch.zeros(1, 3, 10, 12))


def test_official_init_scales():
    torch.manual_seed(0)
    tok = build_tokenizer({"preset": "f8", "latent_dim": 8, "hidden_channels": 32},
                          {"name": "gsq", "dim": 8, "codebook_size": 16})
    res = tok.encoder.blocks[3]  # a 32->64 transition block at this width
    fan_in = res.net[2].weight[0].numel()
    # kaiming-normal with linear gain: std 1/sqrt(fan_in), conv1 ×1.6761, conv2 ×1.6761×0.70711
    assert res.net[2].weight.std().item() == pytest.approx(1.6761 / fan_in ** 0.5, rel=0.05)
    fan2 = res.net[6].weight[0].numel()
    assert res.net[6].weight.std().item() == pytest.approx(1.6761 * 0.70711 / fan2 ** 0.5, rel=0.05)


# ---------------------------------------------------------------- 4. decode_indices == decode(z_q), all quantizers


def _registered():
    return discover_quantizers().names()


@pytest.mark.parametrize("name", _registered())
@pytest.mark.parametrize("latent", ["match", "project"])
def test_decode_indices_equals_decode_of_z_q(name, latent):
    cls = discover_quantizers().get(name)
    kwargs = cls.example_config() if hasattr(cls, "example_config") else {}
    torch.manual_seed(0)
    q = build_quantizer({"name": name, **kwargs})
    latent_dim = q.dim if latent == "match" else q.dim + 4
    tok = Tokenizer(preset_config("tiny-f4", latent_dim), q).eval()
    assert (tok.proj_in is None) == (latent == "match")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = tok.encode(x)
        assert out.indices.dtype == torch.int64 and out.indices.shape[:3] == (2, 4, 4)
        a = tok.decode_indices(out.indices)
        b = tok.decode(out.z_q)
        x_hat, out2 = tok(x)
    assert a.shape == (2, 3, 16, 16)
    assert torch.equal(a, b)
    assert torch.equal(x_hat, b) and torch.equal(out2.indices, out.indices)


@pytest.mark.parametrize("lookup", ["bf16", "exact"])
def test_gsq_decodes_the_same_from_z_q_and_indices_under_bf16_autocast(lookup):
    # the gsq-compat setting: encode, lookup and decode under bf16 autocast. The official code hands the decoder
    # the fp32 raw codebook rows (embedding output; ẑ + sg[q − ẑ] promotes to fp32), and so do we.
    torch.manual_seed(0)
    tok = build_tokenizer({"preset": "tiny-f4", "latent_dim": 8},
                          {"name": "gsq", "dim": 8, "codebook_size": 4096, "groups": 4, "lookup_precision": lookup})
    tok.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok.encode(x)
        raw = tok.quantizer.codebook.weight[out.indices]  # (b, h, w, G, d) fp32 rows
        assert out.z_q.dtype == torch.float32
        assert torch.equal(out.z_q, raw.reshape(2, 4, 4, 8).permute(0, 3, 1, 2))
        a = tok.decode(out.z_q)
        b = tok.decode_indices(out.indices)
        c = tok.decode(out.z_q.to(torch.bfloat16))  # what a bf16 z_q (the former behaviour) decodes to
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the decoder's input precision is visible, so the check can fail


def test_tokenizer_trains_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    tok = build_tokenizer({"preset": "tiny-f4", "latent_dim": 8}, {"name": "gsq", "dim": 8, "codebook_size": 16,
                                                                   "groups": 2})
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, out = tok(x)
        loss = F.mse_loss(x_hat.float(), x) + sum(out.losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert tok.encoder.conv_in.weight.grad is not None and tok.quantizer.codebook.weight.grad is not None
    adagn = next(b for b in tok.decoder.blocks if isinstance(b, AdaptiveGroupNorm))
    assert adagn.gamma.weight.grad is not None  # AdaGN conditioning is differentiable
