"""PSNR and SSIM against scikit-image and closed forms (metrics-protocol.md §3, §4, §13 #1–#5, #9, #19).

Oracles: `skimage.metrics.peak_signal_noise_ratio(..., data_range=255)` and `structural_similarity` with the pinned
Gaussian settings on photos bundled with scikit-image (no pooch); closed forms for constant offsets and pooled
sets; an independent numpy/scipy SSIM (scipy.ndimage 'mirror' filtering = torch 'reflect') for the full-map variant.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gsqbench.errors import UserError
from gsqbench.metrics import pixel
from gsqbench.metrics.pixel import PSNRMetric, SSIMMetric, psnr_per_image, ssim_per_image

SIZE = 64


def _crops() -> list[np.ndarray]:
    """Real photos (HWC uint8), cropped for speed: face, texture, fur, plus an odd-sized non-square crop."""
    a, c, ch = skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()
    return [a[60 : 60 + SIZE, 180 : 180 + SIZE], c[150 : 150 + SIZE, 200 : 200 + SIZE],
            ch[80 : 80 + SIZE, 150 : 150 + SIZE], a[300 : 300 + SIZE, 40 : 40 + SIZE]]


def _distort(img: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = img.astype(np.float64)
    if kind == "noise":
        x = x + rng.normal(0, 12, x.shape)
    elif kind == "blur":
        x = ndi.gaussian_filter(x, sigma=(1.2, 1.2, 0))
    elif kind == "jpeg-like":  # 8×8 block means plus mild noise: blocking artefacts like heavy JPEG
        h, w = x.shape[:2]
        blocks = x[: h // 8 * 8, : w // 8 * 8].reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
        x = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1) + rng.normal(0, 2, (h // 8 * 8, w // 8 * 8, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    kinds = ("noise", "blur", "jpeg-like", "noise")
    return [(img, _distort(img, k, seed=i)) for i, (img, k) in enumerate(zip(_crops(), kinds))]


def _t(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, K1=0.01, K2=0.03)


def _ssim_full_map_oracle(a: np.ndarray, b: np.ndarray) -> float:
    """Independent SSIM with mirror padding (torchmetrics ≥ 1.4.2's torch 'reflect'), averaged over the full map."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for ch in range(3):
        x, y = a[..., ch], b[..., ch]
        f = lambda m: ndi.gaussian_filter(m, sigma=1.5, truncate=3.5, mode="mirror")  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        per_channel.append(s.mean())
    return float(np.mean(per_channel))


def test_psnr_and_ssim_match_skimage_on_photos():
    pairs = _pairs()
    real, fake = _t([p[0] for p in pairs]), _t([p[1] for p in pairs])
    psnr = psnr_per_image(real, fake)
    ssim64 = ssim_per_image(real, fake)
    ssim32 = ssim_per_image(real, fake, dtype=torch.float32)
    for i, (a, b) in enumerate(pairs):
        assert psnr[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
        expected = _sk_ssim(a, b)
        assert abs(ssim64[i].item() - expected) < 1e-9
        assert abs(ssim32[i].item() - expected) < 1e-5
    assert len({round(v, 3) for v in ssim64.tolist()}) == len(pairs)  # distortions really differ


def test_conv2d_and_shifted_add_filters_agree():
    """The CUDA path (depthwise conv2d) and the CPU path (shifted adds) compute the same separable filter."""
    maps = torch.rand(1, 5, 24, 21, dtype=torch.float64)
    taps = pixel.gaussian_taps()
    assert taps.numel() == 11
    a = pixel._filter_valid(maps, taps, use_conv=True)
    b = pixel._filter_valid(maps, taps, use_conv=False)
    assert a.shape == (1, 5, 14, 11)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ssim_reflect_full_matches_independent_oracle_and_differs_from_valid():
    pairs = _pairs()[:2]
    real, fake = _t([p[0] for p in pairs]), _t([p[1] for p in pairs])
    full = ssim_per_image(real, fake, border="reflect-full")
    valid = ssim_per_image(real, fake, border="valid")
    for i, (a, b) in enumerate(pairs):
        assert abs(full[i].item() - _ssim_full_map_oracle(a, b)) < 1e-9
        assert abs(full[i].item() - valid[i].item()) > 1e-4  # the §4 card field matters


def test_symmetry_identity_and_range():
    a, b = _pairs()[0]
    real, fake = _t([a]), _t([b])
    assert ssim_per_image(real, fake).item() == pytest.approx(ssim_per_image(fake, real).item(), abs=1e-12)
    assert psnr_per_image(real, fake).item() == psnr_per_image(fake, real).item()
    assert ssim_per_image(real, real).item() == pytest.approx(1.0, abs=1e-12)
    assert psnr_per_image(real, real).item() == pixel.PSNR_CAP_DB
    inverted = ssim_per_image(real, 255 - real).item()  # anti-correlated: negative, never scaled by 100
    assert -1.0 <= inverted < 0.0


@pytest.mark.parametrize("delta", [1, 3, 10])
def test_psnr_constant_offset_closed_form(delta):
    img = torch.from_numpy(_crops()[0]).permute(2, 0, 1)[None].clamp(0, 255 - delta)
    assert psnr_per_image(img, img + delta).item() == pytest.approx(20 * math.log10(255 / delta), abs=1e-10)


def test_pooled_and_per_image_psnr_closed_forms():
    """Peer bug #9: per-image mean and pooled differ; both are reported under distinct keys."""
    img = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    fake = img.clone()
    fake[0] += 1  # MSE 1
    fake[1] += 10  # MSE 100
    m = PSNRMetric()
    m.update(img, fake, ["a", "b"])
    m.sync()
    values = {v.name: v.value for v in m.compute()}
    per_image = [20 * math.log10(255 / 1), 20 * math.log10(255 / 10)]
    assert values["psnr"] == pytest.approx(sum(per_image) / 2, abs=1e-10)
    assert values["psnr_pooled"] == pytest.approx(10 * math.log10(255**2 / 50.5), abs=1e-10)
    assert values["psnr"] > values["psnr_pooled"] + 5  # Jensen
    directions = {v.name: v.direction for v in m.compute()}
    assert directions == {"psnr": "higher", "psnr_pooled": "higher"}


def test_batch_with_one_distorted_image_gives_per_image_closed_forms():
    """Peer bug #2: a batch-level value must not leak into per-image values."""
    img = torch.from_numpy(_crops()[1]).permute(2, 0, 1)[None].repeat(4, 1, 1, 1).clamp(0, 250)
    fake = img.clone()
    fake[2] += 5
    m = PSNRMetric()
    m.update(img, fake, ["p0", "p1", "p2", "p3"])
    m.sync()
    assert m.per_image()["psnr"] == pytest.approx([100.0, 100.0, 20 * math.log10(255 / 5), 100.0], abs=1e-10)
    assert m.capped_images() == 3
    assert m.card()["psnr_capped_images"] == 3


@pytest.mark.parametrize("metric_cls", [PSNRMetric, SSIMMetric])
def test_batch_size_independence_and_id_order(metric_cls):
    pairs = _pairs()
    real, fake = _t([p[0] for p in pairs]), _t([p[1] for p in pairs])
    ids = ["d", "a", "c", "b"]
    whole, single = metric_cls(), metric_cls()
    whole.update(real, fake, ids)
    for i in range(len(ids)):
        single.update(real[i : i + 1], fake[i : i + 1], ids[i : i + 1])
    for m in (whole, single):
        m.sync()
    assert whole.image_ids() == single.image_ids() == sorted(ids)
    (key,) = whole.per_image()
    assert whole.per_image()[key] == pytest.approx(single.per_image()[key], abs=1e-12)
    for a, b in zip(whole.compute(), single.compute()):
        assert a.value == pytest.approx(b.value, abs=1e-12) and a.n == b.n == 4


def test_float_inputs_need_explicit_range():
    """Peer bugs #1/#19: floats without data_range are refused; the right range reproduces the uint8 value."""
    a, b = _pairs()[2]
    real, fake = _t([a]), _t([b])
    with pytest.raises(UserError, match="data_range"):
        ssim_per_image(real.double() / 255, fake.double() / 255)
    right = ssim_per_image(real.double() / 255, fake.double() / 255, data_range=1.0).item()
    wrong = ssim_per_image(real.double() / 255, fake.double() / 255, data_range=2.0).item()
    assert right == pytest.approx(_sk_ssim(a, b), abs=1e-9)
    assert wrong > right + 1e-3  # LlamaGen's inflated SSIM
    with pytest.raises(UserError, match="uint8"):
        SSIMMetric().update(real.float(), fake.float(), ["x"])


def test_bad_options_refused():
    real = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(UserError, match="bf16|never"):
        ssim_per_image(real, real, dtype=torch.bfloat16)
    with pytest.raises(UserError, match="ssim_border"):
        SSIMMetric(border="full")
    with pytest.raises(UserError, match="window"):
        ssim_per_image(real[..., :8, :8], real[..., :8, :8])
    with pytest.raises(UserError, match="shape"):
        psnr_per_image(real, real[..., :8])
    with pytest.raises(UserError, match="evaluated twice"):
        m = PSNRMetric()
        m.update(real, real, ["x"])
        m.update(real, real, ["x"])
        m.sync()
