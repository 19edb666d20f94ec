"""`gsq-compat` PSNR / SSIM / LPIPS computed as the official GSQ evaluation computes them (issue 12, Must show 6).

The oracle restates the official evaluation from its code (flex_gen `evaluation/eval_tokenizer.py`,
`flex_gen/utils/metrics/metrics.py`; gsq-reference.md §6) without gsqbench's metric code:
- inputs: timm ToTensor + Normalize(0.5, 0.5) (torchvision), the model under bf16 autocast, `clamp(-1, 1)`, then
  flex_gen's `rescale_image_tensor` (`img * std + mean` with std/mean cast to the image's dtype) and the
  per-metric `clamp(0, 1)`;
- metrics: torchmetrics itself (1.9.0, the `dev` extra; what the official code imports), each update run under
  the autocast the official wrapper opens on its CUDA device: bf16 for PSNR/LPIPS, fp32 for SSIM. This machine
  has no GPU and CPU autocast refuses fp32, so `CudaAutocastPolicy` below applies CUDA autocast's casting rules
  (the op lists of ATen `autocast_mode.cpp`, AutocastCUDA) to the ops these metrics call, and fails on any op it
  does not know;
- SSIM border: `reflect-full` is torchmetrics 1.9.0's own value (≥ 1.4.2 averages the whole map); `valid` is the
  ≤ 1.4.1 value: v1.4.1 → v1.4.2 changed only the line that cropped `pad` pixels from the same full map before
  the per-image mean (torchmetrics commit efdb111, PR #2721), so the 1.9.0 full map (`return_full_image=True`)
  cropped by 5 px gives it;
- a second, numpy restatement of the official SSIM arithmetic (explicit bf16 rounding, float64 filtering) that
  shares no code with torch's conv or torchmetrics, and float64 closed forms for PSNR.
Photos: the bundled sample photos at 256 with the 292→256 `gsq` crop. Tokenizers: a stand-in whose bf16-autocast
decoder gives realistic blurred reconstructions, and a random-init tiny GSQ tokenizer (the real model code path).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import signal
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn
from torch.overrides import TorchFunctionMode

from gsqbench.data import build_dataset
from gsqbench.errors import UserError
from gsqbench.evaluate import EvalSettings, evaluate
from gsqbench.quantizer import QuantizerOutput
from torchmetrics.functional.image.ssim import _ssim_check_inputs, _ssim_update  # the dev extra pins 1.9.0
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-6  # issue 12 Must show 6


# ---------------------------------------------------------------------------------------------------------------
# CUDA autocast's casting rules, applied on CPU


class CudaAutocastPolicy(TorchFunctionMode):
    """What these metrics' ops compute on a CUDA device under `torch.autocast("cuda", dtype)`, on any device.

    Two CUDA rules are restated (the official runs were on CUDA; a CPU behaves differently on both):
    - autocast, from ATen autocast_mode.cpp (AutocastCUDA): `lower_precision_fp` ops cast floating inputs to the
      autocast dtype (conv*, matmul, mm, linear, ...); `fp32` ops cast them to float32 (exp, pow, log, ...);
      `fp32_set_opt_dtype` ops run with dtype=float32 unless one is given (sum, softmax, ...); float64 is never
      cast. CPU autocast has other lists and refuses dtype=float32 altogether.
    - a Python scalar in a bf16/fp16 op: CUDA kernels compute in fp32 (opmath) with the scalar in fp32 and round
      the result once; a scalar divisor becomes a multiply by its fp32 reciprocal (BinaryDivTrueKernel.cu). CPU
      kernels round the scalar to the tensor's dtype first (C2 = 9e-4 in SSIM's contrast terms, for one).
    Every other op runs unchanged; an op missing from `UNCHANGED` fails the test, so a torchmetrics change cannot
    slip past the restatement.
    """

    LOWER = {"conv1d", "conv2d", "conv3d", "matmul", "mm", "bmm", "linear", "addmm", "baddbmm", "einsum"}
    FP32 = {"exp", "pow", "__pow__", "__rpow__", "log", "log10", "log2", "rsqrt", "reciprocal"}
    SET_OPT_DTYPE = {"sum", "softmax", "log_softmax", "cumsum", "prod"}
    SCALAR_OPS = {"__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "add", "sub",
                  "mul", "div"}
    UNCHANGED = {"__neg__", "__getitem__", "__iadd__", "__format__", "__bool__", "__le__", "__ge__", "__len__",
                 "__rtruediv__", "neg", "clamp", "pad", "cat", "split", "reshape", "view", "expand", "unsqueeze",
                 "squeeze", "t", "to", "arange", "mean", "sqrt", "relu", "relu_", "max_pool2d", "dropout", "max",
                 "min", "size", "dim", "numel", "shape", "dtype", "device", "is_floating_point", "ndim", "flatten",
                 "tensor", "float", "item", "__get__", "__set__", "contiguous", "_has_compatible_shallow_copy_type",
                 "clone", "detach", "all", "any", "eq", "__eq__", "__ne__", "isfinite", "abs", "add_",
                 "__deepcopy__", "_set_grad_enabled", "ge", "le", "gt", "lt"}
    REDUCED = (torch.bfloat16, torch.float16)

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.unknown: set[str] = set()

    @staticmethod
    def _cast(value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in (torch.float64, dtype):
            return value.to(dtype)
        return value

    def _scalar_op(self, func, name, args):
        """A bf16/fp16 tensor with a Python scalar: CUDA's fp32 opmath, one rounding (None when not that case)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        scalars = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if len(args) != 2 or len(tensors) != 1 or len(scalars) != 1 or tensors[0].dtype not in self.REDUCED:
            return None
        t, s = tensors[0], scalars[0]
        if name in ("__truediv__", "div") and args[1] is s:
            return (t.float() * torch.tensor(1.0, dtype=torch.float32).div(s)).to(t.dtype)
        return func(*[t.float() if a is t else a for a in args]).to(t.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", None) or getattr(getattr(func, "fget", None), "__name__", str(func))
        if name in self.LOWER:
            args = torch.utils._pytree.tree_map(lambda v: self._cast(v, self.dtype), args)
        elif name in self.FP32:
            args = torch.utils._pytree.tree_map(lambda v: self._cast(v, torch.float32), args)
        elif name in self.SET_OPT_DTYPE:
            first = args[0]
            if first.is_floating_point() and first.dtype != torch.float64 and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
        elif name in self.SCALAR_OPS and not kwargs:
            out = self._scalar_op(func, name, args)
            if out is not None:
                return out
        elif name not in self.UNCHANGED:
            self.unknown.add(name)
        return func(*args, **kwargs)


def _known(policy: CudaAutocastPolicy) -> None:
    assert not policy.unknown, f"ops outside the restated CUDA autocast policy: {sorted(policy.unknown)}"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers in bf16 autocast


class _Levels(nn.Module):
    """16 uniform levels per channel; the bf16 lookup rounds z to bf16 first (as the official lookup would)."""

    dim, groups, codebook_size = 3, 3, 16

    def __init__(self) -> None:
        super().__init__()
        self.lookup_precision = "exact"

    def forward(self, z):
        zz = z.to(torch.bfloat16).float() if self.lookup_precision == "bf16" else z.float()
        idx = torch.round((zz.clamp(-1, 1) + 1) * 7.5).long()
        return QuantizerOutput(idx.float() / 7.5 - 1, idx.permute(0, 2, 3, 1).contiguous())


class BlurTokenizer(nn.Module):
    """avg-pool 4 → 16 levels → nearest ×4 → a fixed 3×3 binomial conv: realistic blocky-blurred reconstructions
    whose decoder output is bf16 under autocast (the conv runs in the autocast dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.quantizer = _Levels()
        self.smooth = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False, padding_mode="replicate")
        binomial = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        with torch.no_grad():
            self.smooth.weight.copy_(binomial.expand(3, 1, 3, 3))

    def encode(self, x):
        return self.quantizer(F.avg_pool2d(x, 4))

    def decode(self, z_q):
        return self.smooth(F.interpolate(z_q, scale_factor=4, mode="nearest"))


def _gsq_tokenizer() -> nn.Module:
    from gsqbench.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer({"preset": "tiny-f8", "latent_dim": 8},
                           {"name": "gsq", "dim": 8, "codebook_size": 64, "groups": 4}).eval()


@pytest.fixture(scope="module")
def photos():
    """The bundled sample photos, 292→256 `gsq` crop: (ids, uint8 (n, 3, 256, 256))."""
    ds = build_dataset("sample-photos", resolution=256, crop="gsq")
    return ds, [ds[i][0] for i in range(len(ds))], torch.stack([ds[i][1] for i in range(len(ds))])


# ---------------------------------------------------------------------------------------------------------------
# The official evaluation, restated (module docstring)


def _official_pair(tok: nn.Module, u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flex_gen's (real, fake) as its Metrics hands them to torchmetrics (after the per-metric clamp(0, 1))."""
    x = TF.normalize(u8.float() / 255, [0.5] * 3, [0.5] * 3)  # timm eval: ToTensor + Normalize(0.5, 0.5)
    old = tok.quantizer.lookup_precision
    tok.quantizer.lookup_precision = "bf16"  # the official lookup runs under the same autocast
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # accelerator.autocast()
            recon = tok.decode(tok.encode(x).z_q)
    finally:
        tok.quantizer.lookup_precision = old
    assert recon.dtype == torch.bfloat16
    real, fake = x.clamp(-1, 1), recon.clamp(-1, 1)

    def rescale(img):  # flex_gen.utils.utils.rescale_image_tensor(img, 0.5, 0.5)
        mean = torch.tensor([0.5] * 3).view(3, 1, 1).type_as(img).unsqueeze(0)
        std = torch.tensor([0.5] * 3).view(3, 1, 1).type_as(img).unsqueeze(0)
        return img * std + mean

    return torch.clamp(rescale(real), 0, 1), torch.clamp(rescale(fake), 0, 1)


def _official_psnr(real, fake) -> float:
    metric = PeakSignalNoiseRatio(data_range=1.0)
    with torch.no_grad(), CudaAutocastPolicy(torch.bfloat16) as policy:
        metric.update(fake, real)  # update_foo(fake, real)
    _known(policy)
    return float(metric.compute())


def _official_ssim(real, fake) -> dict[str, np.ndarray]:
    """Per-image SSIM under both torchmetrics border behaviours, computed under the official fp32 autocast."""
    with torch.no_grad(), CudaAutocastPolicy(torch.float32) as policy:
        metric = StructuralSimilarityIndexMeasure(data_range=1.0)
        metric.update(fake, real)
        preds, target = _ssim_check_inputs(fake, real)
        per_image, full_map = _ssim_update(preds, target, data_range=1.0, return_full_image=True)
    _known(policy)
    assert float(metric.compute()) == pytest.approx(float(per_image.double().mean()), rel=1e-6)  # same 1.9.0 path
    valid = full_map[..., 5:-5, 5:-5]  # torchmetrics <= 1.4.1: `ssim_idx_full_image[..., pad:-pad, pad:-pad]`
    return {"reflect-full": per_image.double().numpy(),
            "valid": valid.reshape(valid.shape[0], -1).mean(-1).double().numpy()}


def _bf16(values) -> np.ndarray:
    """Round to bfloat16 (nearest, ties to even) after float32, as torch stores a bf16 result; float64 out."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _numpy_official_ssim(real: np.ndarray, fake: np.ndarray, border: str) -> np.ndarray:
    """The official CUDA SSIM arithmetic in numpy: bf16 roundings made explicit, the fp32 window, filtering in
    float64 (FFT). SSIM is sensitive to the window's sum (a relative error δ moves σ² by about −δ·μ², against
    C2 = 9e-4), so the window is the official fp32 one, not the exact Gaussian."""
    p, t = _bf16(fake), _bf16(real)  # fake is bf16 already; torchmetrics casts the target to it
    scaled = _bf16(np.arange(-5, 6) / 1.5).astype(np.float32)  # offsets in bf16, i/sigma rounded to bf16
    taps = np.exp(-(scaled * scaled) / np.float32(2))  # fp32 (CUDA autocast: pow, exp and sum in fp32)
    taps = taps / taps.sum(dtype=np.float32)
    window = np.outer(taps, taps).astype(np.float64)  # the fp32 outer product: its sum is not exactly 1
    maps = [p, t, _bf16(p * p), _bf16(t * t), _bf16(p * t)]  # products rounded in bf16
    pad = ((0, 0), (0, 0), (5, 5), (5, 5))
    out = []
    for m in maps:
        m = np.pad(m, pad, mode="reflect")  # numpy 'reflect' = torch 'reflect' (edge not repeated)
        out.append(signal.fftconvolve(m, window[None, None, ::-1, ::-1], mode="valid", axes=(2, 3)))
    mu_p, mu_t, e_pp, e_tt, e_pt = out
    var_p, var_t = np.maximum(e_pp - mu_p**2, 0), np.maximum(e_tt - mu_t**2, 0)
    cov = e_pt - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    upper = _bf16(2 * _bf16(cov) + np.float32(c2))
    lower = _bf16(_bf16(var_p + var_t) + np.float32(c2))
    s = ((2 * mu_p * mu_t + c1) * upper) / ((mu_p**2 + mu_t**2 + c1) * lower)
    if border == "valid":
        s = s[:, :, 5:-5, 5:-5]
    return s.reshape(s.shape[0], -1).mean(axis=1)


def _by_name(result):
    return {m.name: m for m in result.metrics}


def _compat(tok, ds, border=None, batch_size=5):
    settings = EvalSettings(mode="gsq-compat", metrics=("psnr", "ssim"), ssim_border=border, batch_size=batch_size,
                            samples=0, progress=False)
    return evaluate(tok, ds, settings, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Must show 6


def test_compat_psnr_ssim_match_the_official_evaluation_on_photos(photos):
    ds, ids, u8 = photos
    tok = BlurTokenizer().eval()
    real, fake = _official_pair(tok, u8)
    assert real.dtype == torch.float32 and fake.dtype == torch.bfloat16  # what flex_gen's metrics receive
    official_ssim = _official_ssim(real, fake)
    official_psnr = _official_psnr(real, fake)
    # float64 closed form of the pooled PSNR on the same floats (torchmetrics sums in fp32)
    mse = float(np.mean((fake.double().numpy() - real.double().numpy()) ** 2))
    assert official_psnr == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)

    order = np.argsort(ids)
    for border in ("valid", "reflect-full"):
        res = _compat(tok, ds, border)
        got = _by_name(res)
        assert got["psnr_pooled"].value == pytest.approx(official_psnr, rel=REL)
        want = official_ssim[border]
        assert got["ssim"].value == pytest.approx(float(want.mean()), rel=REL)
        assert res.per_image["ssim"] == pytest.approx(want[order].tolist(), rel=REL)
        numpy_ssim = _numpy_official_ssim(real.numpy(), fake.float().numpy(), border)
        # fp32 window sums (and the fp32 window itself) move this SSIM by ~1e-5: the numpy restatement sums in float64
        assert got["ssim"].value == pytest.approx(float(numpy_ssim.mean()), rel=5e-5)
        psnr_i = [10 * math.log10(1 / float(np.mean((fake[j].double().numpy() - real[j].double().numpy()) ** 2)))
                  for j in order]
        assert res.per_image["psnr"] == pytest.approx(psnr_i, rel=1e-9)
        card = res.card
        assert card["ssim"]["ssim_border"] == border and card["ssim"]["ssim_data_range"] == 1.0
        assert card["ssim"]["ssim_dtype"] == "official-mixed-bf16" and "bf16" in card["ssim"]["ssim_inputs"]
        assert ("1.4.1" if border == "valid" else "1.4.2") in card["ssim"]["ssim_border_reference"]
        assert card["psnr"]["psnr_data_range"] == 1.0 and "fake bf16" in card["psnr"]["psnr_inputs"]
        assert card["conversion"]["metric_inputs"].startswith("PSNR/SSIM/LPIPS: official float")
    # the two borders are different protocols: different values, different card hashes
    assert np.abs(official_ssim["valid"] - official_ssim["reflect-full"]).max() > 1e-3
    assert _compat(tok, ds, "valid").card_hash != res.card_hash


def test_compat_metrics_match_the_official_evaluation_for_a_gsq_tokenizer(photos):
    """The real model path: a random-init tiny GSQ tokenizer in bf16 autocast (official bf16 lookup, fp32 z_q)."""
    ds, ids, u8 = photos
    ds = build_dataset("sample-photos", resolution=256, crop="gsq", n=2)
    tok = _gsq_tokenizer()
    real, fake = _official_pair(tok, u8[:2])
    got = _by_name(_compat(tok, ds, batch_size=2))
    assert got["psnr_pooled"].value == pytest.approx(_official_psnr(real, fake), rel=REL)
    assert got["ssim"].value == pytest.approx(float(_official_ssim(real, fake)["valid"].mean()), rel=REL)


def test_gsqbench_mode_psnr_ssim_unchanged(photos):
    """gsqbench mode still computes PSNR/SSIM on the round-half-even uint8 pair (skimage oracle) with its old card."""
    ds, ids, u8 = photos
    tok = BlurTokenizer().eval()
    res = evaluate(tok, ds, EvalSettings(metrics=("psnr", "ssim"), samples=0, progress=False), device="cpu")
    with torch.no_grad():
        x_hat = tok.decode(tok.encode(u8.float() / 127.5 - 1).z_q).numpy()
    fake = np.round((np.clip(x_hat, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    order = np.argsort(ids)
    real_hwc, fake_hwc = u8.numpy().transpose(0, 2, 3, 1)[order], fake.transpose(0, 2, 3, 1)[order]
    psnr = [peak_signal_noise_ratio(r, f, data_range=255) for r, f in zip(real_hwc, fake_hwc)]
    ssim = [structural_similarity(r, f, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, K1=0.01, K2=0.03) for r, f in zip(real_hwc, fake_hwc)]
    assert res.per_image["psnr"] == pytest.approx(psnr, rel=1e-12)
    assert res.per_image["ssim"] == pytest.approx(ssim, abs=1e-6)
    assert res.card["ssim"] == {"ssim_window": "gaussian-11", "ssim_sigma": 1.5, "ssim_truncate": 3.5,
                                "ssim_k1": 0.01, "ssim_k2": 0.03, "ssim_data_range": 255,
                                "ssim_covariance": "population", "ssim_border": "valid", "ssim_dtype": "float64",
                                "ssim_channels": "per-RGB-channel, mean", "ssim_aggregation": "mean-per-image"}
    assert res.card["psnr"] == {"psnr_aggregations": ["mean-per-image", "pooled"], "psnr_data_range": 255,
                                "psnr_color_space": "RGB", "psnr_cap_db": 100.0, "psnr_capped_images": 0}
    assert res.card["conversion"]["metric_inputs"] == "uint8"


def test_official_float_input_only_exists_in_compat_mode(photos):
    from gsqbench.metrics.pixel import PSNRMetric

    ds = build_dataset("sample-photos", resolution=32, crop="gsq", n=1)
    with pytest.raises(UserError, match="official-float exists in gsq-compat only"):
        evaluate(BlurTokenizer().eval(), ds, EvalSettings(metrics=("psnr",), progress=False), device="cpu",
                 metrics=[PSNRMetric(inputs="official-float")])
    with pytest.raises(UserError, match="ssim_border"):
        EvalSettings(ssim_border="full")


# ---------------------------------------------------------------------------------------------------------------
# LPIPS


def test_compat_lpips_is_torchmetrics_lpips_on_the_official_floats(photos, random_alexnet):
    """Official LPIPS: torchmetrics' AlexNet LPIPS on clamp(2x − 1) of the float pair, under bf16 autocast."""
    from torchmetrics.functional.image.lpips import _LPIPS, _lpips_update

    ds, ids, u8 = photos
    tok = BlurTokenizer().eval()
    settings = EvalSettings(mode="gsq-compat", metrics=("lpips",), lpips_nets=("alex",), samples=0, progress=False)
    res = evaluate(tok, ds, settings, device="cpu")
    net = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()  # the v0.1 heads ship in the wheel
    for slice_module in net.net.children():  # slices keep torchvision's layer index as the child name
        for index, layer in slice_module.named_children():
            for name, param in layer.named_parameters(recurse=False):
                param.data.copy_(random_alexnet[f"features.{index}.{name}"])
    real, fake = _official_pair(tok, u8)
    with torch.no_grad(), CudaAutocastPolicy(torch.bfloat16) as policy:
        want = _lpips_update(torch.clamp(2 * real - 1, -1, 1), torch.clamp(2 * fake - 1, -1, 1), net, False)
    _known(policy)
    assert want.dtype == torch.bfloat16  # the official per-image LPIPS values are bf16
    order = np.argsort(ids)
    # per-image values are bf16 (8 significant bits): one rounding step apart at most between autocast devices
    got, ref = np.array(res.per_image["lpips@alex"]), want.double().numpy()[order]
    # per-image values are bf16 (8 significant bits): our CPU autocast and CUDA's (pow/sum of the feature
    # normalisation in fp32) may end one rounding step apart; most values are identical bf16 numbers, which an
    # fp32 computation (the gsqbench path) would practically never produce
    ulp = 2.0 ** (np.floor(np.log2(ref)) - 7)
    assert np.all(np.abs(got - ref) <= ulp) and np.sum(got == ref) >= 3, (got, ref)
    assert _by_name(res)["lpips@alex"].value == pytest.approx(float(want.double().mean()), rel=5e-3)
    card = res.card["lpips"]
    assert "fake bf16" in card["lpips_alex_inputs"] and card["lpips_alex_dtype"].startswith("bf16 autocast")
