"""`gsqbench data check FOLDER`: fully decode every image of a folder once and record which are readable.

Parses arguments and calls gsqbench.manifest.check_folder, which shares the folder's manifest with every run
(README "Corrupt and small images"): files found unreadable are then skipped by runs with a counted warning, or
refused with --strict-data.
"""
from __future__ import annotations

import argparse

HELP = "check an image folder: decode every file once, record readable/unreadable and sizes in its manifest"
SHOWN = 20  # unreadable files listed by name; the rest are counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("check", help="decode every image once; exit 1 when some are unreadable")
    p.add_argument("folder", metavar="FOLDER", help="image folder (searched recursively, as data.kind image-folder)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: cores + 2, at most 32)")
    p.add_argument("--recheck", action="store_true", help="decode files already checked too")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from gsqbench.errors import UserError
    from gsqbench.io import check_input_dir
    from gsqbench.manifest import check_folder, manifest_path, summarize_sizes

    check_input_dir(args.folder, "FOLDER")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected a positive integer")
    report = check_folder(args.folder, workers=args.workers, recheck=args.recheck, progress=not args.no_progress)
    m = report.manifest
    bad = report.bad
    print(f"{m.root}: {len(m)} image files, {len(m) - len(bad)} readable, {len(bad)} unreadable "
          f"(checked {report.checked} in {report.seconds:.1f} s)")
    for path, reason in bad[:SHOWN]:
        print(f"  unreadable: {path}: {reason}")
    if len(bad) > SHOWN:
        print(f"  ... and {len(bad) - SHOWN} more")
    sizes = summarize_sizes(m)
    print("shorter side below " + ", ".join(f"{t} px: {c}" for t, c in sizes.items())
          + " (upscaled by a crop of that size; --min-size refuses them)")
    print(f"manifest: {manifest_path(m.root)}")
    if bad:
        print("runs skip the unreadable files with a count (or stop with --strict-data)")
    return 1 if bad else 0
