"""`gsqbench decode DIR --checkpoint CKPT --out DIR2`: images (PNG, one per id) from a token folder.

Parses arguments and calls gsqbench.tokens.decode_checkpoint; the decoder and uint8 rule are the evaluation's, so
the images equal `gsqbench eval`'s reconstructions.
"""
from __future__ import annotations

import argparse

HELP = "decode a token folder written by `gsqbench encode` back to PNG images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tokens", metavar="DIR", help="token folder written by gsqbench encode")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="the checkpoint that encoded them")
    parser.add_argument("--out", required=True, metavar="DIR2", help="output folder: <id>.png per image")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the batch size used to encode")
    parser.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from gsqbench import distributed as ddp
    from gsqbench.tokens import decode_checkpoint

    written = decode_checkpoint(args.tokens, args.checkpoint, args.out, batch_size=args.batch_size,
                                device=args.device, progress=not args.no_progress)
    if ddp.is_main():
        print(f"decoded {len(written)} images to {args.out}")
    return 0
