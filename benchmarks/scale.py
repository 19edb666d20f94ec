"""The data and evaluation path at ImageNet scale (issue 16), measured side by side in one run.

A folder of N synthetic JPEGs with ImageNet-like sizes (500×375, 375×500, 500×333, ... and a few small ones, in
1000 class folders; smooth colour fields, shapes and noise, quality 90, ~60-110 KB like ImageNet's) is written once,
then:

1. dataset build at N (default 50,000): the former build (every file opened and header-checked: the reference,
   restated here) vs the manifest cold (listing + stat, cache written) and warm (cache reused);
2. decode-and-crop-only throughput through the evaluation's own DataLoader path (the bound);
3. the full evaluation (tiny-f8 tokenizer, PSNR, SSIM, codebook usage, FID/IS with locally made random Inception
   weights installed through the weight manager) at N_eval ≥ 1,000: images/s, its stage shares (the models' share
   separately), and the same pass with a free stand-in model and no Inception (is the harness near the bound once
   the model is not the bottleneck?);
4. the evaluation overhead over the bare forwards (tokenizer + Inception on the same, pre-decoded batches);
5. peak RSS of the evaluating process at N = 1,000 vs 10,000 (and 50,000 with --rss 1000,10000,50000), each in a
   fresh subprocess, on a folder of small (80×60) JPEGs with a cost-free stand-in of Inception's outputs (2048
   features, 1008 logits per image): the metrics keep exactly the per-image state they keep with Inception, and
   N = 10,000 fits the time budget.

CPU budget: on a 2-core machine the Inception input is shrunk from 299 to --inception-size (default 107 on CPU,
as the test suite does; 299 on CUDA). Per-image state does not depend on it (2048-d statistics, 1008 logits per
image), and a cheaper model makes the relative overhead larger, not smaller.

    python benchmarks/scale.py --json benchmarks/results/scale-cpu2.json      # ~15 min on 2 CPU cores
    python benchmarks/scale.py --n 5000 --n-eval 200 --rss 200,1000           # quick look
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import _common as C
from _common import Row

# (width, height, weight): ImageNet's common shapes; a few small images (ImageNet val has some below 256)
SHAPES = ((500, 375, 40), (375, 500, 12), (500, 333, 14), (333, 500, 4), (500, 500, 6), (500, 400, 6),
          (400, 500, 3), (640, 480, 4), (500, 281, 4), (300, 225, 3), (1024, 768, 2), (200, 150, 1), (90, 120, 1))
POOL = 240  # distinct encoded images; the folder repeats them (decoding cost is per image, not per content)
# the RSS runs' images: small, so N = 10,000 fits the time budget (per-image state does not depend on image size)
SMALL_SHAPES = ((80, 60, 3), (60, 80, 1))
MODEL = {"preset": "tiny-f8", "latent_dim": 8}
QUANTIZER = {"name": "gsq", "dim": 8, "codebook_size": 64, "groups": 2}
METRICS = ("pixel", "codebook", "fid")


# ------------------------------------------------------------------------------------------------------ data


def _photo_like(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour field + flat shapes + texture noise: JPEG sizes and decode cost of natural photos."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, f = rng.uniform(0, 255), rng.uniform(-1, 1), rng.uniform(0.005, 0.03)
        img[..., c] = a + 60 * np.sin(f * xx + b) * np.cos(f * 0.7 * yy - b)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int, seed: int = 0, table: tuple = SHAPES) -> dict[str, Any]:
    """N JPEGs in 1000 class folders (n/1000 each), from a pool of POOL encodings; returns size statistics."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    weights = np.array([s[2] for s in table], np.float64)
    pool_size = min(POOL, max(8, n // 50))  # small folders (tests, quick looks) need fewer distinct images
    shapes = [table[i][:2] for i in rng.choice(len(table), size=pool_size, p=weights / weights.sum())]
    pool = []
    for w, h in shapes:
        buf = io.BytesIO()
        Image.fromarray(_photo_like(w, h, rng)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    classes = 1000 if n >= 1000 else max(1, n // 10)
    per_class = -(-n // classes)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        (root / f"n{i // per_class:08d}" / f"ILSVRC_val_{i:08d}.JPEG").write_bytes(pool[i % pool_size])

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(write, range(n)))
    sizes = [len(pool[i % pool_size]) for i in range(n)]
    small = sum(1 for i in range(n) if min(shapes[i % pool_size]) < 256)
    return {"n": n, "mean_kb": float(np.mean(sizes)) / 1024, "total_gb": float(np.sum(sizes)) / 2**30,
            "below_256": small, "shapes": sorted({f"{w}x{h}" for w, h in shapes})}


def _header_check_build(root: Path) -> int:
    """The former build, restated: list with rglob, open every file and verify its header (8 threads)."""
    from PIL import Image

    exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())

    def ok(p: Path) -> bool:
        try:
            with Image.open(p) as img:
                img.verify()
            return True
        except Exception:
            return False

    with ThreadPoolExecutor(8) as ex:
        return sum(ex.map(ok, files))


def bench_build(root: Path, repeats: int) -> tuple[list[Row], dict[str, Any]]:
    from gsqbench.data import build_dataset
    from gsqbench.manifest import manifest_path

    def cold() -> None:
        manifest_path(root).unlink(missing_ok=True)
        build_dataset("image-folder", path=root, resolution=256)

    def warm() -> None:
        ds = build_dataset("image-folder", path=root, resolution=256)
        assert ds.manifest_origin == "cache"

    n = len(build_dataset("image-folder", path=root, resolution=256))
    case = f"dataset build, N={n:,}"
    rows = C.run_interleaved(case, [("before: open + header-check every file", lambda: _header_check_build(root)),
                                    ("manifest cold (list + stat, write cache)", cold),
                                    ("manifest warm (list + stat, cache reused)", warm)], torch.device("cpu"),
                             repeats, warmup=0)
    return rows, {"build_n": n, "build_warm_s": rows[2].median, "build_cold_s": rows[1].median,
                  "build_before_s": rows[0].median}


# ------------------------------------------------------------------------------------------------------ eval


class _FreeTokenizer(torch.nn.Module):
    """Stand-in model costing ~nothing (pool 8 → 64-level scalar codes → nearest upsample): the pass without a
    model bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        from gsqbench.quantizer import QuantizerOutput

        self._out = QuantizerOutput

        class Q(torch.nn.Module):
            dim, groups, codebook_size, lookup_precision = 3, 3, 64, None

        self.quantizer = Q()

    def encode(self, x):
        idx = torch.round((torch.nn.functional.avg_pool2d(x, 8).clamp(-1, 1) + 1) * 31.5).long()
        return self._out(idx.float() / 31.5 - 1, idx.permute(0, 2, 3, 1).contiguous())

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=8, mode="nearest")


def _settings(**kw):
    from gsqbench.evaluate import EvalSettings

    return EvalSettings(**{"batch_size": 32, "samples": 0, "metrics": METRICS, "progress": False,
                           "checkpoint_every": 0, **kw})


def _tokenizer() -> torch.nn.Module:
    from gsqbench.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer(MODEL, QUANTIZER).eval()


def _read_all(ds: Any, workers: int) -> None:
    """Decode + crop only, through evaluate's own DataLoader path (workers, collate, prefetch)."""
    from gsqbench.evaluate import _batches

    batches, _ = _batches(ds, _settings(num_workers=workers), torch.device("cpu"))
    for _ in batches:
        pass


def bench_bound(ds: Any, workers: int, repeats: int) -> tuple[list[Row], dict[str, Any]]:
    """The bound (decode + crop only) and the pass with a free model, round-robin so load changes hit all alike."""
    from gsqbench.evaluate import evaluate

    free = _FreeTokenizer().eval()
    runs = [(f"decode+crop only, {workers} worker(s) (the bound)", lambda: _read_all(ds, workers))]
    for metrics, label in ((("psnr", "codebook"), "PSNR usage"), (("pixel", "codebook"), "PSNR SSIM usage")):
        st = _settings(num_workers=workers, metrics=metrics)
        runs.append((f"evaluate(), free model: {label}", lambda st=st: evaluate(free, ds, st, device="cpu")))
    rows = C.run_interleaved(f"bound vs free-model pass, N={len(ds):,} S={ds.resolution}", runs,
                             torch.device("cpu"), repeats, warmup=0)
    n = len(ds)
    return rows, {"bound_images_per_s": n / rows[0].median, "free_model_psnr_ratio": rows[0].median / rows[1].median,
                  "free_model_pixel_ratio": rows[0].median / rows[2].median}


def bench_eval(ds: Any, workers: int, repeats: int, bound_ips: float) -> tuple[list[Row], dict[str, Any]]:
    from gsqbench.data import to_model_input
    from gsqbench.evaluate import evaluate, to_uint8
    from gsqbench.metrics.fid import build_inception
    from gsqbench.weights import weight_path

    n = len(ds)
    tok = _tokenizer()
    settings = _settings(num_workers=workers)
    last: dict[str, Any] = {}

    def full() -> None:
        t0 = time.perf_counter()
        res = evaluate(tok, ds, settings, device="cpu")
        last["wall"], last["timings"], last["n"] = time.perf_counter() - t0, res.timings, res.card["data"]["N"]

    # the bare forwards on the same batches, decoded beforehand
    batches = [torch.stack([ds[i][1] for i in range(s, min(n, s + settings.batch_size))])
               for s in range(0, n, settings.batch_size)]
    inception = build_inception(weight_path("inception-fid"), "cpu")

    @torch.no_grad()
    def bare() -> None:
        for u8 in batches:
            q = tok.encode(to_model_input(u8))
            fake = to_uint8(tok.decode(q.z_q))
            inception(u8)
            inception(fake)

    case = f"evaluation, N={n:,} S={ds.resolution}"
    rows = C.run_interleaved(case, [("bare forwards: tokenizer + Inception (real, fake)", bare),
                                    ("evaluate(): PSNR SSIM usage FID/IS, decoding in workers", full)],
                             torch.device("cpu"), repeats, warmup=0)
    timings = last["timings"]
    model_s = timings.get("model", 0.0)
    inception_s = timings.get("metric:FIDMetric", 0.0)
    fixed_s = sum(v for k, v in timings.items() if k.startswith(("compute:", "sync:")))
    eval_s, bare_s = rows[1].median, rows[0].median
    return rows, {"eval_n": n, "eval_images_per_s": n / eval_s, "eval_overhead": eval_s / bare_s - 1,
                  "eval_fixed_s": fixed_s, "eval_fixed_share_of_bare": fixed_s / bare_s,
                  "eval_model_share": model_s / last["wall"], "eval_inception_share": inception_s / last["wall"],
                  "eval_stage_timings_s": timings, "eval_ratio_to_bound": (n / eval_s) / bound_ips}


# ------------------------------------------------------------------------------------------------------ RSS


class _ShapeStub(torch.nn.Module):
    """Inception's outputs at no cost: (b, 2048) features and (b, 1008) logits from the pooled pixels. The FID
    metric keeps exactly the per-image state it keeps with Inception (1008 logits per image for IS; fixed-size
    2048-d statistics), so its memory growth with N is measured without N Inception forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.randn(3 * 4 * 4, 2048 + 1008, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        out = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj
        return out[:, :2048], out[:, 2048:]


def rss_child(folder: Path, n: int, resolution: int, inception_size: int, workers: Optional[int]) -> dict:
    """One evaluation in this (fresh) process; returns its peak RSS and the workers' (MB)."""
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import build_metrics, evaluate
    from gsqbench.metrics.fid import FIDMetric

    ds = build_dataset("image-folder", path=folder, resolution=resolution, n=n)
    tok = _tokenizer()
    settings = _settings(num_workers=workers)
    metrics = build_metrics(_settings(metrics=("pixel", "codebook")), torch.device("cpu"), tok)
    metrics.append(FIDMetric("cpu", required=True, extractor=_ShapeStub()))
    t0 = time.perf_counter()
    res = evaluate(tok, ds, settings, device="cpu", metrics=metrics)
    with open("/proc/self/statm") as f:  # now, with every metric's per-image state and the result still alive
        end_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"n": res.card["data"]["N"], "wall_s": time.perf_counter() - t0, "rss_end_mb": end_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def bench_rss(folder: Path, ns: list[int], resolution: int, inception_size: int, workers: Optional[int],
              threads: int) -> list[dict]:
    out = []
    for n in ns:
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--folder", str(folder), "--resolution",
               str(resolution), "--inception-size", str(inception_size), "--threads", str(threads)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        C.log.info("peak RSS at N=%d ...", n)
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------------------------------------ main


def _goal(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(extra: dict[str, Any]) -> list[str]:
    lines = []
    if "build_warm_s" in extra:
        speed = extra["build_before_s"] / extra["build_warm_s"]
        lines.append(f"# goal: warm build at N={extra['build_n']:,} {extra['build_warm_s']:.2f} s (goal <= 2 s): "
                     f"{_goal(extra['build_warm_s'] <= 2.0)}; cold {extra['build_cold_s']:.2f} s, former header-"
                     f"check build {extra['build_before_s']:.2f} s ({speed:.0f}x the warm build)")
    if "bound_images_per_s" in extra:
        at256 = (f" (at S=256, the ImageNet protocol: {extra['bound_256_images_per_s']:.1f} images/s)"
                 if "bound_256_images_per_s" in extra else "")
        lines.append(f"# bound: decode+crop {extra['bound_images_per_s']:.1f} images/s at S={extra['resolution']} "
                     f"with {extra['workers']} worker(s){at256}")
    if "eval_images_per_s" in extra:
        lines.append(f"# full evaluation: {extra['eval_images_per_s']:.1f} images/s = "
                     f"{extra['eval_ratio_to_bound']:.2f}x the bound; the models' share of its time: tokenizer {100 * extra['eval_model_share']:.0f} %, "
                     f"Inception forwards + FID/IS statistics {100 * extra['eval_inception_share']:.0f} %")
    if "free_model_psnr_ratio" in extra:
        lines.append(f"# goal: once the model is not the bottleneck (free stand-in model, no Inception) the pass runs "
                     f"at {extra['free_model_psnr_ratio']:.2f}x the bound with PSNR+usage, "
                     f"{extra['free_model_pixel_ratio']:.2f}x with PSNR+SSIM+usage (goal >= 0.7x): "
                     f"{_goal(extra['free_model_psnr_ratio'] >= 0.7)} / {_goal(extra['free_model_pixel_ratio'] >= 0.7)}")
    if "eval_overhead" in extra:
        lines.append(f"# goal: evaluation overhead over the bare forwards at N={extra['eval_n']:,}: "
                     f"{100 * extra['eval_overhead']:.1f} % (goal <= 15 %): {_goal(extra['eval_overhead'] <= 0.15)}; "
                     f"of which fixed per-evaluation costs (sync + compute: FID's 2048x2048 eigendecomposition, IS, "
                     f"bootstrap) {100 * extra['eval_fixed_share_of_bare']:.1f} points ({extra['eval_fixed_s']:.1f} s, "
                     f"independent of N), the streaming pass "
                     f"{100 * (extra['eval_overhead'] - extra['eval_fixed_share_of_bare']):.1f} %")
        stages = sorted(extra["eval_stage_timings_s"].items(), key=lambda kv: -kv[1])
        lines.append("# evaluate() stages, last run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages))
    if extra.get("rss"):
        base = extra["rss"][0]
        for r in extra["rss"]:
            lines.append(f"# peak RSS N={r['n']:,}: {r['peak_rss_mb']:.0f} MB (RSS after the evaluation, its state "
                         f"alive: {r['rss_end_mb']:.0f} MB; workers' peak {r['workers_peak_rss_mb']:.0f} MB), "
                         f"{r['wall_s']:.0f} s")
        for r in extra["rss"][1:]:
            growth = r["peak_rss_mb"] - base["peak_rss_mb"]
            end_growth = r["rss_end_mb"] - base["rss_end_mb"]
            lines.append(f"# goal: peak RSS growth N={base['n']:,} -> {r['n']:,}: {growth:+.0f} MB (after the "
                         f"evaluation {end_growth:+.0f} MB) (goal <= 150 MB): "
                         f"{_goal(growth <= 150)}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, repeats=3)
    parser.add_argument("--n", type=int, default=50_000, help="images in the folder / build measurement")
    parser.add_argument("--n-eval", type=int, default=1000, help="images evaluated for throughput (default 1000)")
    parser.add_argument("--eval-repeats", type=int, default=1,
                        help="round-robin repeats of the full evaluation vs the bare forwards (default 1)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="evaluation size S (default 64 on CPU, where tiny-f8 at 256 costs ~0.2-0.8 s an image; "
                             "256 on CUDA); the decode+crop bound is also measured at 256")
    parser.add_argument("--rss", default="1000,10000", help="comma-separated N for peak RSS ('' = skip)")
    parser.add_argument("--rss-resolution", type=int, default=32,
                        help="S of the RSS runs (per-image state does not depend on it; default 32)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: auto)")
    parser.add_argument("--inception-size", type=int, default=None, help="Inception input (default 107 CPU / 299)")
    parser.add_argument("--folder", type=Path, default=None, help="reuse/keep the JPEG folder here")
    parser.add_argument("--only", default="build,bound,eval,rss", help="subset of build,bound,eval,rss")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    C.apply_threads(args)
    inception_size = args.inception_size or (299 if args.device.startswith("cuda") else 107)
    if args.rss_child is not None:
        print(json.dumps(rss_child(args.folder, args.rss_child, args.resolution, inception_size, args.workers)))
        return 0
    C.setup_logging()
    device = torch.device(args.device)
    machine = C.machine_info(device)
    sections = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="gsqbench-scale-"))
    os.environ.setdefault("GSQBENCH_MANIFESTS", str(tmp / "manifests"))
    rows: list[Row] = []
    extra: dict[str, Any] = {"inception_input": inception_size}
    t_start = time.perf_counter()
    try:
        folder = args.folder or tmp / "imagenet-like"
        if sections & {"build", "bound", "eval"} and not any(folder.glob("*/*.JPEG")):
            t0 = time.perf_counter()
            extra["folder"] = make_folder(folder, args.n)
            extra["folder"]["write_s"] = time.perf_counter() - t0
            C.log.info("wrote %d JPEGs (%.1f GB) in %.0f s", args.n, extra["folder"]["total_gb"],
                       extra["folder"]["write_s"])
        if "build" in sections:
            build_rows, info = bench_build(folder, args.repeats)
            rows += build_rows
            extra.update(info)
        if sections & {"bound", "eval", "rss"}:
            from metrics import ensure_weights
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = inception_size
            extra["weights"] = "installed" if ensure_weights((), tmp / "weights") else "random stand-ins"
        from gsqbench.data import build_dataset, resolve_num_workers

        resolution = args.resolution or (256 if device.type == "cuda" else 64)
        if sections & {"bound", "eval"}:
            ds = build_dataset("image-folder", path=folder, resolution=resolution, n=min(args.n_eval, args.n))
            workers = resolve_num_workers(args.workers, ds, 32)
            extra["workers"], extra["resolution"] = workers, resolution
            bound_rows, info = bench_bound(ds, workers, args.repeats)
            rows += bound_rows
            extra.update(info)
            if resolution != 256:
                ds256 = build_dataset("image-folder", path=folder, resolution=256, n=min(args.n_eval, args.n))
                rows.append(C.run_row(f"decode+crop only, N={len(ds256):,} S=256", f"{workers} worker(s)",
                                      lambda: _read_all(ds256, workers), torch.device("cpu"), 1, warmup=0))
                extra["bound_256_images_per_s"] = len(ds256) / rows[-1].median
        if "eval" in sections:
            eval_rows, info = bench_eval(ds, workers, args.eval_repeats, extra["bound_images_per_s"])
            rows += eval_rows
            extra.update(info)
        if "rss" in sections and args.rss:
            ns = [int(x) for x in args.rss.split(",")]
            small = tmp / "rss-images"
            extra["rss_folder"] = make_folder(small, max(ns), seed=1, table=SMALL_SHAPES)
            extra["rss"] = bench_rss(small, ns, args.rss_resolution, inception_size, args.workers,
                                     torch.get_num_threads())
    finally:
        if args.folder is None:
            shutil.rmtree(tmp, ignore_errors=True)
    extra["total_s"] = time.perf_counter() - t_start
    machine["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"# machine: {machine}")
    print(C.format_table(rows))
    for line in report(extra):
        print(line)
    print(f"# total {extra['total_s']:.0f} s")
    C.write_json(args.json, "scale", machine, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
