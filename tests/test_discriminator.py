"""Tests for gsqbench.models.discriminator and gsqbench.augment: the DINOv2 projected discriminator built from a
locally created FB-layout weight file (checked against timm's own converter and DINOv2's token formula), one D
step with the right gradients, PatchGAN's taming architecture, and DiffAugment's ops against their definitions."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from random_weights import random_dinov2_fb

from gsqbench import augment
from gsqbench import losses as L
from gsqbench.errors import UserError
from gsqbench.models import discriminator as D
from gsqbench.registry import build_discriminator

FB_FILENAME = "dinov2_vits14_reg4_pretrain.pth"


@pytest.fixture(scope="module")
def fb_weights(tmp_path_factory):
    """Random-init timm ViT-S/14-reg4 (518) written in the facebookresearch layout, as the hub file is."""
    fb = random_dinov2_fb(seed=0)
    assert fb["pos_embed"].shape == (1, 1370, 384)
    path = tmp_path_factory.mktemp("dino") / FB_FILENAME
    torch.save(fb, path)
    return path, fb


@pytest.fixture(scope="module")
def dino112(fb_weights):
    return D.DinoDiscriminator(img_size=112, weights=fb_weights[0], generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dino56(fb_weights):
    """4×4 patches (T = 16 + 5): the forward/backward tests stay cheap on two CPU cores."""
    return D.DinoDiscriminator(img_size=56, weights=fb_weights[0], generator=torch.Generator().manual_seed(1))


def _fb_prepare_tokens(fb: dict, x: torch.Tensor) -> torch.Tensor:
    """DINOv2 `prepare_tokens_with_masks` at the native 518 grid, written from the FB layout: (b, T, C)."""
    patches = F.conv2d(x, fb["patch_embed.proj.weight"], fb["patch_embed.proj.bias"], stride=14)
    patches = patches.flatten(2).transpose(1, 2)
    tokens = torch.cat([fb["cls_token"].expand(x.shape[0], -1, -1), patches], dim=1) + fb["pos_embed"]
    return torch.cat([tokens[:, :1], fb["register_tokens"].expand(x.shape[0], -1, -1), tokens[:, 1:]], dim=1)


def test_fb_layout_loads_at_518_and_tokens_follow_dinov2(fb_weights):
    path, fb = fb_weights
    disc = D.DinoDiscriminator(img_size=518, weights=path, diffaug=False, hooks=(0,))
    assert disc.num_tokens == 37 * 37 + 1 + 4
    x = torch.rand(1, 3, 518, 518)
    with torch.no_grad():
        tokens = disc.features(x)[0].transpose(1, 2)
        expected = _fb_prepare_tokens(fb, x)
    assert tokens.shape == expected.shape == (1, 1374, 384)
    assert torch.allclose(tokens, expected, atol=1e-5)
    # FB blocks land on timm blocks unchanged
    assert torch.equal(disc.backbone.state_dict()["blocks.7.attn.qkv.weight"], fb["blocks.7.attn.qkv.weight"])


def test_resampled_112_backbone_matches_timm_converter(fb_weights, dino112):
    from timm.models.vision_transformer import checkpoint_filter_fn

    _, fb = fb_weights
    expected = checkpoint_filter_fn({k: v.clone() for k, v in fb.items()}, dino112.backbone)
    ours = dino112.backbone.state_dict()
    assert set(expected) == set(ours)
    for key, value in expected.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key
    assert dino112.num_tokens == 8 * 8 + 5


def test_features_are_hooked_blocks_without_final_norm(dino56):
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        feats = dino56.features(x)
        inter = dino56.backbone.forward_intermediates(x, indices=[2, 5, 8, 11], norm=False, output_fmt="NLC",
                                                       return_prefix_tokens=True, intermediates_only=True)
    assert len(feats) == 5 and all(f.shape == (1, 384, 21) for f in feats)
    for ours, (spatial, prefix) in zip(feats[1:], inter):
        assert torch.allclose(ours, torch.cat([prefix, spatial], dim=1).transpose(1, 2), atol=1e-5)
    for a, b in zip(feats, feats[1:]):
        assert (a - b).abs().max() > 1e-2  # every hooked block changed the tokens (the check above can tell)


def test_preprocess_area_resize_crop_and_imagenet_norm(fb_weights, dino112):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    dino112.diffaug = False
    try:
        x = torch.rand(2, 3, 64, 64)
        expected = (F.interpolate(x, size=(112, 112), mode="area") - mean) / std
        assert torch.allclose(dino112._preprocess(x), expected, atol=1e-6)
        big = torch.rand(1, 3, 120, 120)  # wider than img_size: one random 112 crop (p_crop 1)
        out = dino112._preprocess(big)
        crops = [(big[..., t:t + 112, l:l + 112] - mean) / std for t in range(9) for l in range(9)]
        assert any(torch.allclose(out, c, atol=1e-6) for c in crops)
        dino112.p_crop = 0.0  # never crop: area-resize the whole image
        assert torch.allclose(dino112._preprocess(big), (F.interpolate(big, size=(112, 112), mode="area") - mean) / std,
                              atol=1e-6)
    finally:
        dino112.diffaug, dino112.p_crop = True, 1.0


def test_dino_one_discriminator_step(dino56):
    disc = dino56.train()
    assert not disc.backbone.training and disc.heads[0].main[0][1].training
    disc.requires_grad_(False)  # what a trainer does around the G step
    disc.requires_grad_(True)
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    real = torch.rand(2, 3, 64, 64)
    fake = torch.rand(2, 3, 64, 64, requires_grad=True)  # stands in for the generator's output
    real_logits, fake_logits = disc(real), disc(fake)
    assert real_logits.shape == fake_logits.shape == (2, 5 * 21)
    loss = L.discriminator_loss("hinge", real_logits, fake_logits)
    loss.backward()
    assert torch.isfinite(loss)
    t = 21
    for k, head in enumerate(disc.heads):
        for name, p in head.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (k, name)
            if name != "cls.bias":
                assert p.grad.abs().sum() > 0, (k, name)
        # closed form: ∂hinge/∂b_k = 0.5·(−#{real_k < 1}/numel + #{fake_k > −1}/numel) (the bias shifts T logits)
        r, f = real_logits[:, k * t:(k + 1) * t].detach(), fake_logits[:, k * t:(k + 1) * t].detach()
        expected = 0.5 * (-(r < 1).sum().item() / real_logits.numel() + (f > -1).sum().item() / fake_logits.numel())
        assert head.cls.bias.grad.item() == pytest.approx(expected, abs=1e-6), k
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert fake.grad is not None and fake.grad.abs().sum() > 0 and torch.isfinite(fake.grad).all()
    assert set(map(id, disc.trainable_parameters())) == set(map(id, disc.heads.parameters()))
    state = disc.state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)  # the frozen backbone is not checkpointed
    assert set(state) == {f"heads.{k}" for k in disc.heads.state_dict()}
    before = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    wrapped = torch.nn.ModuleDict({"d": disc})  # as inside a trainer / DDP (prefixed keys)
    saved = wrapped.state_dict()
    with torch.no_grad():
        disc.heads[0].cls.weight.add_(1.0)
    wrapped.load_state_dict(saved, strict=True)
    assert torch.equal(disc.heads[0].cls.weight, saved["d.heads.0.cls.weight"])
    assert all(torch.equal(v, before[k]) for k, v in disc.backbone.state_dict().items())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the recipe's precision
        assert torch.isfinite(disc(real[:1]).float()).all()


def test_dino_through_weight_manager_and_errors(fb_weights, tmp_path, monkeypatch, caplog, dino112):
    path, _ = fb_weights
    home = tmp_path / "home"
    monkeypatch.setenv("GSQBENCH_HOME", str(home))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    with pytest.raises(UserError) as err:
        build_discriminator("dino", {"img_size": 112})
    assert "dinov2-vits14-reg" in str(err.value) and "\n" not in str(err.value)
    random_disc = D.DinoDiscriminator(img_size=56, allow_random_backbone=True)  # opt-in smoke mode only
    assert random_disc.backbone_source == "random"
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    (home / "weights").mkdir(parents=True)
    (home / "weights" / FB_FILENAME).write_bytes(path.read_bytes())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("GSQBENCH_WEIGHTS_MANIFEST",
                       json.dumps({"dinov2-vits14-reg": {"filename": FB_FILENAME, "sha256": sha}}))
    disc = build_discriminator("dino", {"img_size": 112})
    assert disc.backbone_source.endswith(FB_FILENAME)
    assert torch.equal(disc.backbone.state_dict()["pos_embed"], dino112.backbone.state_dict()["pos_embed"])
    with pytest.raises(UserError, match="did you mean 'dino'"):
        build_discriminator("dinno", {})
    with pytest.raises(UserError, match="patchgan"):
        build_discriminator("patchgan", {"filters": 3})
    with pytest.raises(UserError, match="img_size"):
        D.DinoDiscriminator(img_size=100, weights=path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"no torch here")
    with pytest.raises(UserError, match="junk.pth"):
        D.load_dinov2_backbone(dino112.backbone, junk)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(UserError, match="list.pth"):
        D.load_dinov2_backbone(dino112.backbone, notdict)


def test_patchgan_architecture_and_one_step():
    torch.manual_seed(0)
    disc = D.PatchGANDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 64, (4, 4), (2, 2)), (64, 128, (4, 4), (2, 2)), (128, 256, (4, 4), (2, 2)),
        (256, 512, (4, 4), (1, 1)), (512, 1, (4, 4), (1, 1))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 3
    assert all(m.negative_slope == 0.2 for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU))
    assert convs[-1].weight.std().item() == pytest.approx(0.002, rel=0.2)  # N(0, 0.02) × 0.1
    real = torch.rand(2, 3, 64, 64)
    fake = torch.rand(2, 3, 64, 64, requires_grad=True)
    real_logits, fake_logits = disc(real), disc(fake)
    assert real_logits.shape == (2, 1, 6, 6)  # 64 → 32 → 16 → 8 → 7 → 6
    L.discriminator_loss("hinge", real_logits, fake_logits).backward()
    grads = {n: p.grad for n, p in disc.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("weight"))
    # all logits lie in (-1, 1) at init, where hinge's bias gradient is 0.5·(−1 + 1) = 0 exactly
    assert real_logits.abs().max() < 1 and fake_logits.abs().max() < 1 and grads["main.11.bias"].abs().item() < 1e-6
    assert fake.grad is not None and fake.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- DiffAugment
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_color_ops_follow_their_definitions():
    x = torch.rand(4, 3, 8, 8)
    shift = augment.brightness(x, _gen(0)) - x  # one constant per sample in [-0.5, 0.5]
    per = shift.flatten(1)
    assert torch.allclose(per, per[:, :1].expand_as(per), atol=1e-6) and per.abs().max() <= 0.5
    grey = x[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(augment.saturation(grey, _gen(1)), grey, atol=1e-6)  # grey pixels have no saturation
    sat = augment.saturation(x, _gen(1))
    assert torch.allclose(sat.mean(1), x.mean(1), atol=1e-6)  # the per-pixel grey level is kept
    con = augment.contrast(x, _gen(2))
    assert torch.allclose(con.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    factor = (con - x.mean((1, 2, 3), keepdim=True)) / (x - x.mean((1, 2, 3), keepdim=True))
    f = factor.flatten(1)
    assert ((f.median(1).values >= 0.5) & (f.median(1).values <= 1.5)).all()


def test_translation_is_a_zero_filled_integer_shift():
    b, s = 16, 16
    x = (torch.arange(b * s * s, dtype=torch.float32).view(b, 1, s, s) + 1).expand(-1, 3, -1, -1).contiguous()
    out = augment.translation(x, _gen(3))
    max_shift = int(s * 0.125 + 0.5)
    shifts = set()
    for i in range(b):
        o = out[i, 0]
        nz = o.nonzero()
        src = (o[o > 0].long() - 1) - i * s * s  # original flat position of each surviving pixel
        dy = (src // s - nz[:, 0]).unique()
        dx = (src % s - nz[:, 1]).unique()
        assert len(dy) == 1 and len(dx) == 1  # one rigid shift per image
        assert abs(int(dy)) <= max_shift and abs(int(dx)) <= max_shift
        assert (o == 0).sum() == s * s - (s - abs(int(dy))) * (s - abs(int(dx)))  # vacated pixels are zero
        assert torch.equal(out[i, 1], o) and torch.equal(out[i, 2], o)
        shifts.add((int(dy), int(dx)))
    assert len(shifts) > 1


def test_cutout_zeroes_one_clipped_square():
    b, s = 16, 20
    x = torch.rand(b, 3, s, s) + 1.0  # no natural zeros
    out = augment.cutout(x, _gen(4))
    side = int(s * 0.2 + 0.5)
    for i in range(b):
        zero = (out[i] == 0).all(0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < len(rows) <= side and 0 < len(cols) <= side
        assert zero.sum() == len(rows) * len(cols)  # a (clipped) rectangle
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
        assert (len(rows) == side or rows.min() == 0 or rows.max() == s - 1)
        assert torch.equal(out[i][:, ~zero], x[i][:, ~zero])


def test_diff_augment_seeded_independent_and_differentiable():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    a = augment.diff_augment(x, generator=_gen(5))
    b = augment.diff_augment(x, generator=_gen(5))
    assert torch.equal(a, b)
    g = _gen(6)
    assert not torch.equal(augment.diff_augment(x, generator=g), augment.diff_augment(x, generator=g))
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(UserError, match="did you mean 'cutout'"):
        augment.diff_augment(x, "color,cutuot")
    assert torch.equal(augment.diff_augment(x, ""), x)
