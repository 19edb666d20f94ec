"""`gsqbench stats FOLDER --out ref.npz`: precompute real-side FID reference statistics of an image folder.

Parses arguments and calls gsqbench.runner.reference_stats: one pass over the folder's images under the same
crop, resolution and conversion an evaluation uses, written with every key field that `--fid-reference-stats`
verifies (dataset, split, crop, resolution, N, id-list hash, originals hash, real-side conversion, extractor).
Files in the ADM / torch-fidelity layout (`mu`, `sigma` only) are also accepted by `--fid-reference-stats`, with a
warning that their provenance is unknown.
"""
from __future__ import annotations

import argparse

HELP = "precompute real-side FID statistics of an image folder (.npz with the key fields eval verifies)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="image folder (as data.kind image-folder)")
    parser.add_argument("--out", required=True, metavar="FILE", help="statistics file to write (.npz)")
    parser.add_argument("--resolution", type=int, default=256, help="image size S (default 256)")
    parser.add_argument("--crop", default=None, help="crop protocol gsq | adm | train | torchvision | "
                        "torchvision-bicubic | albumentations (default gsq, or the mode's)")
    parser.add_argument("--n", type=int, default=None, help="number of images (default all)")
    parser.add_argument("--split", default="eval", help="dataset split recorded in the key (default eval)")
    parser.add_argument("--mode", default="gsqbench", help="an eval mode (gsqbench list modes): the real-side "
                        "conversion and crop the statistics are keyed by")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="decoding worker processes (default: auto)")
    parser.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    parser.add_argument("--strict-data", action="store_true", help="an unreadable image is an error")
    parser.add_argument("--min-size", type=int, default=None, metavar="PX", help="refuse images smaller than PX")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gsqbench import distributed as ddp
    from gsqbench.errors import UserError
    from gsqbench.io import check_input_dir, check_output_dir
    from gsqbench.runner import DataChoice, reference_stats

    check_input_dir(args.folder, "FOLDER")  # before torch is imported
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; expected a .npz file path")
    check_output_dir(out.parent if str(out.parent) else Path("."), "--out folder")

    data = DataChoice(kind="image-folder", path=args.folder, split=args.split, resolution=args.resolution,
                      crop=args.crop, n=args.n, strict=args.strict_data, min_size=args.min_size)
    info = reference_stats(data, args.out, mode=args.mode, batch_size=args.batch_size, device=args.device,
                           num_workers=args.num_workers, progress=not args.no_progress)
    if ddp.is_main():
        skipped = f", {info['skipped']} unreadable skipped" if info["skipped"] else ""
        print(f"wrote {args.out}: N={info['n_images']}{skipped}, {info['crop']} crop at {info['resolution']}, "
              f"extractor {info['extractor']} layer {info['feature_layer']}, key {info['key_sha256'][:16]}")
    return 0
