"""The `gsqbench` command line: parses arguments and calls library functions; nothing else.

Each subcommand lives in `gsqbench/commands/<name>.py` exposing HELP, add_arguments(parser) and
run(args) -> int. Heavy imports happen inside run(), so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gsqbench.errors import UserError

# (subcommand, module under gsqbench.commands)
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("train", "train"),
    ("eval", "eval"),
    ("report", "report"),
    ("regress", "regress"),
    ("list", "list_"),
    ("weights", "weights"),
    ("import-official", "import_official"),
    ("import", "import_"),
    ("data", "data"),
    ("stats", "stats"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsqbench",
        description="Train, evaluate and compare image tokenizers (GSQ-GAN vs VQ/LFQ/FSQ) under identical hyperparameters.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument(
        "--plugins", action="append", default=[], metavar="DIR",
        help="extra directory of quantizer files to register (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"gsqbench.commands.{module_name}")
        except ModuleNotFoundError as exc:  # a command not built yet must not break the others
            if exc.name != f"gsqbench.commands.{module_name}":
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        if args.plugins:
            from gsqbench.registry import add_plugin_dirs

            add_plugin_dirs(args.plugins)
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"gsqbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gsqbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
