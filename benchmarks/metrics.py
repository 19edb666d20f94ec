"""Metric speed: our batched SSIM against scikit-image, and the whole evaluation pass against its bare parts.

1. SSIM (Wang et al. 2004 with the protocol's settings: Gaussian σ = 1.5, K1 = 0.01, K2 = 0.03, population
   covariance, data range 255; metrics-protocol.md) — `gsqbench.metrics.pixel.ssim_per_image` on a batch of
   256² uint8 pairs vs `skimage.metrics.structural_similarity` image by image; values must agree to 1e-4.
2. `gsqbench.evaluate.evaluate` (one streaming pass, all metric families) vs the sum of its bare parts on the
   same batches: tokenizer forward, torch-fidelity Inception forward on real and reconstructed images, LPIPS
   forward. The difference is the harness overhead (conversions, per-image bookkeeping, PSNR/SSIM, codes, I/O).
   Installed weights are used when present; otherwise random-init stand-ins with the official layouts are
   registered through the weights manifest override in a temporary home (same cost, meaningless values;
   benchmarks/_standins.py).

    python benchmarks/metrics.py [--device cuda] [--repeats 3] [--json out.json] [--images 16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import _common as C
from _common import Row

# ------------------------------------------------------------------------------------------------------ SSIM


def ssim_pairs(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images and a noisy, shifted copy: realistic SSIM values (not 1, not 0)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(n, 3, size // 16, size // 16))
    real = np.clip(np.kron(base, np.ones((16, 16))) + rng.normal(0, 12, (n, 3, size, size)), 0, 255)
    fake = np.clip(np.roll(real, 1, axis=-1) + rng.normal(0, 20, real.shape), 0, 255)
    return torch.from_numpy(real.astype(np.uint8)), torch.from_numpy(fake.astype(np.uint8))


def skimage_ssim(real: torch.Tensor, fake: torch.Tensor) -> np.ndarray:
    from skimage.metrics import structural_similarity

    r, f = real.permute(0, 2, 3, 1).numpy(), fake.permute(0, 2, 3, 1).numpy()
    return np.array([structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, K1=0.01, K2=0.03) for a, b in zip(r, f)])


def bench_ssim(n: int, size: int, device: torch.device, repeats: int) -> tuple[list[Row], float]:
    from gsqbench.metrics.pixel import ssim_per_image

    real, fake = ssim_pairs(n, size)
    case = f"SSIM {n} images {size}x{size}"
    want = skimage_ssim(real, fake)
    got = ssim_per_image(real.to(device), fake.to(device)).cpu().numpy()
    max_diff = float(np.abs(got - want).max())
    rows = [C.run_row(case, "scikit-image (per image)", lambda: skimage_ssim(real, fake), torch.device("cpu"),
                      repeats, reference=True),
            C.run_row(case, "gsqbench ssim_per_image (float64)",
                      lambda: ssim_per_image(real.to(device), fake.to(device)), device, repeats,
                      max_abs_diff_vs_skimage=max_diff)]
    got32 = ssim_per_image(real.to(device), fake.to(device), dtype=torch.float32).cpu().numpy()
    rows.append(C.run_row(case, "gsqbench ssim_per_image (float32)",
                          lambda: ssim_per_image(real.to(device), fake.to(device), dtype=torch.float32), device,
                          repeats, max_abs_diff_vs_skimage=float(np.abs(got32 - want).max())))
    return rows, max_diff


# ----------------------------------------------------------------------------------------- weights stand-ins


def ensure_weights(nets: tuple[str, ...], home: Path) -> bool:
    """Use installed weights if all are verified; else install random stand-ins under `home`. True = real."""
    import _standins

    return _standins.ensure(("inception-fid",) + tuple({"alex": "alexnet", "vgg": "vgg16"}[n] for n in nets), home)


# ---------------------------------------------------------------------------------------- evaluation pass


TINY_TOKENIZER = ({"preset": "tiny-f8", "latent_dim": 8}, {"name": "gsq", "dim": 8, "codebook_size": 64, "groups": 2})


def bench_eval(n_images: int, batch: int, nets: tuple[str, ...], device: torch.device, repeats: int,
               tmp: Path, size: int = 64, tokenizer: tuple[dict, dict] = TINY_TOKENIZER, warmup: int = 1
               ) -> tuple[list[Row], dict[str, Any]]:
    """evaluate() round-robin against its bare parts; `tokenizer` = (model spec, quantizer spec), random init."""
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import EvalSettings, evaluate, to_model_input
    from gsqbench.metrics.fid import build_inception
    from gsqbench.metrics.lpips import build_lpips, u8_to_lpips_input
    from gsqbench.models.tokenizer import build_tokenizer
    from gsqbench.weights import weight_path

    real_weights = ensure_weights(nets, tmp / "weights")
    torch.manual_seed(0)
    tok = build_tokenizer(*tokenizer).to(device).eval()
    data = build_dataset("synthetic", resolution=size, n=n_images)
    settings = EvalSettings(batch_size=batch, samples=0, lpips_nets=nets, progress=False)
    case = f"eval pass {n_images} images {size}x{size}, batch {batch}"

    batches = [torch.stack([data[i][1] for i in range(s, min(n_images, s + batch))]).to(device)
               for s in range(0, n_images, batch)]
    inception = build_inception(weight_path("inception-fid"), device)
    lpips_models = [build_lpips(n, weight_path({"alex": "alexnet", "vgg": "vgg16"}[n]), device) for n in nets]
    fakes = []

    @torch.no_grad()
    def model_part() -> None:
        fakes.clear()
        for u8 in batches:
            x_hat, _ = tok(to_model_input(u8))
            fakes.append(((x_hat.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))

    @torch.no_grad()
    def inception_part() -> None:
        for u8, f in zip(batches, fakes):
            inception(u8)
            inception(f)

    @torch.no_grad()
    def lpips_part() -> None:
        for u8, f in zip(batches, fakes):
            for m in lpips_models:
                m(u8_to_lpips_input(u8), u8_to_lpips_input(f))

    model_part()
    last: dict[str, Any] = {}

    def whole_pass() -> None:
        last["timings"] = evaluate(tok, data, settings, device=device).timings

    rows = C.run_interleaved(case, [("evaluate() whole pass", whole_pass),
                                    ("bare: tokenizer forward", model_part),
                                    ("bare: Inception forward (real+fake)", inception_part),
                                    (f"bare: LPIPS forward ({'+'.join(nets)})", lpips_part)], device, repeats,
                                warmup=warmup)
    parts = rows[1:]
    bare = sum(p.median for p in parts)
    rows.append(Row(case, "bare parts, sum of medians", [bare], None))
    overhead = rows[0].median / bare - 1
    timings = last.get("timings", {})
    in_pass = sum(v for k, v in timings.items() if not k.startswith(("sync:", "compute:")))
    return rows, {"eval_overhead": overhead, "eval_in_pass_s": in_pass, "eval_in_pass_overhead": in_pass / bare - 1, "weights": "installed" if real_weights else "random stand-ins",
                  "eval_stage_timings_s": last.get("timings", {})}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, repeats=3)
    parser.add_argument("--images", type=int, default=8, help="evaluation images (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="evaluation batch size (default 8)")
    parser.add_argument("--ssim-images", type=int, default=8, help="SSIM pairs of 256x256 (default 8)")
    parser.add_argument("--lpips-nets", default="alex", help="comma-separated LPIPS nets (alex, vgg); default alex")
    parser.add_argument("--only", default="ssim,eval", help="comma-separated subset of ssim, eval")
    args = parser.parse_args(argv)
    C.setup_logging()
    C.apply_threads(args)
    device = torch.device(args.device)
    machine = C.machine_info(device)
    sections = set(args.only.split(","))
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    if "ssim" in sections:
        ssim_rows, max_diff = bench_ssim(args.ssim_images, 256, device, args.repeats)
        rows += ssim_rows
        extra["ssim_max_abs_diff"] = max_diff
        extra["ssim_speedup"] = ssim_rows[0].median / ssim_rows[1].median
    if "eval" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            eval_rows, info = bench_eval(args.images, args.batch, tuple(args.lpips_nets.split(",")), device,
                                         args.repeats, Path(tmp))
        rows += eval_rows
        extra.update(info)
    print(f"# machine: {machine}")
    print(C.format_table(rows))
    if "ssim_speedup" in extra:
        ok = extra["ssim_speedup"] >= 20 and extra["ssim_max_abs_diff"] <= 1e-4
        print(f"# goal: SSIM {extra['ssim_speedup']:.1f}x faster than scikit-image (goal >= 20x), max |diff| "
              f"{extra['ssim_max_abs_diff']:.1e} (goal <= 1e-4): {'MET' if ok else 'NOT MET'}")
    if "eval_overhead" in extra:
        print(f"# goal: evaluation overhead over bare parts {100 * extra['eval_overhead']:.1f} % (goal <= 15 %): "
              f"{'MET' if extra['eval_overhead'] <= 0.15 else 'NOT MET'}  [weights: {extra['weights']}]")
        print(f"#   of which the streaming pass (data, model, metric updates) takes {extra['eval_in_pass_s']:.3f} s in "
              f"the last run: {100 * extra['eval_in_pass_overhead']:.1f} % over the bare parts; the rest is fixed "
              f"per call (metric construction and weight verification, FID/IS compute, card)")
        stages = sorted(extra["eval_stage_timings_s"].items(), key=lambda kv: -kv[1])
        print("# evaluate() stages, last run (s): " + ", ".join(f"{k} {v:.3f}" for k, v in stages))
    C.write_json(args.json, "metrics", machine, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
