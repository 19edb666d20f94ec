"""`gsqbench eval CHECKPOINT --data KIND[:PATH] ...`: evaluate one checkpoint (ours or an official GSQ release).

Loads with gsqbench.checkpoints.load_tokenizer, runs gsqbench.evaluate.evaluate (one streaming pass; under
torchrun each rank takes its shard), prints a summary table and writes the results directory through
gsqbench.results (metrics.csv, run.json with the protocol card, per_image.csv, codes.npz, samples/).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

HELP = "evaluate a checkpoint (gsqbench dir or official GSQ release) on an image set: rFID, IS, PSNR, SSIM, LPIPS, usage"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="gsqbench checkpoint dir or official release folder")
    parser.add_argument("--data", default="sample-photos", metavar="KIND[:PATH]",
                        help="sample-photos | synthetic | image-folder:PATH (default sample-photos)")
    parser.add_argument("--resolution", type=int, default=256, help="eval image size S (default 256)")
    parser.add_argument("--crop", default=None, help="crop protocol gsq | adm | train (default gsq)")
    parser.add_argument("--n", type=int, default=None, help="number of images (default all)")
    parser.add_argument("--split", default="eval", help="dataset split (default eval)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", default="gsqbench", help="gsqbench (pinned protocol) | gsq-compat (official quirks)")
    parser.add_argument("--metrics", action="append", default=[], metavar="NAME",
                        help="metric family (pixel, lpips, fid, codebook, cost) or key; repeatable (default all)")
    parser.add_argument("--require", action="append", default=[], metavar="METRIC",
                        help="fail (exit 2) if this metric is unavailable, e.g. rfid@inception; repeatable")
    parser.add_argument("--fid-reference-stats", default=None, metavar="FILE",
                        help="real-side FID statistics (.npz); its key must match this data and extractor")
    parser.add_argument("--fid-cache-dir", default=None, metavar="DIR",
                        help="cache real-side FID statistics here, keyed by data, crop, N and extractor")
    parser.add_argument("--samples", type=int, default=8, help="image pairs saved as PNG (default 8)")
    parser.add_argument("--weights", default=None, help="ema | raw: which weights the checkpoint holds "
                        "(default: from the checkpoint, else ema)")
    parser.add_argument("--out", default=None, metavar="DIR", help="results dir (default results/eval/<checkpoint>)")
    parser.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--no-progress", action="store_true")


def _parse_data(spec: str) -> tuple[str, str | None]:
    kind, _, path = spec.partition(":")
    return kind, (path or None)


def _checkpoint_file(path: Path) -> Path | None:
    for name in ("model.safetensors", "checkpoint.pt"):
        if (path / name).is_file():
            return path / name
    return path if path.is_file() else None


def _model_info(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from gsqbench.card import canonical_json
    from gsqbench.weights import sha256_file

    f = _checkpoint_file(ckpt)
    spec = {"model": meta.get("model_spec"), "quantizer": meta.get("quantizer_spec")}
    return {"checkpoint_sha256": meta.get("checkpoint_sha256") or (sha256_file(f) if f else None),
            "step": meta.get("step"), "fairness_hash": meta.get("fairness_hash"),
            "tokenizer_spec_hash": hashlib.sha256(canonical_json(spec).encode()).hexdigest(),
            "source": meta.get("source", "gsqbench")}


def _format_value(m: Any) -> str:
    if m.unavailable:
        return f"unavailable: {m.unavailable}"
    if m.value is None or (isinstance(m.value, float) and math.isnan(m.value)):
        return "nan"
    text = f"{m.value:.6g}"
    if m.stderr is not None and not math.isnan(m.stderr):
        text += f" ± {m.stderr:.2g}"
    if m.ci_low is not None and m.ci_high is not None:
        text += f"  [{m.ci_low:.4g}, {m.ci_high:.4g}]"
    return text


def _print_summary(result: Any, run_dir: Path) -> None:
    width = max(len(m.name) for m in result.metrics) if result.metrics else 10
    for m in result.metrics:
        print(f"{m.name.ljust(width)}  {_format_value(m)}")
    print(f"card_hash {result.card_hash[:16]}  weights_conformant {result.card.get('weights_conformant')}")
    print(f"results: {run_dir}")


def _write(run_dir: Path, result: Any, args: argparse.Namespace, ckpt: Path, meta: dict[str, Any],
           device: str, world: int) -> None:
    from gsqbench import results
    from gsqbench.io import safe_name

    if result.per_image:
        results.write_per_image(run_dir, result.per_image)
    if result.code_counts is not None:
        results.write_code_counts(run_dir, result.code_counts)
    info = {
        "run_id": run_dir.name, "suite": run_dir.parent.name or "eval",
        "subject": safe_name(str(meta.get("official_name") or meta.get("run_id") or ckpt.name)),
        "seed": args.seed, "grid": {}, "spec": {"checkpoint": str(ckpt), "model": meta.get("model_spec"),
                                             "quantizer": meta.get("quantizer_spec"), "data": args.data},
        "fairness_hash": meta.get("fairness_hash"), "card": result.card, "card_hash": result.card_hash,
        "provenance": results.provenance(device=device, precision=result.card["precision"]["model"],
                                         world_size=world),
        "status": "complete",
    }
    results.write_run_results(run_dir, info, result.metrics)


def run(args: argparse.Namespace) -> int:
    import torch

    from gsqbench import distributed as ddp
    from gsqbench.checkpoints import load_tokenizer
    from gsqbench.data import build_dataset
    from gsqbench.errors import UserError
    from gsqbench.evaluate import EvalSettings, evaluate
    from gsqbench.io import safe_child

    ckpt = Path(args.checkpoint)
    kind, path = _parse_data(args.data)
    settings = EvalSettings(
        mode=args.mode, batch_size=args.batch_size, metrics=tuple(args.metrics), require=tuple(args.require),
        samples=args.samples, fid_reference_stats=args.fid_reference_stats, fid_cache_dir=args.fid_cache_dir,
        seed=args.seed,
        num_workers=args.num_workers, progress=not args.no_progress,
        weights=args.weights or "ema",
    )
    distributed = ddp.init_from_env()
    device = torch.device(args.device) if args.device else ddp.local_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    tok, meta = load_tokenizer(ckpt)
    if args.weights is None and meta.get("weights") in ("ema", "raw"):
        settings = dataclasses.replace(settings, weights=meta["weights"])
    dataset = build_dataset(kind, path=path, split=args.split, resolution=args.resolution, crop=args.crop, n=args.n,
                            seed=args.seed)
    run_dir = Path(args.out) if args.out else safe_child("results", "eval", ckpt.resolve().name)
    try:
        result = evaluate(tok.eval().to(device), dataset, settings, device=device, out_dir=run_dir,
                          model_info=_model_info(ckpt, meta))
        if ddp.is_main():
            _write(run_dir, result, args, ckpt, meta, str(device), ddp.world_size())
            _print_summary(result, run_dir)
    finally:
        if distributed:
            ddp.shutdown()
    return 0
