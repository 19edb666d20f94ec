"""docs/architecture.md's import rules, enforced on the source: every `import` in every gsqbench module, including
the lazy ones inside functions, is read from the AST and followed transitively through gsqbench.

The rules are the table in docs/architecture.md; `LAYERS` below restates it, and a test checks that the document and
this file name the same modules, so neither can drift alone.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "gsqbench"

#: layer → module prefixes, lowest first. A module may import its own layer and the layers below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("gsqbench", "gsqbench.errors", "gsqbench.io", "gsqbench.locks", "gsqbench.progress", "gsqbench.config",
              "gsqbench.card", "gsqbench.results", "gsqbench.registry", "gsqbench.weights", "gsqbench.effective",
              "gsqbench.modes")),
    ("read-only views", ("gsqbench.regress", "gsqbench.report", "gsqbench.stats", "gsqbench.compare")),
    ("compute", ("gsqbench.distributed", "gsqbench.quantizer", "gsqbench.lookup", "gsqbench.augment",
                 "gsqbench.manifest", "gsqbench.tensorfile", "gsqbench.data", "gsqbench.losses", "gsqbench.models", "gsqbench.metrics", "gsqbench.checkpoints",
                 "gsqbench.importers", "gsqbench.export", "gsqbench.compat")),
    ("stages", ("gsqbench.evaluate", "gsqbench.eval_resume", "gsqbench.train", "gsqbench.tokens")),
    ("orchestration", ("gsqbench.validate", "gsqbench.runner")),
    ("interface", ("gsqbench.commands", "gsqbench.cli", "gsqbench.__main__")),
]
#: modules that never import torch, directly, lazily or through another gsqbench module
NO_TORCH = ("gsqbench", "gsqbench.errors", "gsqbench.io", "gsqbench.locks", "gsqbench.progress", "gsqbench.config",
            "gsqbench.card", "gsqbench.results", "gsqbench.registry", "gsqbench.weights", "gsqbench.effective",
            "gsqbench.modes", "gsqbench.regress",
            "gsqbench.report", "gsqbench.stats", "gsqbench.compare")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[0]


@lru_cache(maxsize=None)
def direct_imports(module: str) -> frozenset[str]:
    """Every module `module` imports anywhere in its source (top-level, inside functions, TYPE_CHECKING)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return frozenset(out)


def _type_checking_only(module: str) -> frozenset[str]:
    """Imports that only happen under `if TYPE_CHECKING:` (annotations; never executed)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    out |= {a.name for a in sub.names}
                elif isinstance(sub, ast.ImportFrom) and sub.module:
                    out.add(sub.module)
    return frozenset(out)


def runtime_imports(module: str) -> frozenset[str]:
    return direct_imports(module) - _type_checking_only(module)


@lru_cache(maxsize=None)
def reachable(module: str) -> frozenset[str]:
    """Modules (gsqbench and third-party roots) reachable from `module` through runtime imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        for dep in runtime_imports(m):
            if dep in seen:
                continue
            seen.add(dep)
            if dep in MODULES:
                todo.append(dep)
    return frozenset(seen)


def _gsqbench(names) -> list[str]:
    return sorted(n for n in names if n in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module: str) -> None:
    mine = _layer(module)
    bad = [dep for dep in _gsqbench(direct_imports(module)) if _layer(dep) > mine]
    assert not bad, f"{module} ({LAYERS[mine][0]}) imports higher layers: {bad}"


def _no_torch(module: str) -> bool:
    return module in NO_TORCH or any(module.startswith(p + ".") for p in NO_TORCH if p != "gsqbench")


def test_every_base_and_view_module_is_torch_free_by_rule() -> None:
    assert all(_no_torch(m) for m in MODULES if _layer(m) <= 1)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _no_torch(m)))
def test_report_regress_results_config_never_reach_torch(module: str) -> None:
    hits = sorted(n for n in reachable(module) if n == "torch" or n.startswith("torch.") or n == "torchvision")
    assert not hits, f"{module} reaches {hits[0]}"


def test_config_is_a_leaf() -> None:
    # gsqbench.modes is the table of evaluation modes (data only, itself importing only gsqbench.errors)
    assert _gsqbench(direct_imports("gsqbench.config")) == ["gsqbench.errors", "gsqbench.io", "gsqbench.modes"]
    assert _gsqbench(direct_imports("gsqbench.modes")) == ["gsqbench.errors"]


def test_models_never_import_evaluation_training_or_reporting() -> None:
    for module in (m for m in MODULES if m.startswith("gsqbench.models")):
        for dep in _gsqbench(reachable(module)):
            assert not dep.startswith(("gsqbench.evaluate", "gsqbench.train", "gsqbench.metrics",
                                       "gsqbench.runner", "gsqbench.report", "gsqbench.regress")), (module, dep)


def test_only_the_cli_imports_commands() -> None:
    for module in MODULES:
        if module.startswith(("gsqbench.commands", "gsqbench.cli")):
            continue
        assert not [d for d in direct_imports(module) if d.startswith("gsqbench.commands")], module


def test_nothing_imports_a_module_called_tokenizers() -> None:
    for path in [*PKG.rglob("*.py"), *(REPO / "tokenizers").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(n == "tokenizers" or n.startswith("tokenizers.") for n in names), path


def test_the_checker_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy import inside a function counts: a report module importing torch there is caught."""
    src = "def f():\n    import torch\n    from gsqbench.evaluate import evaluate\n"
    monkeypatch.setitem(MODULES, "gsqbench.report.fake", PKG / "report" / "fake.py")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: src)
    direct_imports.cache_clear()
    try:
        assert "torch" in direct_imports("gsqbench.report.fake")
        assert _layer("gsqbench.evaluate") > _layer("gsqbench.report.fake")
    finally:
        direct_imports.cache_clear()


def test_docs_state_the_same_layers() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, prefixes in LAYERS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {name} ")), None)
        assert row is not None, f"docs/architecture.md has no row for layer '{name}'"
        listed = set(re.findall(r"`([a-z_.]+)`", row))
        assert listed == {p.removeprefix("gsqbench.") or "gsqbench" for p in prefixes}, (name, listed)
