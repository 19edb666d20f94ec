"""Name → class registries for the three extension points (quantizers, metrics, discriminators) and plugin discovery.

One generic `Registry` (register / get / names / build) in the spirit of timm's model registry. Three instances:
`QUANTIZERS` (the subjects under test), `METRICS` (evaluation metrics, gsqbench.metrics.base.Metric subclasses) and
`DISCRIMINATORS` (GAN discriminators). A plugin is one `*.py` file whose `@register_quantizer`, `@register_metric`
or `@register_discriminator` decorators do the registering; `discover()` loads, once each:
- the built-in quantizers: the repository's top-level `tokenizers/` folder (a source checkout or editable install)
  or the copy shipped inside the wheel (`gsqbench/_builtin_tokenizers`); never `site-packages/tokenizers`,
  which is the Hugging Face package's folder;
- the built-in metric and discriminator modules (`BUILTIN_MODULES`);
- directories given with `--plugins DIR` or `GSQBENCH_PLUGINS`, and entry points of the groups
  `gsqbench.plugins` and `gsqbench.tokenizers`.
Files are loaded **by path** under private module names (`_gsqbench_tokenizers.<stem>`), so nothing ever imports a
module called `tokenizers` and the PyPI package of that name keeps working beside this project.

`build` checks constructor kwargs against the class signature (unknown names, missing required ones,
and the types of annotated fields), so a typo in a YAML file fails at load time with one line.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import logging
import sys
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from gsqbench.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

T = TypeVar("T")

ENTRY_POINT_GROUPS = ("gsqbench.plugins", "gsqbench.tokenizers")
_BUILTIN_PACKAGE = "_gsqbench_tokenizers"  # private name space for tokenizers/*.py
_PLUGIN_PACKAGE = "_gsqbench_plugins"  # private name space for --plugins files
#: modules whose import registers the built-in metrics and discriminators
BUILTIN_MODULES = (
    "gsqbench.metrics.pixel", "gsqbench.metrics.lpips", "gsqbench.metrics.fid", "gsqbench.metrics.rfd_dinov2",
    "gsqbench.metrics.kid", "gsqbench.metrics.prc", "gsqbench.metrics.codebook", "gsqbench.metrics.cost",
    "gsqbench.models.discriminator",
)


def builtin_tokenizers_dir() -> Path | None:
    """Where the built-in quantizer files live: the copy inside an installed wheel, else the source checkout's
    top-level `tokenizers/` (recognised by the pyproject.toml beside it, so an unrelated `site-packages/tokenizers`
    folder, e.g. the Hugging Face package, is never scanned)."""
    packaged = Path(__file__).resolve().parent / "_builtin_tokenizers"
    if packaged.is_dir():
        return packaged
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if (root / "tokenizers").is_dir() and pyproject.is_file() and 'name = "gsqbench"' in pyproject.read_text("utf-8"):
        return root / "tokenizers"
    return None


TOKENIZERS_DIR = builtin_tokenizers_dir()


class Registry(Generic[T]):
    """A named collection of classes (or factories) with did-you-mean lookup and checked construction."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # used in messages: "unknown quantizer 'gqs'"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REG.register("gsq")`. Registering the same object twice is a no-op."""

        def decorator(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj:
                raise UserError(
                    f"{self.kind} '{name}' is defined twice: in {_origin(old)} and in {_origin(obj)}; rename one"
                )
            self._items[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}{did_you_mean(str(name), self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def registration_order(self) -> list[str]:
        """Names in the order they were registered (built-ins first: discover() loads them before plugins)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def build(self, name: str, kwargs: Mapping[str, Any]) -> Any:
        """Construct `name` with `kwargs` after checking them against its signature."""
        obj = self.get(name)
        where = f"{self.kind} '{name}'"
        check_kwargs(obj, dict(kwargs), where=where)
        try:
            return obj(**kwargs)  # type: ignore[operator]
        except UserError as exc:  # semantic checks inside the constructor: say which subject
            raise UserError(f"{where}: {exc}") from exc


def _origin(obj: object) -> str:
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    return str(getattr(module, "__file__", None) or getattr(obj, "__module__", "?"))


# ---------------------------------------------------------------------------------------------------
# kwargs checking


def _signature_and_hints(obj: Any) -> tuple[inspect.Signature, dict[str, Any]]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to name checks only
        hints = {}
    return sig, hints


def check_kwargs(obj: Any, kwargs: dict[str, Any], *, where: str) -> None:
    """Raise a one-line UserError for unknown/missing kwargs or values of the wrong annotated type."""
    sig, hints = _signature_and_hints(obj)
    params = {
        n: p for n, p in sig.parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    valid = ", ".join(params)
    for key in kwargs:
        if key not in params and not accepts_any:
            raise UserError(f"{where}: unknown option {key!r}{did_you_mean(str(key), params)} (valid: {valid})")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in kwargs:
            raise UserError(f"{where}: missing required option {name!r} (valid: {valid})")
    for key, value in kwargs.items():
        if key in hints:
            problem = _type_problem(value, hints[key])
            if problem:
                raise UserError(f"{where}: {key}: {problem}, got {value!r}")


def with_defaults(obj: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` plus every keyword default of `obj`'s signature it does not set (JSON-able defaults only): the
    settings a subject actually runs with, for results and reports (which never import the class)."""
    sig, _ = _signature_and_hints(obj)
    out = {}
    for name, p in sig.parameters.items():
        if name == "self" or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if name in kwargs:
            out[name] = kwargs[name]
        elif p.default is not inspect.Parameter.empty and (p.default is None or isinstance(p.default, (bool, int, float, str))):
            out[name] = p.default
    out.update({k: v for k, v in kwargs.items() if k not in out})
    return out


def plugin_dirs() -> list[Path]:
    """The `--plugins` directories added so far (child processes of `run --jobs` add the same)."""
    return list(_plugin_dirs)


def _type_problem(value: Any, hint: Any) -> str | None:
    """None if `value` fits `hint`, else a short description of what is expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        return "expected " + " or ".join(p.removeprefix("expected ") for p in problems if p)
    if hint is type(None):
        return None if value is None else "expected null"
    if origin is typing.Literal:
        return None if value in args else f"expected one of {', '.join(repr(a) for a in args)}"
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "expected a number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    if origin in (list, tuple, Iterable, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "expected a list"
        if args and args[0] is not Ellipsis:
            for item in value:
                problem = _type_problem(item, args[0])
                if problem:
                    return f"expected a list whose items are: {problem.removeprefix('expected ')}"
        return None
    return None  # unchecked annotation (a class, a callable ...)


# ---------------------------------------------------------------------------------------------------
# the three extension points

QUANTIZERS: Registry[type] = Registry("quantizer")
METRICS: Registry[type] = Registry("metric")
DISCRIMINATORS: Registry[type] = Registry("discriminator")


def register_quantizer(name: str) -> Callable[[type], type]:
    """Decorator used by the files in `tokenizers/` and plugin directories."""
    return QUANTIZERS.register(name)


def register_metric(name: str) -> Callable[[type], type]:
    """Decorator for a gsqbench.metrics.base.Metric subclass (docs/contracts.md "Metrics")."""
    return METRICS.register(name)


def register_discriminator(name: str) -> Callable[[type], type]:
    """Decorator for a GAN discriminator module class (docs/contracts.md "Discriminators")."""
    return DISCRIMINATORS.register(name)


_loaded_files: set[Path] = set()
_plugin_dirs: list[Path] = []
_entry_points_loaded = False
_builtins_loaded = False


def _ensure_package(name: str) -> None:
    # a parent entry in sys.modules keeps dotted private names well-formed (pickling, get_type_hints)
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = pkg


def _module_name(path: Path, builtin: bool) -> str:
    if builtin:
        return f"{_BUILTIN_PACKAGE}.{path.stem}"
    tag = hashlib.sha1(str(path.parent).encode()).hexdigest()[:10]
    return f"{_PLUGIN_PACKAGE}.d{tag}_{path.stem}"


def load_file(path: str | Path, *, builtin: bool = False) -> None:
    """Execute one plugin file by path (once); its `@register_*` calls do the registering."""
    path = Path(path).resolve()
    if path in _loaded_files:
        return
    name = _module_name(path, builtin)
    _ensure_package(name.rsplit(".", 1)[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin {path}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _loaded_files.add(path)  # before exec: a failing file is reported once, not re-run on every call
    try:
        spec.loader.exec_module(module)
    except UserError as exc:
        sys.modules.pop(name, None)
        raise UserError(f"plugin {path}: {exc}") from exc
    except Exception as exc:  # a plugin may fail in any way; the user needs the file and the reason
        sys.modules.pop(name, None)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UserError(f"plugin {path} failed to load: {reason}") from exc
    log.debug("loaded plugin file %s as %s", path, name)


def _load_dir(directory: Path, *, builtin: bool) -> None:
    for path in sorted(directory.glob("*.py")):
        if not path.name.startswith("_"):  # leading underscore: private helper, not a plugin
            load_file(path, builtin=builtin)


def add_plugin_dirs(dirs: Iterable[str | Path]) -> None:
    """Register extra plugin directories (the CLI's `--plugins DIR`) and load them now."""
    for d in dirs:
        path = Path(d).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"--plugins: {d} is not a directory")
        if path not in _plugin_dirs:
            _plugin_dirs.append(path)
    discover()


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            try:
                ep.load()  # importing the target runs its @register_* decorators
            except UserError:
                raise
            except Exception as exc:
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())
                raise UserError(f"entry point {ep.name!r} ({ep.value}) in group {group} failed: {reason}") from exc


def _load_builtin_modules() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def discover() -> None:
    """Load every plugin source not loaded yet (idempotent): built-in quantizer files, metric and discriminator
    modules, `--plugins` dirs, the `GSQBENCH_PLUGINS` environment variable (dirs separated by os.pathsep: lets
    `pytest tests/test_*_contract.py` check a user's plugins) and the entry-point groups."""
    if TOKENIZERS_DIR is not None:
        _load_dir(TOKENIZERS_DIR, builtin=True)
    _load_builtin_modules()
    env_dirs = [d for d in os.environ.get("GSQBENCH_PLUGINS", "").split(os.pathsep) if d]
    if env_dirs and any(Path(d).expanduser().resolve() not in _plugin_dirs for d in env_dirs):
        add_plugin_dirs(env_dirs)  # loads them (and re-enters here once, with nothing new to add)
    for d in list(_plugin_dirs):
        _load_dir(d, builtin=False)
    _load_entry_points()


def discover_quantizers() -> Registry[type]:
    """`discover()`, then the quantizer registry."""
    discover()
    return QUANTIZERS


def discover_metrics() -> Registry[type]:
    discover()
    return METRICS


def discover_discriminators() -> Registry[type]:
    discover()
    return DISCRIMINATORS


def build_quantizer(cfg: Mapping[str, Any]) -> Any:
    """`{"name": "gsq", **kwargs}` → a quantizer module (unknown name or bad kwarg → UserError)."""
    if not isinstance(cfg, Mapping):
        raise UserError(f"quantizer: expected a mapping with a 'name' key, got {cfg!r}")
    discover()
    if "name" not in cfg:
        raise UserError(f"quantizer: missing 'name' (valid: {', '.join(QUANTIZERS.names())})")
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return QUANTIZERS.build(cfg["name"], kwargs)


def build_discriminator(name: str, kwargs: Mapping[str, Any]) -> Any:
    """A registered discriminator with checked kwargs (unknown name or bad kwarg → UserError)."""
    discover()
    return DISCRIMINATORS.build(name, kwargs)


def describe(obj: Any) -> str:
    """First line of the docstring (what `gsqbench list` shows)."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
