"""The streaming evaluation pass: conversions, batch-size independence, samples, codes, card, missing weights.

Oracles: closed forms (256-level identity; the official drop of levels 1–63), numpy's round-half-even, skimage
PSNR/SSIM on independently recomputed reconstructions, numpy bincount of independently computed codes, the lpips
package run directly. The model is a stand-in defined here whose output is exactly per-image (pooling, scalar
rounding, nearest upsampling), so any batch-size dependence seen comes from the evaluation code, not from conv
kernels.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from gsqbench.errors import UserError
from gsqbench.evaluate import (EvalSettings, compat_model_input, compat_real_uint8, evaluate, to_model_input,
                               to_uint8)
from gsqbench.quantizer import QuantizerOutput

LEVELS = 8  # scalar codebook per channel


class ScalarQuantizer(nn.Module):
    """Each of 3 channels is one group; 8 uniform levels in [-1, 1]; bf16 lookup rounds z to bf16 first."""

    dim, groups, codebook_size = 3, 3, LEVELS

    def __init__(self):
        super().__init__()
        self.lookup_precision = "exact"
        self.scale = nn.Parameter(torch.ones(1))  # so the quantizer has parameters to count

    def forward(self, z):
        zz = z.to(torch.bfloat16).float() if self.lookup_precision == "bf16" else z.float()
        idx = torch.round((zz.clamp(-1, 1) + 1) * (LEVELS - 1) / 2).long()  # (b, 3, h, w)
        return QuantizerOutput(self.indices_to_codes(idx.permute(0, 2, 3, 1)), idx.permute(0, 2, 3, 1).contiguous())

    def indices_to_codes(self, indices):
        return (indices.permute(0, 3, 1, 2).float() * 2 / (LEVELS - 1) - 1) * self.scale


class StandInTokenizer(nn.Module):
    """avg-pool 4 → scalar quantizer → nearest ×4 → a smooth map that overshoots [-1, 1] (exercises the clamp)."""

    def __init__(self):
        super().__init__()
        self.quantizer = ScalarQuantizer()

    def encode(self, x):
        return self.quantizer(F.avg_pool2d(x, 4))

    def decode(self, z_q):
        return 1.05 * torch.tanh(1.5 * F.interpolate(z_q, scale_factor=4, mode="nearest"))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, ids: list[str]):
        self.images, self.ids = images, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], torch.from_numpy(self.images[i])


def _images(n: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random images plus noise: (n, 3, size, size) uint8."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(n, 3, 4, 4))
    smooth = np.kron(base, np.ones((size // 4, size // 4)))
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def _oracle_recon(tok: StandInTokenizer, u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reconstructions converted with numpy (np.round is half-to-even) and the codes, independent of gsqbench."""
    x = torch.from_numpy(u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    with torch.no_grad():
        q = tok.encode(x)
        x_hat = tok.decode(q.z_q).numpy().astype(np.float32)
    fake = np.round((np.clip(x_hat, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    return fake, q.indices.numpy()


def _by_name(result):
    return {m.name: m for m in result.metrics}


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Conversion (§1)


def test_all_256_levels_round_trip_exactly():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(to_model_input(levels)), levels)
    # the float value itself may be off by an ulp; rounding must still land on the level
    nudged = to_model_input(levels) + torch.tensor(1e-6)
    assert torch.equal(to_uint8(nudged), levels)


def test_round_half_even_rule():
    # numpy float32 arithmetic as the oracle; np.round is half-to-even. x = 0 is the one exact tie (127.5 → 128).
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 10_000), [0.0, -1.0, 1.0, -3.0, 3.0]]).astype(np.float32)
    expected = np.round((np.clip(x, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    assert torch.equal(to_uint8(torch.from_numpy(x)), torch.from_numpy(expected))
    assert to_uint8(torch.zeros(1)).item() == 128


def test_gsq_compat_reproduces_official_level_drop():
    import torchvision.transforms.functional as TF

    levels = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([np.tile(levels, (4, 1))] * 3, axis=-1))  # (4, 256, 3)
    official_in = TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3)  # timm eval: ToTensor + Normalize
    official_u8 = ((official_in.clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1) * 255).type(torch.uint8)  # flex_gen rule
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
    ours_in = compat_model_input(u8)
    assert torch.equal(ours_in[0], official_in)
    ours = compat_real_uint8(ours_in)[0, 0, 0]
    assert torch.equal(ours, official_u8[0, 0])
    closed_form = torch.tensor([v - 1 if 1 <= v <= 63 else v for v in range(256)], dtype=torch.uint8)
    assert torch.equal(ours, closed_form)  # exactly levels 1–63 lose one level (63 of 256)


# ---------------------------------------------------------------------------------------------------------------
# The pass


def test_batch_size_independence_and_oracles(random_alexnet, tmp_path):
    import lpips

    u8 = _images()
    ids = [f"img{i}" for i in (3, 0, 4, 1, 2)]  # dataset order differs from sorted order
    ds = ListDataset(u8, ids)
    tok = StandInTokenizer().eval()
    runs = {}
    for bs in (1, 5):
        settings = EvalSettings(batch_size=bs, samples=2, lpips_nets=("alex",), metrics=("pixel", "lpips",
                                "codebook", "cost"), progress=False)
        runs[bs] = evaluate(tok, ds, settings, device="cpu", out_dir=tmp_path / f"bs{bs}")
    a, b = _by_name(runs[1]), _by_name(runs[5])
    for key in ("psnr", "psnr_pooled", "ssim", "usage_pooled"):
        assert a[key].value == b[key].value, key
    assert a["lpips@alex"].value == pytest.approx(b["lpips@alex"].value, rel=1e-6, abs=1e-7)
    assert runs[1].per_image["image_id"] == sorted(ids) == runs[5].per_image["image_id"]
    assert runs[1].per_image["psnr"] == runs[5].per_image["psnr"]
    assert np.array_equal(runs[1].code_counts, runs[5].code_counts)
    assert runs[1].card_hash == runs[5].card_hash  # batch size is run-specific, not protocol

    # oracles on independently recomputed reconstructions
    fake, codes = _oracle_recon(tok, u8)
    order = np.argsort(ids)
    real_hwc, fake_hwc = u8.transpose(0, 2, 3, 1)[order], fake.transpose(0, 2, 3, 1)[order]
    psnr = [peak_signal_noise_ratio(r, f, data_range=255) for r, f in zip(real_hwc, fake_hwc)]
    ssim = [structural_similarity(r, f, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, K1=0.01, K2=0.03) for r, f in zip(real_hwc, fake_hwc)]
    assert runs[5].per_image["psnr"] == pytest.approx(psnr, rel=1e-12)
    assert a["psnr"].value == pytest.approx(np.mean(psnr), rel=1e-12)
    pooled = 10 * math.log10(255**2 / np.mean((u8.astype(np.float64) - fake) ** 2))
    assert a["psnr_pooled"].value == pytest.approx(pooled, rel=1e-12)
    assert runs[5].per_image["ssim"] == pytest.approx(ssim, abs=1e-6)
    ref = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    _load_lpips_trunk(ref, random_alexnet)
    with torch.no_grad():
        want = ref(torch.from_numpy(u8[order]).float() / 127.5 - 1, torch.from_numpy(fake[order]).float() / 127.5 - 1)
    assert runs[5].per_image["lpips@alex"] == pytest.approx(want.reshape(-1).tolist(), rel=1e-5, abs=1e-6)
    counts = np.stack([np.bincount(codes[..., g].ravel(), minlength=LEVELS) for g in range(3)])
    assert np.array_equal(runs[5].code_counts, counts)

    # samples: the exact evaluated uint8, first k of the dataset order, bit-exact after a PNG round trip
    for j, image_id in enumerate(ids[:2]):
        real_png = np.array(Image.open(tmp_path / "bs5" / "samples" / "real" / f"{image_id}.png"))
        recon_png = np.array(Image.open(tmp_path / "bs5" / "samples" / "recon" / f"{image_id}.png"))
        assert np.array_equal(real_png, u8[j].transpose(1, 2, 0))
        assert np.array_equal(recon_png, fake[j].transpose(1, 2, 0))
    assert not (tmp_path / "bs5" / "samples" / "real" / f"{ids[2]}.png").exists()

    # rate: G·log2 V bits per token, (32/4)² tokens, 24·H·W / bits
    assert a["bits_per_token"].value == 3 * math.log2(LEVELS)
    assert a["bits_per_image"].value == 64 * 3 * math.log2(LEVELS)
    assert a["compression_ratio"].value == pytest.approx(24 * 32 * 32 / (64 * 9))
    assert a["params"].value == 1 and a["params_quantizer"].value == 1
    assert a["encode_images_per_s"].value > 0 and a["peak_memory_mb"].value > 0
    card = runs[5].card
    assert card["weights_conformant"] is False  # random trunk from a manifest override
    assert card["data"]["N"] == 5 and card["conversion"]["uint8_rule"] == "round-half-even"


def _load_lpips_trunk(model, trunk):
    """lpips slices keep torchvision's layer index as the child name: copy features.<i>.* into them."""
    for slice_module in model.net.children():
        for index, layer in slice_module.named_children():
            for pname, param in layer.named_parameters(recurse=False):
                param.data.copy_(trunk[f"features.{index}.{pname}"])
    return model.eval()


def test_code_agreement_matches_independent_count():
    u8 = _images(n=3, size=16, seed=1)
    ds = ListDataset(u8, ["a", "b", "c"])
    tok = StandInTokenizer().eval()
    exact = evaluate(tok, ds, EvalSettings(metrics=("codebook",), progress=False), device="cpu")
    assert "code_agreement" not in _by_name(exact)  # an exact-lookup run has nothing to agree with
    assert exact.card["model"]["lookup"] == "exact"
    res = evaluate(tok, ds, EvalSettings(metrics=("codebook",), lookup="bf16", progress=False), device="cpu")
    assert res.card["model"]["lookup"] == "bf16" and res.card_hash != exact.card_hash  # its own card
    x = torch.from_numpy(u8.astype(np.float32) / np.float32(127.5) - 1)
    z = F.avg_pool2d(x, 4)
    fp32 = torch.round((z.clamp(-1, 1) + 1) * 3.5)
    bf16 = torch.round((z.to(torch.bfloat16).float().clamp(-1, 1) + 1) * 3.5)
    want = float((fp32 == bf16).double().mean())
    assert _by_name(res)["code_agreement"].value == pytest.approx(want, abs=1e-12)
    assert tok.quantizer.lookup_precision == "exact"  # restored


def test_gsq_compat_mode_uses_bf16_and_truncation():
    u8 = _images(n=2, size=16, seed=2)
    tok = StandInTokenizer().eval()
    res = evaluate(tok, ListDataset(u8, ["a", "b"]), EvalSettings(mode="gsq-compat", metrics=("pixel",),
                   progress=False), device="cpu")
    ref = evaluate(tok, ListDataset(u8, ["a", "b"]), EvalSettings(metrics=("pixel",), progress=False), device="cpu")
    assert res.card["mode"] == "gsq-compat" and res.card["conversion"]["uint8_rule"] == "trunc-compat"
    assert res.card["precision"]["model"] == "bf16"
    assert res.card_hash != ref.card_hash


def test_missing_weights_unavailable_or_required(no_weights):
    u8 = _images(n=2, size=16)
    ds = ListDataset(u8, ["a", "b"])
    tok = StandInTokenizer().eval()
    res = evaluate(tok, ds, EvalSettings(metrics=("lpips", "pixel"), lpips_nets=("alex",), progress=False),
                   device="cpu")
    row = _by_name(res)["lpips@alex"]
    assert math.isnan(row.value) and "gsqbench weights download alexnet" in row.unavailable
    assert "lpips@alex" not in res.per_image
    with pytest.raises(UserError, match="gsqbench weights download inception-fid") as info:
        evaluate(tok, ds, EvalSettings(require=("rfid@inception",), progress=False), device="cpu")
    assert "\n" not in str(info.value)


def test_bad_settings_and_train_mode_refused():
    with pytest.raises(UserError, match="did you mean 'rfid@inception'"):
        EvalSettings(require=("rfid@inceptoin",))
    with pytest.raises(UserError, match="batch_size"):
        EvalSettings(batch_size=0)
    with pytest.raises(AssertionError, match="eval mode"):
        evaluate(StandInTokenizer().train(), ListDataset(_images(1, 16), ["a"]), EvalSettings(progress=False),
                 device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# `gsqbench eval` end to end (real tiny tokenizer checkpoint, synthetic data, no weights installed)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from gsqbench.checkpoints import save_tokenizer
    from gsqbench.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = {"preset": "tiny-f8", "latent_dim": 8}
    quantizer = {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}
    tok = build_tokenizer(model, quantizer)
    return save_tokenizer(tmp_path / "ckpt", tok, model, quantizer, {"weights": "raw", "step": 3})


def test_eval_cli_without_weights(no_weights, tiny_checkpoint, tmp_path, capsys):
    from gsqbench.cli import main
    from gsqbench.results import read_csv_rows, read_run_info

    out = tmp_path / "run"
    args = ["eval", str(tiny_checkpoint), "--data", "synthetic", "--resolution", "32", "--n", "3",
            "--batch-size", "2", "--samples", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "psnr" in printed and "unavailable" in printed
    rows = {r["metric"]: r for r in read_csv_rows(out / "metrics.csv")}
    assert "gsqbench weights download alexnet" in rows["lpips@alex"]["unavailable"]
    assert "gsqbench weights download inception-fid" in rows["rfid@inception"]["unavailable"]
    assert float(rows["bits_per_token"]["value"]) == 2 * 4  # G·log2 V = 2·log2 16
    assert not rows["psnr"]["unavailable"] and 0 < float(rows["usage_pooled"]["value"]) <= 1
    info = read_run_info(out)
    assert info["card"]["model"]["weights"] == "raw" and info["card"]["data"]["N"] == 3
    assert (out / "per_image.csv").exists() and (out / "codes.npz").exists()
    assert len(list((out / "samples" / "recon").glob("*.png"))) == 1

    assert main(args + ["--require", "rfid@inception"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rfid@inception" in err[0] and "gsqbench weights download inception-fid" in err[0]


def test_fid_reference_key_fields_match_the_card(no_weights, tmp_path):
    """Before the pass the key comes from the id list alone (no image read, originals hash pending); after it,
    from what was evaluated, equal to the card's fields."""
    from gsqbench.card import id_list_hash
    from gsqbench.evaluate import _reference_fields

    u8 = _images(n=3, size=16)
    ds = ListDataset(u8, ["c", "a", "b"])
    settings = EvalSettings(metrics=("pixel", "fid"), fid_cache_dir=str(tmp_path / "fidcache"), progress=False)
    before = _reference_fields(ds, settings)
    assert before["n"] == 3 and before["ids_hash"] == id_list_hash(["a", "b", "c"])
    assert before["originals_hash"] is None and before["real_conversion"] == "round-half-even"
    res = evaluate(StandInTokenizer().eval(), ds, settings, device="cpu")
    after = _reference_fields(ds, settings, ["a", "b", "c"], res.card["data"]["originals_hash"])
    assert {k: v for k, v in after.items() if k != "originals_hash"} == {k: v for k, v in before.items()
                                                                         if k != "originals_hash"}
    assert after["ids_hash"] == res.card["data"]["image_id_list_hash"]
    # originals hash oracle: sha256 over the per-image sha256(id \0 pixel bytes), in id order
    digests = [hashlib.sha256(i.encode() + b"\0" + u8[j].tobytes()).hexdigest() for j, i in sorted(
        enumerate(["c", "a", "b"]), key=lambda p: p[1])]
    assert res.card["data"]["originals_hash"] == hashlib.sha256("".join(digests).encode()).hexdigest()
    assert math.isnan(_by_name(res)["rfid@inception"].value)  # no weights: unavailable, run still completes
    compat = EvalSettings(mode="gsq-compat", metrics=("fid",), fid_cache_dir=str(tmp_path), progress=False)
    assert _reference_fields(ds, compat)["real_conversion"] != before["real_conversion"]


def test_duplicate_image_ids_are_a_user_error():
    ds = ListDataset(_images(n=2, size=16), ["same", "same"])
    with pytest.raises(UserError, match="'same'"):
        evaluate(StandInTokenizer().eval(), ds, EvalSettings(metrics=("codebook",), progress=False), device="cpu")
