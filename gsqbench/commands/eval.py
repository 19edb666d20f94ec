"""`gsqbench eval CHECKPOINT --data KIND[:PATH] ...`: evaluate one checkpoint (ours or an official GSQ release).

Parses arguments and calls gsqbench.runner.evaluate_checkpoint (load, one streaming evaluation pass, the results
directory through gsqbench.results.write_run; under torchrun each rank takes its shard), then prints a summary.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

HELP = ("evaluate a checkpoint (gsqbench dir, official GSQ release, or a published release file) on an image set: "
        "rFID, IS, PSNR, SSIM, LPIPS, usage")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="gsqbench checkpoint dir, official GSQ release folder, or a published release file "
                             "(LlamaGen, Open-MAGVIT2, MaskGIT VQGAN, taming VQGAN)")
    parser.add_argument("--data", default="sample-photos", metavar="KIND[:PATH]",
                        help="sample-photos | synthetic | image-folder:PATH (default sample-photos)")
    parser.add_argument("--resolution", type=int, default=256, help="eval image size S (default 256)")
    parser.add_argument("--crop", default=None,
                        help="crop protocol gsq | adm | train | torchvision | torchvision-bicubic | albumentations "
                             "(default gsq, or the compatibility mode's)")
    parser.add_argument("--n", type=int, default=None, help="number of images (default all)")
    parser.add_argument("--crops-per-image", type=int, default=1, metavar="C",
                        help="evaluate C crops of each image: the crop protocol's plus C-1 seeded random crops "
                             "(more tokens for codebook usage; default 1)")
    parser.add_argument("--split", default="eval", help="dataset split (default eval)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", default="gsqbench",
                        help="gsqbench (pinned protocol) | gsq-compat (official GSQ quirks) | a published tokenizer's "
                             "own protocol: llamagen-compat, magvit2-compat, taming-compat, maskgit-compat "
                             "(gsqbench list modes; each card lists what differs)")
    parser.add_argument("--lookup", default=None, metavar="MODE",
                        help="nearest-code lookup for GSQ/VQ: exact | fp32-expanded | bf16 (default: exact; bf16 in "
                             "gsq-compat). A different mode gets its own card hash and a code_agreement with exact")
    parser.add_argument("--ssim-border", default=None, metavar="BORDER",
                        help="gsq-compat SSIM averaging, the official torchmetrics version being unknown: valid "
                             "(interior, torchmetrics <= 1.4.1; default) | reflect-full (whole reflect-padded map; "
                             ">= 1.4.2). Recorded in the card (ssim_border); gsqbench mode pins valid")
    parser.add_argument("--metrics", action="append", default=[], metavar="NAME",
                        help="metric family (pixel, lpips, fid, codebook, cost; opt-in: rfd, kid, prc) or key; "
                        "repeatable (default: all but the opt-in ones)")
    parser.add_argument("--require", action="append", default=[], metavar="METRIC",
                        help="fail (exit 2) if this metric is unavailable, e.g. rfid@inception; repeatable")
    parser.add_argument("--fid-reference-stats", default=None, metavar="FILE",
                        help="real-side FID statistics (.npz); its key must match this data and extractor")
    parser.add_argument("--fid-cache-dir", default=None, metavar="DIR",
                        help="cache real-side FID statistics here, keyed by data, crop, N and extractor")
    parser.add_argument("--samples", type=int, default=8, help="image pairs saved as PNG (default 8)")
    parser.add_argument("--save-recon", default=None, metavar="FORMAT",
                        help="export every reconstruction and original under <out>/export: npz (ADM layout, "
                        "arr_0 uint8 NxHxWx3 in image-id order + ids.json) or png (<id>.png per side)")
    parser.add_argument("--keep-features", action="store_true",
                        help="keep the float16 feature files of KID / precision-recall under <out>/features")
    parser.add_argument("--weights", default=None, help="ema | raw: which weights the checkpoint holds "
                        "(default: from the checkpoint, else ema)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="results dir (default results/eval/<checkpoint name>-<hash of its path>); must be new, "
                             "empty or made by an earlier eval")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing folder eval did not create (e.g. a run folder), replacing its "
                             "evaluation files")
    parser.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding worker processes (default: chosen from the cores)")
    parser.add_argument("--strict-data", action="store_true",
                        help="an unreadable image is an error instead of skipped with a count")
    parser.add_argument("--min-size", type=int, default=None, metavar="PX",
                        help="refuse images whose shorter side is below PX pixels (else counted in the card)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice). With --num-workers W on a CPU, "
                             "cores - W leaves the decoding workers their cores")
    parser.add_argument("--no-progress", action="store_true")


def _parse_data(spec: str) -> tuple[str, str | None]:
    kind, _, path = spec.partition(":")
    return kind, (path or None)


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


def check_paths(args: argparse.Namespace) -> Path:
    """Every path argument checked before torch is imported; returns the results folder to write."""
    from gsqbench.errors import UserError
    from gsqbench.io import check_input_dir, check_input_file, check_output_dir
    from gsqbench.locks import check_free
    from gsqbench.modes import check_mode
    from gsqbench.results import default_eval_dir, eval_dir_state

    check_mode(args.mode, "--mode")
    if not Path(args.checkpoint).exists():
        raise UserError(f"checkpoint '{args.checkpoint}' does not exist; expected a gsqbench checkpoint folder, an "
                        "official GSQ release folder or a release file")
    kind, path = _parse_data(args.data)
    if kind == "image-folder" and path:
        check_input_dir(path, "--data image-folder")
    if args.fid_reference_stats:
        check_input_file(args.fid_reference_stats, "--fid-reference-stats")
    if args.fid_cache_dir:
        check_output_dir(args.fid_cache_dir, "--fid-cache-dir")
    run_dir = Path(args.out) if args.out else default_eval_dir("results", args.checkpoint)
    eval_dir_state(run_dir, force=args.force)
    check_free(run_dir)
    return run_dir


def run(args: argparse.Namespace) -> int:
    from gsqbench.commands.run import apply_threads

    run_dir = check_paths(args)
    apply_threads(args)

    from gsqbench import distributed as ddp
    from gsqbench.config import EvalSpec
    from gsqbench.runner import DataChoice, evaluate_checkpoint

    kind, path = _parse_data(args.data)
    data = DataChoice(kind=kind, path=path, split=args.split, resolution=args.resolution, crop=args.crop, n=args.n,
                      crops_per_image=args.crops_per_image, seed=args.seed, strict=args.strict_data,
                      min_size=args.min_size)
    spec = EvalSpec(mode=args.mode, batch_size=args.batch_size, samples=args.samples, metrics=tuple(args.metrics),
                    require=tuple(args.require), fid_reference_stats=args.fid_reference_stats,
                    fid_cache_dir=args.fid_cache_dir, save_recon=args.save_recon, keep_features=args.keep_features,
                    lookup=args.lookup, ssim_border=args.ssim_border)
    result = evaluate_checkpoint(Path(args.checkpoint), data, spec, out_dir=run_dir, device=args.device,
                                 seed=args.seed, num_workers=args.num_workers, progress=not args.no_progress,
                                 weights=args.weights, force=args.force)
    if ddp.is_main():
        _print_summary(result, run_dir)
    return 0
