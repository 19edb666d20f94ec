"""`gsqbench weights list|verify|import FILE [--name N]|download NAME...`: manage the offline weight files.

Thin CLI over gsqbench.weights (metrics-protocol.md §11); `download` is the only networked command in gsqbench.
"""
from __future__ import annotations

import argparse

HELP = "list, verify, import or download the pretrained weight files metrics need (offline by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="table of known weight files and their status")
    sub.add_parser("verify", help="check the SHA-256 of every installed file (exit 2 on a mismatch)")
    p_imp = sub.add_parser("import", help="copy a local file into the weight store after checking its hash")
    p_imp.add_argument("file", metavar="FILE")
    p_imp.add_argument("--name", help="weight name (default: inferred from the file name)")
    p_dl = sub.add_parser("download", help="download known files (the only network access gsqbench makes)")
    p_dl.add_argument("names", nargs="+", metavar="NAME")
    p_dl.add_argument("--no-progress", action="store_true", help="no progress bar")


def _format_size(size: int | None) -> str:
    return f"~{size / 2**20:.0f} MiB" if size else "?"


def _list(verify_only: bool) -> int:
    from gsqbench import weights

    rows = []
    bad = 0
    for name, entry in sorted(weights.all_weights().items()):
        state, detail = weights.status(name)
        if verify_only and state == "missing":
            continue
        bad += state == "mismatch"
        sha = entry.sha256 or "(unknown)"
        sha = f"{sha}…" if entry.sha256_is_prefix else sha[:16] + ("…" if len(sha) > 16 else "")
        rows.append((name, state, _format_size(entry.size), sha, entry.filename, entry.used_by))
    if not rows:
        print(f"no weight files installed under {weights.weights_dir()}")
        return 0
    header = ("name", "status", "size", "sha256", "file", "used by")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"store: {weights.weights_dir()}")
    if bad:
        print(f"{bad} file(s) fail their hash check; re-download or re-import them")
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    from gsqbench import weights

    action = args.weights_command
    if action in ("list", "verify"):
        return _list(verify_only=action == "verify")
    if action == "import":
        path = weights.import_file(args.file, args.name)
        print(f"installed {path}")
        return 0
    for name in args.names:
        weights.get_weight(name)  # unknown names fail before any network access
    for name in args.names:
        path = weights.download(name, progress=not args.no_progress)
        print(f"installed {path}")
    return 0
