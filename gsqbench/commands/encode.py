"""`gsqbench encode CHECKPOINT --data KIND[:PATH] --out DIR`: the token ids of a dataset as sharded .npy files.

Parses arguments and calls gsqbench.tokens.encode_checkpoint (streamed, resumable: rerun the same command after an
interruption; under torchrun every rank encodes its shards). Layout: gsqbench/tokens.py.
"""
from __future__ import annotations

import argparse

HELP = "write the token ids of a dataset (sharded int16/int32 .npy + tokens.json), e.g. to train a generator on"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="gsqbench checkpoint dir, official release or "
                        "imported published tokenizer")
    parser.add_argument("--data", required=True, metavar="KIND[:PATH]",
                        help="sample-photos | synthetic | image-folder:PATH")
    parser.add_argument("--out", required=True, metavar="DIR", help="token folder (created; rerun to resume)")
    parser.add_argument("--resolution", type=int, default=256, help="image size S (default 256)")
    parser.add_argument("--crop", default=None, help="crop protocol gsq | adm | train (default: gsq for eval, "
                        "train for the train split)")
    parser.add_argument("--split", default="train", help="dataset split (default train)")
    parser.add_argument("--n", type=int, default=None, help="number of images (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data kind")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard, a multiple of the batch size")
    parser.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from gsqbench import distributed as ddp
    from gsqbench.tokens import encode_checkpoint

    kind, _, path = args.data.partition(":")
    data = {"kind": kind, "path": path or None, "split": args.split, "resolution": args.resolution,
            "crop": args.crop, "n": args.n, "seed": args.seed}
    result = encode_checkpoint(args.checkpoint, data, args.out, batch_size=args.batch_size,
                               shard_size=args.shard_size, device=args.device, num_workers=args.num_workers,
                               progress=not args.no_progress)
    if ddp.is_main():
        resumed = f" ({len(result.kept)} kept from an earlier run)" if result.kept else ""
        print(f"{result.n} images in {result.shards} shards{resumed}: {result.out_dir}")
    return 0
