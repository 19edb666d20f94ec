"""The `gsqbench` command line: parses arguments and calls library functions; nothing else.

Each subcommand lives in `gsqbench/commands/<name>.py` exposing HELP, add_arguments(parser) and
run(args) -> int. Heavy imports happen inside run(), so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from gsqbench.errors import UserError
from gsqbench.io import WriteFailed
from gsqbench.progress import CliLogging

# (subcommand, module under gsqbench.commands)
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("train", "train"),
    ("eval", "eval"),
    ("report", "report"),
    ("regress", "regress"),
    ("compare", "compare"),
    ("list", "list_"),
    ("weights", "weights"),
    ("import-official", "import_official"),
    ("import", "import_"),
    ("encode", "encode"),
    ("decode", "decode"),
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
    """Run one command. Exit codes: 0 success; 2 bad input (one `gsqbench: error:` line); 1 a failure that is not
    the input's fault (disk full, I/O error, an internal error; one line) or, for `regress`, a regression; 130
    interrupted. No traceback is printed unless -vv asks for it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logs = CliLogging(args.verbose).start()
    try:
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return _dispatch(args)
    finally:
        logs.finish()


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.plugins:
            from gsqbench.registry import add_plugin_dirs

            add_plugin_dirs(args.plugins)
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"gsqbench: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gsqbench: interrupted", file=sys.stderr)
        return 130
    except WriteFailed as exc:
        print(f"gsqbench: error: {_one_line(exc.strerror or exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine's fault, not the input's: disk full, I/O error, permissions
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"gsqbench: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line by default; -vv prints the traceback for a report
        if args.verbose >= 2:
            raise
        print(f"gsqbench: internal error: {type(exc).__name__}: {_one_line(exc)} (a bug in gsqbench; rerun with -vv "
              "for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
