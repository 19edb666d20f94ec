"""`gsqbench import-official PATH --out DIR`: convert an official GSQ release folder into a gsqbench checkpoint.

The release folder holds `checkpoint.pt` and (normally) `config.yaml` (gsq-reference.md §4). Weights are read
with `torch.load(weights_only=True)`; the pickled config inside is never unpickled. Quantizer flags that the
weights cannot tell must come from `config.yaml` or from --norm/--init/--commitment-weight.
"""
from __future__ import annotations

import argparse

HELP = "convert an official GSQ release folder (checkpoint.pt + config.yaml) into a gsqbench checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="official release folder (or its checkpoint.pt)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (model.safetensors + model.json)")
    parser.add_argument("--norm", choices=("l2", "l1", "none", "clip"), default=None,
                        help="lookup normalisation, only when config.yaml is absent (released GSQ: l2)")
    parser.add_argument("--init", choices=("spherical", "uniform"), default=None,
                        help="codebook init, only when config.yaml is absent (released GSQ: spherical)")
    parser.add_argument("--commitment-weight", type=float, default=None,
                        help="commitment loss weight, only when config.yaml is absent (released GSQ: 0.25)")
    parser.add_argument("--lookup-precision", default=None,
                        help="nearest-code lookup precision recorded in the quantizer spec (quantizer default if unset)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")


def run(args: argparse.Namespace) -> int:
    from gsqbench.io import check_output_dir

    check_output_dir(args.out, "--out")  # before torch is imported

    from gsqbench.importers.gsq_official import import_official

    flags = {"norm": args.norm, "init": args.init, "commitment_weight": args.commitment_weight,
             "lookup_precision": args.lookup_precision}
    out, meta = import_official(args.path, args.out, flags, overwrite=args.force)
    q = meta["quantizer_spec"]
    m = meta["model_spec"]
    print(f"imported {args.path} -> {out}")
    print(f"  backbone: hidden {m['hidden_channels']}, channel_multipliers {m['channel_multipliers']}, "
          f"D {m['embedding_dim']}")
    print(f"  quantizer: gsq V={q['codebook_size']} G={q['groups']} norm={q['norm']} init={q['init']} "
          f"(official type {meta['official_quantize_type']}, flags from {meta['quantizer_flags_from']})")
    if meta["inferred_from_shapes"]:
        print(f"  inferred from tensor shapes: {', '.join(meta['inferred_from_shapes'])}")
    print(f"  checkpoint.pt sha256 {meta['checkpoint_sha256']}")
    return 0
