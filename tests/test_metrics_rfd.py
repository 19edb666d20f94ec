"""`rfd@dinov2` (FD on DINOv2 ViT-L/14 features, Stein et al. 2023 / dgm-eval) against independent oracles.

Oracles: a closed form on constructed features (exact means and diagonal covariances, FD = ‖μ1 − μ2‖² +
Σ(√a − √b)²); numpy/scipy (np.cov, scipy.linalg.sqrtm) on the same features; torchvision's own transforms
(dgm-eval's literal `Resize((224, 224), BICUBIC)` on PIL, `ToTensor`, `Normalize`) for the preprocessing; and a
restatement of facebookresearch/dinov2's forward (`prepare_tokens_with_masks` with `interpolate_pos_encoding`,
`Block`, `Attention`, final norm, `x_norm_clstoken`) written here with plain tensor ops, not timm.

The official network is ViT-L/14 (a 1.2 GB file): its shape is checked on the meta device against timm's
`vit_large_patch14_dinov2` and FB's `vit_large` key layout, while the numerical checks run the same loading and
feature code on a 2-block, 24-d DINOv2 of random weights saved in FB layout under the official file name.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from gsqbench.errors import UserError
from gsqbench.metrics.base import Facts
from gsqbench.metrics.frechet import frechet_distance
from gsqbench.metrics.rfd_dinov2 import (
    VITL14, DinoArch, DinoFDMetric, build_dinov2, dgm_eval_preprocess, fb_to_timm, timm_vit,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DinoArch("test-tiny", embed_dim=24, depth=2, heads=2)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------------------------------------------------------
# Independent restatements


def _fb_random_state(arch: DinoArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random DINOv2 state dict in facebookresearch's layout (518² position table, mask_token, ls*.gamma)."""
    g = torch.Generator().manual_seed(seed)
    d, hidden = arch.embed_dim, int(arch.embed_dim * arch.mlp_ratio)

    def rnd(*shape, std=0.05, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    state = {"cls_token": rnd(1, 1, d, std=1.0), "pos_embed": rnd(1, 1 + 37 * 37, d, std=0.5),
             "mask_token": rnd(1, d), "patch_embed.proj.weight": rnd(d, 3, 14, 14),
             "patch_embed.proj.bias": rnd(d, std=0.02)}
    for i in range(arch.depth):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": rnd(d, std=0.1, mean=1.0), p + "norm1.bias": rnd(d, std=0.02),
            p + "attn.qkv.weight": rnd(3 * d, d, std=0.2), p + "attn.qkv.bias": rnd(3 * d, std=0.02),
            p + "attn.proj.weight": rnd(d, d, std=0.2), p + "attn.proj.bias": rnd(d, std=0.02),
            p + "ls1.gamma": rnd(d, std=0.1, mean=0.5),
            p + "norm2.weight": rnd(d, std=0.1, mean=1.0), p + "norm2.bias": rnd(d, std=0.02),
            p + "mlp.fc1.weight": rnd(hidden, d, std=0.2), p + "mlp.fc1.bias": rnd(hidden, std=0.02),
            p + "mlp.fc2.weight": rnd(d, hidden, std=0.1), p + "mlp.fc2.bias": rnd(d, std=0.02),
            p + "ls2.gamma": rnd(d, std=0.1, mean=0.5),
        })
    state.update({"norm.weight": rnd(d, std=0.1, mean=1.0), "norm.bias": rnd(d, std=0.02)})
    return state


def _fb_forward(state: dict[str, torch.Tensor], arch: DinoArch, x: torch.Tensor, offset: float = 0.1) -> torch.Tensor:
    """facebookresearch/dinov2 DinoVisionTransformer.forward (eval, no masks, no registers) → x_norm_clstoken."""
    b, _, h, w = x.shape
    d, heads = arch.embed_dim, arch.heads
    tok = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    tok = tok.flatten(2).transpose(1, 2)
    tok = torch.cat([state["cls_token"].expand(b, -1, -1), tok], dim=1)
    pos = state["pos_embed"].float()
    m = int(math.sqrt(pos.shape[1] - 1))
    w0, h0 = h // 14, w // 14
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                              scale_factor=((w0 + offset) / m, (h0 + offset) / m))
    pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    t = tok + pos
    for i in range(arch.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (d,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        qkv = (y @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, d) @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        t = t + y * state[p + "ls1.gamma"]
        y = F.layer_norm(t, (d,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        y = y @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        t = t + y * state[p + "ls2.gamma"]
    return F.layer_norm(t, (d,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


def _torchvision_preprocess(images_u8: torch.Tensor) -> torch.Tensor:
    """dgm-eval's DINOv2Encoder.transform, verbatim in torchvision terms, per PIL image."""
    import torchvision.transforms as TF
    from PIL import Image

    tf = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor()])
    return torch.stack([TF.Normalize(MEAN, STD)(tf(Image.fromarray(im.permute(1, 2, 0).numpy())))
                        for im in images_u8])


def _numpy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g) * 255
    smooth = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + torch.randn(n, 3, size, size, generator=g) * 20).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Tests


class _IndexedFeatures(torch.nn.Module):
    """Stub extractor: image i carries its row index in pixel (0, 0, 0); returns feats[i] (the metric math test)."""

    def __init__(self, feats: np.ndarray):
        super().__init__()
        self.feats = torch.from_numpy(feats)

    def forward(self, x):
        return self.feats[x[:, 0, 0, 0].long()]


def _exact_moments(rng, n: int, d: int, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """n rows whose sample mean is `mean` and sample covariance (ddof 1) is diag(var), exactly up to rounding."""
    z = rng.normal(size=(n, d))
    z -= z.mean(0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, each orthogonal to the ones vector (z was centred)
    return mean + q * math.sqrt(n - 1) * np.sqrt(var)


def _fd_metric(feats_real, feats_fake, tmp_path, batches=((0, 3), (3, 4), (4, 20))):
    dim = feats_real.shape[1]
    weights = tmp_path / "dinov2_vitl14_pretrain.pth"  # hashed into the reference key, never loaded here
    weights.write_bytes(b"stand-in")
    both = np.concatenate([feats_real, feats_fake])
    metric = DinoFDMetric(weights_path=weights, arch=DinoArch("stub", dim, 1, 1), extractor=_IndexedFeatures(both))
    n = len(feats_real)
    real = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    fake = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    real[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    fake[:, 0, 0, 0] = torch.arange(n, 2 * n, dtype=torch.uint8)
    for lo, hi in batches:
        metric.update(real[lo:hi], fake[lo:hi], [f"im{i:02d}" for i in range(lo, hi)])
    metric.sync()
    (row,) = metric.compute()
    return metric, row


def test_fd_closed_form_and_numpy_on_constructed_features(tmp_path):
    rng = np.random.default_rng(0)
    d, n = 8, 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    real, fake = _exact_moments(rng, n, d, mu1, a), _exact_moments(rng, n, d, mu2, b)
    np.testing.assert_allclose(np.cov(real, rowvar=False), np.diag(a), atol=1e-12)  # the construction holds
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    _, row = _fd_metric(real, fake, tmp_path)
    assert row.name == "rfd@dinov2" and row.direction == "lower" and row.n == n and row.unavailable is None
    assert row.value == pytest.approx(closed, rel=1e-10)  # measured ~1e-15
    assert row.value == pytest.approx(_numpy_fd(real, fake), rel=1e-9)
    assert closed > 1.0


def test_dinov2_features_match_fb_forward_and_dgm_eval_preprocessing(tmp_path):
    state = _fb_random_state(TINY)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"  # the official file name, random weights in FB layout
    torch.save(state, path)
    extractor = build_dinov2(path, "cpu", TINY)
    images = _images(12, 40, seed=1)

    ours_x = dgm_eval_preprocess(images)
    ref_x = _torchvision_preprocess(images)
    assert ours_x.dtype == torch.float32 and torch.equal(ours_x, ref_x.float())  # bit-identical transform

    with torch.no_grad():
        ours = extractor(images)
        ref = _fb_forward(state, TINY, ref_x.float())
        plain = _fb_forward(state, TINY, ref_x.float(), offset=0.0)  # a plain 16/37 resize of the table
    assert ours.shape == (12, TINY.embed_dim)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 2e-5 * scale  # measured ~1e-6: timm's fused attention vs the restatement
    assert (plain - ref).abs().max() > 1e-3 * scale  # the FB offset changes features: this test sees it


def test_fd_end_to_end_equals_numpy_on_the_same_features(tmp_path):
    state = _fb_random_state(TINY, seed=3)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    extractor = build_dinov2(path, "cpu", TINY)
    real, fake = _images(30, 32, seed=4), _images(30, 32, seed=5)  # N = 30 > d = 24: full-rank covariances
    metric = DinoFDMetric(weights_path=path, arch=TINY, extractor=extractor)
    ids = [f"x{i:02d}" for i in range(30)]
    for lo, hi in ((0, 7), (7, 30)):
        metric.update(real[lo:hi], fake[lo:hi], ids[lo:hi])
    metric.sync()
    (row,) = metric.compute()
    with torch.no_grad():
        f_real, f_fake = extractor(real).double().numpy(), extractor(fake).double().numpy()
        o_real = _fb_forward(state, TINY, _torchvision_preprocess(real).float()).double().numpy()
        o_fake = _fb_forward(state, TINY, _torchvision_preprocess(fake).float()).double().numpy()
    assert row.value == pytest.approx(_numpy_fd(f_real, f_fake), rel=1e-8)  # same features, scipy sqrtm
    assert row.value == pytest.approx(_numpy_fd(o_real, o_fake), rel=1e-4)  # the independent forward
    assert row.value > 0.01


def test_vitl14_shape_matches_timm_and_fb_layout():
    import timm

    ours = timm_vit(VITL14)
    with torch.device("meta"):
        theirs = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert shapes["pos_embed"] == (1, 257, 1024) and ours.num_features == 1024 and ours.global_pool == "token"
    # FB vit_large (dinov2/models/vision_transformer.py): 24 blocks, 1024-d, MLP 4096, 518² table + class
    fb = {"cls_token": (1, 1, 1024), "pos_embed": (1, 1370, 1024), "mask_token": (1, 1024),
          "patch_embed.proj.weight": (1024, 3, 14, 14), "patch_embed.proj.bias": (1024,),
          "norm.weight": (1024,), "norm.bias": (1024,)}
    for i in range(24):
        fb.update({f"blocks.{i}.{k}": s for k, s in (
            ("norm1.weight", (1024,)), ("norm1.bias", (1024,)), ("attn.qkv.weight", (3072, 1024)),
            ("attn.qkv.bias", (3072,)), ("attn.proj.weight", (1024, 1024)), ("attn.proj.bias", (1024,)),
            ("ls1.gamma", (1024,)), ("norm2.weight", (1024,)), ("norm2.bias", (1024,)),
            ("mlp.fc1.weight", (4096, 1024)), ("mlp.fc1.bias", (4096,)), ("mlp.fc2.weight", (1024, 4096)),
            ("mlp.fc2.bias", (1024,)), ("ls2.gamma", (1024,)))})
    state = {k: torch.zeros(s) if k == "pos_embed" else torch.empty(s, device="meta") for k, s in fb.items()}
    mapped = fb_to_timm(state, grid=16)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == shapes  # every FB tensor lands, nothing missing
    with pytest.raises(UserError, match="register tokens"):
        fb_to_timm({**state, "register_tokens": torch.zeros(1, 4, 1024)}, grid=16)


def test_reference_cache_shared_code_path_and_measurability(tmp_path):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(20, 8)), rng.normal(0.3, 1.0, size=(20, 8))
    ref = {"dataset": "synthetic", "split": "eval", "crop": "gsq", "n": 20, "ids_hash": "i", "originals_hash": "o"}
    weights = tmp_path / "dinov2_vitl14_pretrain.pth"
    weights.write_bytes(b"stand-in")
    stub = _IndexedFeatures(np.concatenate([real, fake]))
    arch = DinoArch("stub", 8, 1, 1)

    def run():
        m = DinoFDMetric(weights_path=weights, arch=arch, extractor=stub, reference=ref, cache_dir=tmp_path / "c")
        r = torch.zeros(20, 3, 2, 2, dtype=torch.uint8)
        r[:, 0, 0, 0] = torch.arange(20, dtype=torch.uint8)
        f = r.clone()
        f[:, 0, 0, 0] += 20
        m.update(r, f, [f"i{k:02d}" for k in range(20)])
        m.sync()
        return m, m.compute()[0].value

    first, v1 = run()
    (cache,) = (tmp_path / "c").glob("fd-dinov2-ref-*.npz")
    assert not first.uses_cached_reference and first.reference.key["feature"].startswith("class token")
    second, v2 = run()
    assert second.uses_cached_reference and int(second.real.n) == 0 and v2 == pytest.approx(v1, rel=1e-12)
    assert second.card()["rfd_reference_source"].startswith("cache:")
    assert v1 == pytest.approx(frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0),
                                                np.cov(fake, rowvar=False)), rel=1e-9)
    # streaming state (for a resumed evaluation): half the batches, state_dict → a fresh metric, the rest
    r = torch.zeros(20, 3, 2, 2, dtype=torch.uint8)
    r[:, 0, 0, 0] = torch.arange(20, dtype=torch.uint8)
    f = r.clone()
    f[:, 0, 0, 0] += 20
    ids = [f"i{k:02d}" for k in range(20)]
    half = DinoFDMetric(weights_path=weights, arch=arch, extractor=stub)
    half.update(r[:9], f[:9], ids[:9])
    resumed = DinoFDMetric(weights_path=weights, arch=arch, extractor=stub)
    resumed.load_state_dict(half.state_dict())
    resumed.update(r[9:], f[9:], ids[9:])
    resumed.sync()
    assert resumed.compute()[0].value == pytest.approx(v1, rel=1e-12)
    assert DinoFDMetric.comparable("rfd@dinov2", Facts(n_images=1024)) is not None
    assert "1025" in DinoFDMetric.comparable("rfd@dinov2", Facts(n_images=50))
    assert DinoFDMetric.comparable("rfd@dinov2", Facts(n_images=1025)) is None


def test_missing_weights_unavailable_required_listed_and_reported(tmp_path, monkeypatch, capsys):
    """Without the file: `weights list` shows the entry, eval reports every opt-in metric unavailable with the fix
    command (metrics.csv, the report's all-metrics table), and `--require rfd@dinov2` exits 2 with one line."""
    from gsqbench.checkpoints import save_tokenizer
    from gsqbench.cli import main
    from gsqbench.models.tokenizer import build_tokenizer
    from gsqbench.results import read_csv_rows

    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    assert main(["weights", "list"]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("dinov2-vitl14 ")]
    assert listed and "missing" in listed[0] and "dinov2_vitl14_pretrain.pth" in listed[0]

    torch.manual_seed(0)
    model, quantizer = {"preset": "tiny-f8", "latent_dim": 8}, {"name": "gsq", "dim": 8, "codebook_size": 16}
    ckpt = save_tokenizer(tmp_path / "ckpt", build_tokenizer(model, quantizer), model, quantizer, {"weights": "raw"})
    out = tmp_path / "results" / "eval" / "run"
    args = ["eval", str(ckpt), "--data", "synthetic", "--resolution", "32", "--n", "3", "--samples", "0",
            "--no-progress", "--metrics", "pixel", "--metrics", "rfd", "--metrics", "kid", "--metrics", "prc"]
    assert main([*args, "--out", str(out)]) == 0
    rows = {r["metric"]: r for r in read_csv_rows(out / "metrics.csv")}
    fixes = {"rfd@dinov2": "dinov2-vitl14", "kid@inception": "inception-fid", "precision@vgg16": "vgg16",
             "recall@vgg16": "vgg16"}
    for key, name in fixes.items():
        assert f"gsqbench weights download {name}" in rows[key]["unavailable"], key
    assert rows["rfd@dinov2"]["direction"] == "lower" and rows["recall@vgg16"]["direction"] == "higher"
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "req"), "--require", "rfd@dinov2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rfd@dinov2" in err[0] and "gsqbench weights download dinov2-vitl14" in err[0]

    assert main(["report", str(tmp_path / "results"), "-o", str(tmp_path / "report")]) == 0
    html = "\n".join(p.read_text() for p in (tmp_path / "report").rglob("*.html"))
    for key, name in fixes.items():
        assert key in html and f"gsqbench weights download {name}" in html, key
