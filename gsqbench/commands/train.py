"""`gsqbench train SUITE.yaml --run ID`: train runs of a suite (resuming from their checkpoints), no evaluation.

Works under torchrun (`torchrun --nproc_per_node N -m gsqbench train ...`): every rank takes its slice of the
global batch; rank 0 writes checkpoints and the log.
"""
from __future__ import annotations

import argparse

from gsqbench.commands.run import add_suite_arguments, apply_threads, check_suite_paths

HELP = "train runs of a suite (resumes from the last checkpoint); no evaluation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_suite_arguments(p)
    p.add_argument("--run", dest="run_ids", action="append", default=[], metavar="RUN_ID",
                   help="train only this run id, e.g. gsq-s0 (repeatable; default: all runs)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every selected run trained; 1 when any diverged (or diverged earlier with the same spec)."""
    import sys

    from gsqbench.config import expand_runs, load_suite
    from gsqbench.errors import UserError, did_you_mean
    from gsqbench.results import run_dir_for

    suite = load_suite(args.suite, args.overrides)  # bad input fails here, before torch is imported
    runs = expand_runs(suite, args.only or None)
    ids = [r.run_id for r in runs]
    for rid in args.run_ids:
        if rid not in ids:
            raise UserError(f"--run {rid!r}: no such run in suite {suite.suite!r}{did_you_mean(rid, ids)}")
    check_suite_paths(args, [r for r in runs if not args.run_ids or r.run_id in args.run_ids])

    from gsqbench import distributed as ddp
    from gsqbench import effective
    from gsqbench.runner import earlier_divergence, open_dataset, refusal_message, write_diverged
    from gsqbench.train import Diverged, train_run
    from gsqbench.validate import validate_suite

    apply_threads(args)
    suite = validate_suite(suite, args.only or None)
    runs = [r for r in effective.expand_runs(suite, args.only or None) if not args.run_ids or r.run_id in args.run_ids]
    try:
        diverged = []
        for run in runs:
            if run.loaded:  # {name, load: PATH}: evaluated as released by `gsqbench run`, never trained
                print(f"{run.run_id}: loaded subject ({run.load}), not trained")
                continue
            run_dir = run_dir_for(args.results, suite.suite, run.run_id)
            earlier = earlier_divergence(run, run_dir)
            if earlier is not None:
                print(f"gsqbench: {refusal_message(run, run_dir, earlier)}", file=sys.stderr)
                diverged.append(run.run_id)
                continue
            dataset = open_dataset(run.shared.data.train, strict=args.strict_data, role="train")
            try:
                res = train_run(run, run_dir, dataset, device=args.device, progress=not args.no_progress)
            except Diverged as exc:
                write_diverged(run, run_dir, exc, args.device)
                print(f"gsqbench: {run.run_id}: diverged at step {exc.step}: {exc.term} = {exc.value}",
                      file=sys.stderr)
                diverged.append(run.run_id)
                continue
            print(f"{run.run_id}: {res.steps} steps, {res.images_per_s:.1f} images/s, {res.time_s:.1f} s"
                  + (f" (resumed from step {res.resumed_from})" if res.resumed_from is not None else ""))
        if diverged:
            print(f"gsqbench: {len(diverged)} run(s) diverged: {', '.join(diverged)}", file=sys.stderr)
            return 1
    finally:
        ddp.shutdown()  # under torchrun: end the process group before exit (torch warns about one left open)
    return 0
