"""`gsqbench list {quantizers,metrics,discriminators,presets,weights,configs,modes}`: what this installation can build and use.

Each listing reads one registry or module and degrades to "not available" when that module is absent,
so the command works at every stage of the project.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

HELP = ("list registered quantizers, metrics, discriminators, model presets, known weight files, shipped configs or "
        "evaluation modes")
KINDS = ("quantizers", "metrics", "discriminators", "presets", "weights", "configs", "modes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="what to list")


def _optional_module(name: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):  # the module itself is missing, not one of its deps
            return None
        raise


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(a) for a, _ in rows), default=0)
    return [f"{a:<{width}}  {b}".rstrip() for a, b in rows]


def list_quantizers() -> list[str]:
    from gsqbench.registry import describe, discover_quantizers

    reg = discover_quantizers()
    return _rows([(name, describe(reg.get(name))) for name in reg.names()])


def list_metrics() -> list[str]:
    """One line per registered metric: name, family, the keys it produces (with directions), description."""
    from gsqbench.registry import describe, discover_metrics

    reg = discover_metrics()
    rows = []
    for name in reg.names():
        cls = reg.get(name)
        keys = ", ".join(f"{k} ({d})" for k, d in cls.outputs.items())
        family = cls.family if getattr(cls, "selected_by_default", True) else f"{cls.family}, opt-in"
        rows.append((name, f"[{family}] {keys}: {describe(cls)}"))
    return _rows(rows)


def list_discriminators() -> list[str]:
    from gsqbench.registry import describe, discover_discriminators

    reg = discover_discriminators()
    return _rows([(name, describe(reg.get(name))) for name in reg.names()])


def list_presets() -> list[str]:
    module = _optional_module("gsqbench.models.autoencoder")
    presets = getattr(module, "PRESETS", None)
    if presets is None:
        return ["presets: not available (gsqbench.models.autoencoder not installed)"]
    return sorted(str(name) for name in presets)


def list_weights() -> list[str]:
    module = _optional_module("gsqbench.weights")
    known = getattr(module, "KNOWN_WEIGHTS", None)
    if known is None:
        return ["weights: not available (gsqbench.weights not installed)"]
    rows = []
    for name, wf in sorted(known.items()):
        rows.append((name, str(getattr(wf, "filename", ""))))
    return _rows(rows)


def list_configs() -> list[str]:
    """Shipped suites by the name `gsqbench run NAME` accepts from any directory, with their first comment line."""
    from gsqbench.config import shipped_config_names, shipped_configs_dir

    folder = shipped_configs_dir()
    if folder is None:
        return ["configs: not available (no shipped configs found beside the package)"]
    rows = [(name, _first_comment(folder / f"{name}.yaml")) for name in shipped_config_names()]
    return _rows(rows) or ["configs: none found"]


def list_modes() -> list[str]:
    """Each evaluation mode: the tokenizer it is for and whose protocol it reproduces (gsqbench.modes)."""
    from gsqbench.modes import MODES

    return _rows([(m.name, (f"[{m.tokenizer}] " if m.tokenizer else "") + m.reproduces) for m in MODES.values()])


def _first_comment(path: Path) -> str:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
            if line.strip():
                break
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def run(args: argparse.Namespace) -> int:
    listing = {"quantizers": list_quantizers, "metrics": list_metrics, "discriminators": list_discriminators,
               "presets": list_presets, "weights": list_weights, "configs": list_configs, "modes": list_modes}[args.kind]
    for line in listing():
        print(line)
    return 0
