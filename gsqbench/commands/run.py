"""`gsqbench run SUITE.yaml`: train and evaluate every run of a suite, write results, optionally the report."""
from __future__ import annotations

import argparse
import os

HELP = "train + evaluate every run of a suite (subjects x seeds x grid), write results and an optional report"


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `run` and `train`."""
    p.add_argument("suite", help="suite YAML file, or the name of a shipped suite from any directory "
                                 "(e.g. demo; `gsqbench list configs`)")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="only this subject (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (value parsed as YAML; repeatable)")
    p.add_argument("--results", default="results", metavar="DIR", help="results root (default: results)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--strict-data", action="store_true", help="a corrupt image is an error instead of skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice); 1 is fastest for tiny models on a busy machine")


def add_min_size_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", type=int, default=None, metavar="PX",
                   help="refuse evaluation images whose shorter side is below PX pixels (smaller ones are upscaled "
                        "by the crop protocol and counted in the card otherwise)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op thread count (a runtime knob, not part of the fairness hash)."""
    if args.threads is None:
        return
    from gsqbench.errors import UserError

    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: expected a positive integer")
    import torch

    torch.set_num_threads(args.threads)


def check_suite_paths(args: argparse.Namespace, runs: list) -> None:
    """--results (and --report) must be folders we can create or write into, and no run folder may be in use by
    another process; checked before any work (and before torch is imported)."""
    from gsqbench.io import check_output_dir
    from gsqbench.locks import check_free
    from gsqbench.results import run_dir_for

    check_output_dir(args.results, "--results")
    if getattr(args, "report", None):
        check_output_dir(args.report, "--report")
    for run in runs:
        check_free(run_dir_for(args.results, run.suite, run.run_id))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_suite_arguments(p)
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N independent runs side by side, each in its own process with --threads threads "
                        "(default: CPU count / N); on several GPUs job k uses cuda:(k mod count). Results are "
                        "bit-identical to --jobs 1 at the same thread count")
    add_min_size_argument(p)
    p.add_argument("--report", default=None, metavar="DIR", help="render the HTML report into DIR at the end")
    p.add_argument("--require", action="append", default=[], metavar="METRIC",
                   help="fail (exit 2) instead of reporting METRIC as unavailable (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every run finished; 1 when any diverged (named on stderr, after all the others ran)."""
    import sys

    from gsqbench.config import expand_runs, load_suite

    suite = load_suite(args.suite, args.overrides)  # bad input fails here, before torch is imported
    check_suite_paths(args, expand_runs(suite, args.only or None))
    apply_threads(args)

    from gsqbench.runner import divergence_lines, format_summary, run_suite

    res = run_suite(suite, args.results, args.only or None, device=args.device, report_dir=args.report,
                    strict_data=args.strict_data, require=args.require, progress=not args.no_progress,
                    jobs=args.jobs, threads=args.threads, min_size=args.min_size)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 talks
        return 1 if res.diverged else 0
    print(format_summary(res))
    if res.skipped:
        print(f"skipped (finished earlier): {', '.join(res.skipped)}")
    if res.report is not None:
        print(f"report: {res.report}")
    if res.diverged:
        for line in divergence_lines(res):
            print(f"gsqbench: {line}", file=sys.stderr)
        print(f"gsqbench: {len(res.diverged)} run(s) diverged: {', '.join(res.diverged)}", file=sys.stderr)
        return 1
    return 0
