"""`gsqbench compare RESULTS... --reference SUBJECT`: every other subject against a reference, with 95 % intervals
and verdicts; `--fail-if-worse METRIC[=MARGIN]` makes it a CI gate (exit 1)."""
from __future__ import annotations

import argparse

HELP = ("compare every subject with a reference subject: difference, 95 %% interval, verdict (better / worse / no "
        "detectable difference); exit 1 with --fail-if-worse when a gated metric is worse")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS",
                        help="results folder(s) or run directories of one suite")
    parser.add_argument("--reference", required=True, metavar="SUBJECT",
                        help="the subject the others are compared with")
    parser.add_argument("--metric", action="append", default=[], metavar="METRIC",
                        help="compare only this metric (repeatable; default: every metric with a direction, "
                             "cost figures excluded)")
    parser.add_argument("--suite", metavar="NAME", help="only this suite of the results")
    parser.add_argument("--fail-if-worse", action="append", default=[], metavar="METRIC[=MARGIN]",
                        help="exit 1 when a subject is worse than the reference on METRIC by more than MARGIN "
                             "(absolute, or N%% of the reference) with 95 %% confidence; repeatable")
    parser.add_argument("-o", "--output", metavar="DIR", help="also write compare.csv, compare.json and compare.html "
                        "here (give the report folder so its index links them)")


def run(args: argparse.Namespace) -> int:
    from gsqbench.compare import (
        compare_to_reference, format_table, gate, parse_fail_if_worse, select_group, write_outputs,
    )

    rules = parse_fail_if_worse(args.fail_if_worse)
    group = select_group(args.results, args.reference, args.suite)
    comparison = compare_to_reference(group, args.reference, args.metric or None)
    print(format_table(comparison))
    failures = gate(comparison, rules) if rules else []
    if args.output:
        from gsqbench.report import render_compare

        paths = write_outputs(comparison, args.output)
        print(f"compare page: {render_compare(comparison, args.output)} (+ {', '.join(p.name for p in paths)})")
    for line in failures:
        print(line)
    if rules:
        print("compare: " + ("FAILED" if failures else "passed") + " (--fail-if-worse "
              + ", ".join(f"{m}={t}" for m, t in rules) + ")")
    return 1 if failures else 0
