"""`gsqbench regress RESULTS --baseline baselines/X.csv`: compare results with a baseline; a CI gate (exit 1)."""
from __future__ import annotations

import argparse

HELP = ("compare results with a baseline CSV (direction-aware tolerances); exit code 1 on any regressed, missing or "
        "incomparable row unless allowed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="results root(s) or run directories")
    parser.add_argument("--baseline", required=True, metavar="CSV", help="baseline CSV in the long metrics format")
    parser.add_argument("--update", action="store_true",
                        help="accept the current results: each run in them replaces all its baseline rows (created if "
                             "absent); a diverged run is never accepted (exit 1)")
    parser.add_argument("--tolerance", action="append", default=[], metavar="METRIC=VALUE",
                        help="override a tolerance: absolute (psnr=0.1) or relative (rfid=3%%); repeatable; "
                             "METRIC may be a full key (lpips@alex), its base (lpips) or family (usage)")
    parser.add_argument("--allow", action="append", default=[], metavar="STATUS",
                        help="do not fail on rows with this status: 'missing' (baseline rows absent from the results "
                             "or now unavailable) or 'incomparable' (fairness/card hash or device changed); "
                             "repeatable or comma-separated")
    parser.add_argument("--noise-aware", action="store_true",
                        help="count a change only when it exceeds the tolerance AND the 95 %% band of the two rows' "
                             "standard errors (for results that are not bitwise reproducible: GPU, new seeds, "
                             "another machine)")
    parser.add_argument("-o", "--output", metavar="DIR", help="also write regress.html + regress.json here "
                        "(give the report folder so its index links them)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gsqbench.io import check_input_file, check_output_dir
    from gsqbench.regress import (DIVERGED_REASON, exit_code, failing, failure_lines, format_table,
                                  parse_cli_tolerances, regress)

    if Path(args.baseline).exists():  # an absent one: regress() says to use --update
        check_input_file(args.baseline, "--baseline")
    if args.output:
        check_output_dir(args.output, "-o")
    allow = [a.strip() for item in args.allow for a in item.split(",") if a.strip()]
    failing(allow)  # validates --allow before any work
    tolerances = parse_cli_tolerances(args.tolerance)
    comparison = regress(args.results, args.baseline, cli_tolerances=tolerances, update=args.update,
                         noise_aware=args.noise_aware)
    print(format_table(comparison))
    if args.output:
        from gsqbench.report import render_regress

        print(f"regress page: {render_regress(comparison, args.output, baseline=str(args.baseline))}")
    if args.update:
        print(f"baseline updated: {args.baseline}")
        diverged = comparison[comparison["reason"].astype(str).str.startswith(DIVERGED_REASON)]
        for line in failure_lines(diverged):  # never accepted: the update cannot make them pass
            print(line)
        return 1 if len(diverged) else 0
    for line in failure_lines(comparison, allow):
        print(line)
    code = exit_code(comparison, allow)
    print("regress: " + ("FAILED" if code else "passed") + (f" (allowed: {', '.join(allow)})" if allow else ""))
    return code
