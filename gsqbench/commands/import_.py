"""`gsqbench import PATH [--kind K] --out DIR`: convert a published tokenizer release into a gsqbench checkpoint.

Kinds: llamagen (VQ-16/VQ-8 `{"model": state_dict}`), open-magvit2 (Lightning `.ckpt`, EMA weights by
default), maskgit (MaskGIT VQGAN PyTorch port, plain state dict), taming (Lightning `last.ckpt`). Files are read
with `torch.load(weights_only=True)` (Lightning callback / Namespace globals as inert stand-ins, anything else
refused) or safetensors; the model is loaded strictly. See docs/tokenizers/.
"""
from __future__ import annotations

import argparse

HELP = "convert a published tokenizer release (LlamaGen, Open-MAGVIT2, MaskGIT VQGAN, taming VQGAN) into a gsqbench checkpoint"
KIND_CHOICES = ("llamagen", "open-magvit2", "maskgit", "taming")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="release file (.pt, .ckpt, .bin or .safetensors)")
    parser.add_argument("--kind", choices=KIND_CHOICES, default=None,
                        help="release kind (default: recognised from the state-dict keys)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (model.safetensors + model.json)")
    parser.add_argument("--weights", choices=("ema", "raw"), default=None,
                        help="which weights to take (default: EMA for Open-MAGVIT2, as its authors evaluate; "
                             "LlamaGen: 'ema' entry if present, else 'model')")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")


def run(args: argparse.Namespace) -> int:
    from gsqbench.io import check_input_file, check_output_dir

    check_input_file(args.path, "release file")  # before torch is imported
    check_output_dir(args.out, "--out")

    from gsqbench.importers.releases import import_release

    out, meta = import_release(args.path, args.out, kind=args.kind, weights=args.weights, overwrite=args.force)
    q = meta["quantizer_spec"]
    print(f"imported {args.path} -> {out}")
    print(f"  kind {meta['kind']} ({meta.get('variant') or 'non-standard configuration'}), "
          f"architecture {meta['architecture']}, weights {meta['weights']}")
    print(f"  quantizer {q['name']}: V={q['codebook_size']} dim={q['dim']}; input range {meta['input_range']}")
    for d in meta["dropped"]:
        print(f"  dropped {d['keys']} keys '{d['prefix']}': {d['reason']}")
    if meta["pickled_stand_ins"]:
        print(f"  read as inert stand-ins: {', '.join(meta['pickled_stand_ins'])}")
    print(f"  release sha256 {meta['checkpoint_sha256']}")
    return 0
