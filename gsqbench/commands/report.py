"""`gsqbench report RESULTS... -o reports/NAME/`: render the HTML comparison report from results directories."""
from __future__ import annotations

import argparse

HELP = "render an HTML comparison report (tables, plots, reconstruction grids) from results directories"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="results root(s) or run directories")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder to write (e.g. reports/demo)")
    parser.add_argument("--title", default="gsqbench report", help="page title")
    parser.add_argument("--samples", type=int, default=4, metavar="K", help="eval images in the reconstruction grid")
    parser.add_argument("--worst", type=int, default=4, metavar="K", help="worst images listed per run")
    parser.add_argument("--no-plots", action="store_true", help="skip matplotlib figures (faster)")


def run(args: argparse.Namespace) -> int:
    from gsqbench.io import check_output_dir
    from gsqbench.report import render_report

    check_output_dir(args.output, "report folder -o")
    index = render_report(args.results, args.output, title=args.title, k_samples=args.samples, worst_k=args.worst,
                          with_plots=not args.no_plots)
    print(f"report: {index}")
    return 0
