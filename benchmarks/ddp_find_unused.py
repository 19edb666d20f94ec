"""DDP's find_unused_parameters: images/s of a harness training step (`gsqbench.train.train_step`: G step and D step)
with the unused-parameter search forced on (the official code's setting, and gsqbench's until issue 18) against
what gsqbench now chooses (a dry step decides; off for every built-in), side by side in one process group, timed
round-robin (a block of steps of one, then of the other, ...) so that a load change hits both alike.

Also reports the decision gsqbench made for the generator and the discriminator and whether torch warned that
find_unused_parameters found no unused parameter (it does, once per process, when the search is on for nothing).
Launch with torchrun (it is a DDP benchmark):

    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_find_unused.py --device cpu
    torchrun --standalone --nproc_per_node 1 benchmarks/ddp_find_unused.py --device cuda --preset f16 --size 256 \\
        --batch 32 --discriminator patchgan --precision bf16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

import _common as C

from gsqbench import distributed as ddp

FIND_UNUSED_WARNING = "did not find any unused parameters"


def suite_dict(args: argparse.Namespace) -> dict[str, Any]:
    if args.preset == "f16":  # the paper's GSQ-GAN F16 (configs/paper/gsq_gan_f16_d16_g8_v256k.yaml)
        latent, quantizer = 16, {"name": "gsq", "dim": 16, "codebook_size": 262_144, "groups": 8}
    else:
        latent, quantizer = 8, {"name": "gsq", "dim": 8, "codebook_size": 64, "groups": 2}
    gan: dict[str, Any] = {"discriminator": args.discriminator, "start_step": 0}
    if args.discriminator == "patchgan" and args.preset != "f16":
        gan["options"] = {"num_filters": 16, "num_layers": 2}
    return {
        "suite": "ddp-find-unused",
        "shared": {"model": {"preset": args.preset, "latent_dim": latent},
                   "data": {"train": {"kind": "synthetic", "size": args.size, "limit": 4 * args.batch}},
                   "train": {"steps": 10**6, "batch_size": args.batch, "precision": args.precision,
                             "ema_decay": 0.999, "checkpoint_every": 10**6},
                   "loss": {"perceptual_weight": 0.0}, "gan": gan},
        "subjects": [{"name": "gsq", "quantizer": quantizer}], "seeds": [0],
    }


def timed_block(tr: Any, steps: int, device: torch.device) -> float:
    from gsqbench.train import train_step

    ddp.barrier()
    C.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(tr)
    C.sync(device)
    return time.perf_counter() - t0


def first_steps(tr: Any, steps: int, device: torch.device) -> bool:
    """Warm-up steps; returns whether torch warned that the search found no unused parameter (the reducer prints
    it from C++ straight to stderr, so file descriptor 2 is captured meanwhile and passed on afterwards)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(tmp.fileno(), 2)
        try:
            timed_block(tr, steps, device)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    sys.stderr.write(text)
    return FIND_UNUSED_WARNING in text or any(FIND_UNUSED_WARNING in str(w.message) for w in caught)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny-f8", choices=("tiny-f8", "f16"))
    parser.add_argument("--size", type=int, default=32, help="training crop side (default 32)")
    parser.add_argument("--batch", type=int, default=8, help="GLOBAL batch (default 8)")
    parser.add_argument("--discriminator", default="patchgan", choices=("patchgan", "none"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per setting (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not ddp.init_from_env(args.device, timeout_s=300):
        print("ddp_find_unused.py: launch it with torchrun (e.g. torchrun --standalone --nproc_per_node 2 "
              "benchmarks/ddp_find_unused.py)", file=sys.stderr)
        return 2
    try:
        return _run(args)
    finally:
        ddp.shutdown()


def _run(args: argparse.Namespace) -> int:
    from gsqbench.config import expand_runs, suite_from_dict
    from gsqbench.runner import open_dataset
    from gsqbench.train import build_trainer

    device = ddp.resolve_device(args.device)
    run = expand_runs(suite_from_dict(suite_dict(args)))[0]
    data = open_dataset(run.shared.data.train)
    chosen = build_trainer(run, data, device)  # gsqbench's decision (dry step)
    forced = build_trainer(run, data, device, find_unused=True)  # the official setting
    decision = {"generator": chosen.ddp_model.find_unused_parameters,
                "discriminator": getattr(chosen.ddp_disc, "find_unused_parameters", None)}
    warned = {"chosen": first_steps(chosen, 2, device), "forced on": first_steps(forced, 2, device)}
    times: dict[str, list[float]] = {"chosen": [], "forced on": []}
    for _ in range(args.repeats):
        times["chosen"].append(timed_block(chosen, args.steps, device))
        times["forced on"].append(timed_block(forced, args.steps, device))
    world = ddp.world_size()
    rate = {k: args.steps * args.batch / statistics.median(v) for k, v in times.items()}
    if ddp.is_main():
        case = (f"{args.preset} {args.size}px, global batch {args.batch}, {world} x {device.type} "
                f"({'nccl' if device.type == 'cuda' else 'gloo'}), D {args.discriminator}, {args.precision}")
        print(f"# {case}; {args.repeats} blocks of {args.steps} steps each, round-robin")
        print(f"# gsqbench's decision: find_unused_parameters generator={decision['generator']}, "
              f"discriminator={decision['discriminator']}")
        print(f"{'setting':<44} {'images/s':>9} {'median s/step':>14} {'torch warned unused-search':>27}")
        for key, label in (("forced on", "find_unused_parameters=True (official)"),
                           ("chosen", f"gsqbench's choice ({decision['generator']})")):
            print(f"{label:<44} {rate[key]:>9.2f} {statistics.median(times[key]) / args.steps:>14.4f} "
                  f"{'yes' if warned[key] else 'no':>27}")
        print(f"# speed-up of gsqbench's choice: {rate['chosen'] / rate['forced on']:.3f}x")
        if args.json:
            C.write_json(args.json, "ddp_find_unused", C.machine_info(device), [], {
                "case": case, "decision": decision, "warned": warned, "images_per_s": rate,
                "block_times_s": times, "steps_per_block": args.steps, "world_size": world})
    return 0


if __name__ == "__main__":
    sys.exit(main())
