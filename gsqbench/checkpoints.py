"""Tokenizer checkpoints: gsqbench's own format, training state, and safe loading of foreign files.

Own format (docs/contracts.md): a directory with `model.safetensors` (weights, no pickle) and `model.json`
(`{"format": "gsqbench-tokenizer", "version": 1, "model": ..., "quantizer": ..., "meta": ...}`), which
rebuilds the model on its own. Training state is a separate `torch.save` file restricted to tensors and
plain containers, so it always loads with `weights_only=True`.

`load_tokenizer` also accepts an official GSQ release folder (`checkpoint.pt` + `config.yaml`), read by
gsqbench.importers.gsq_official. Every load is strict; a mismatch is a one-line UserError listing the first
missing/unexpected keys and shape mismatches; foreign `.pt` files are read through gsqbench.tensorfile (weights_only=True, pickled code refused).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes, atomic_write_json, sha256_file
from gsqbench.tensorfile import torch_load_tensors
from gsqbench.models.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

FORMAT = "gsqbench-tokenizer"
VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
OFFICIAL_CHECKPOINT = "checkpoint.pt"
OFFICIAL_CONFIG = "config.yaml"
_SHOW = 5  # how many offending keys a mismatch message lists


# --------------------------------------------------------------------------------------------- helpers


def short_list(items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def state_dict_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str | None:
    """One-line description of how `given` differs from `expected` (keys and shapes), or None if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {short_list(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {short_list(shapes)}")
    return "; ".join(parts) or None


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with a readable UserError instead of a RuntimeError."""
    problem = state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise UserError(f"{source}: weights do not fit the model architecture ({problem})")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------- own format


def save_tokenizer(
    directory: str | Path,
    tok: Tokenizer,
    model_spec: Mapping[str, Any] | None,
    quantizer_spec: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model.safetensors` then `model.json` (atomically, JSON last so a complete JSON means complete files).

    `model` in the JSON is the fully resolved AutoencoderConfig (plus the preset name, for information),
    so the directory rebuilds the same model even if presets change later.
    """
    from safetensors.torch import save as st_save

    if not isinstance(quantizer_spec, Mapping) or "name" not in quantizer_spec:
        raise ValueError(f"quantizer_spec must be a mapping with a 'name' key, got {quantizer_spec!r}")
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tok.state_dict().items()}
    weights = atomic_write_bytes(directory / WEIGHTS_FILE, st_save(tensors))
    model = tok.config.to_dict()
    if model_spec and model_spec.get("preset") is not None:
        model = {"preset": model_spec["preset"], **model}
    architecture = getattr(tok, "architecture", None)  # published tokenizers (gsqbench.models.published)
    atomic_write_json(directory / MODEL_JSON, {
        "format": FORMAT,
        "version": VERSION,
        **({"architecture": architecture} if architecture else {}),
        "model": model,
        "quantizer": dict(quantizer_spec),
        "meta": dict(meta or {}),
        "weights_sha256": sha256_file(weights),
    })
    return directory


def _read_model_json(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise UserError(f"{path}: 'format' is {spec.get('format') if isinstance(spec, dict) else spec!r}, "
                        f"expected '{FORMAT}'")
    if spec.get("version") != VERSION:
        raise UserError(f"{path}: version {spec.get('version')!r} is not supported (supported: {VERSION})")
    for key in ("model", "quantizer"):
        if not isinstance(spec.get(key), dict):
            raise UserError(f"{path}: '{key}' must be a mapping, got {spec.get(key)!r}")
    return spec


def _load_own(directory: Path) -> tuple[Tokenizer, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = _read_model_json(directory / MODEL_JSON)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights}: missing (a gsqbench checkpoint needs {MODEL_JSON} and {WEIGHTS_FILE})")
    expected_sha = spec.get("weights_sha256")
    if expected_sha and sha256_file(weights) != expected_sha:
        raise UserError(f"{weights}: sha256 differs from {MODEL_JSON} (file changed or truncated)")
    if "architecture" in spec:  # an imported published tokenizer: rebuilt by its registered builder
        from gsqbench.models.published import build_architecture

        tok = build_architecture(spec["architecture"], spec["model"], spec["quantizer"])
    else:
        tok = build_tokenizer(spec["model"], spec["quantizer"])
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    load_state_strict(tok, state, str(weights))
    meta = dict(spec.get("meta") or {})
    meta.setdefault("model_spec", spec["model"])
    meta.setdefault("quantizer_spec", spec["quantizer"])
    return tok.eval(), meta


def load_tokenizer(
    path: str | Path, *, official_flags: Mapping[str, Any] | None = None
) -> tuple[Tokenizer, dict[str, Any]]:
    """Load our checkpoint directory, an official release folder (`config.yaml` + `checkpoint.pt`), or a
    published release file (LlamaGen, Open-MAGVIT2, MaskGIT, taming; gsqbench.importers.releases).

    A path to one of the files inside a directory is accepted too. The model comes back on CPU in eval mode.
    `official_flags` supplies quantizer flags an official folder without `config.yaml` cannot provide.
    """
    p = Path(path)
    if p.is_file() and p.name not in (MODEL_JSON, WEIGHTS_FILE, OFFICIAL_CHECKPOINT, OFFICIAL_CONFIG):
        from gsqbench.importers.releases import load_release  # a published release file (LlamaGen, taming, ...)

        return load_release(p)
    if p.is_file():
        p = p.parent
    if (p / MODEL_JSON).is_file():
        return _load_own(p)
    if (p / OFFICIAL_CHECKPOINT).is_file():
        from gsqbench.importers.gsq_official import read_official

        imported = read_official(p, official_flags)
        tok = build_tokenizer(imported.model, imported.quantizer)
        load_state_strict(tok, imported.state_dict, str(p / OFFICIAL_CHECKPOINT))
        return tok.eval(), imported.meta
    raise UserError(
        f"checkpoint {path}: not found; expected a directory with {MODEL_JSON} + {WEIGHTS_FILE} (gsqbench) "
        f"or {OFFICIAL_CHECKPOINT} [+ {OFFICIAL_CONFIG}] (official GSQ release)"
    )


# ----------------------------------------------------------------------------------------- train state

_PLAIN = (Tensor, int, float, bool, str, bytes, type(None))


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"train state {where}: key {key!r} must be a string or an integer")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"train state {where}: {type(value).__name__} is not allowed (tensors, numbers, strings, lists, dicts only)"
    )


def save_train_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically `torch.save` optimizer/EMA/step/RNG state restricted to types `weights_only=True` accepts."""
    _check_plain(dict(state), "state")
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_train_state(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"train state {p}: file not found")
    state = torch_load_tensors(p)
    if not isinstance(state, dict):
        raise UserError(f"train state {p}: expected a dict, found {type(state).__name__}")
    return state
