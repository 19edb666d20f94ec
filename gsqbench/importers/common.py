"""Shared pieces of the published-release importers: the `Release` record, state-dict checks, shape reading.

Every importer turns an upstream file into (architecture, model spec, quantizer spec, state dict under our
module's keys, provenance). Keys that are not part of the evaluated model are dropped only by an explicit rule
with a reason (`Dropped`), recorded in the metadata for the protocol card; any other key that does not fit the
rebuilt model is an error (strict loading).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

from torch import Tensor

from gsqbench.checkpoints import state_dict_mismatch
from gsqbench.errors import UserError


@dataclasses.dataclass
class Dropped:
    """Keys left out of the evaluated model by one rule: a prefix (or exact key), how many, and why."""

    prefix: str
    keys: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Release:
    """An upstream file read into our terms; nothing built yet."""

    kind: str
    architecture: str
    model_spec: dict[str, Any]
    quantizer_spec: dict[str, Any]
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]


def tensor_dict(obj: Any, where: str, layout: str) -> dict[str, Tensor]:
    """`obj` as {str: Tensor}, or a one-line UserError naming the expected layout."""
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise UserError(f"{where}: expected {layout}, found {_describe(obj)}")
    return dict(obj)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:5]
        return f"a mapping with keys {keys}{' ...' if len(obj) > 5 else ''}"
    return type(obj).__name__


def get(state: Mapping[str, Tensor], key: str, where: str, kind: str) -> Tensor:
    if key not in state:
        raise UserError(f"{where}: key '{key}' not found; not a {kind} state dict")
    return state[key]


def level_indices(state: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys; must run 0..n−1."""
    rx = re.compile(pattern)
    found = sorted({int(m.group(1)) for k in state if (m := rx.fullmatch(k))})
    if found != list(range(len(found))):
        raise UserError(f"checkpoint: indices {found} of '{pattern}' are not contiguous from 0")
    return found


def width_multipliers(widths: list[int], base: int, where: str) -> tuple[int, ...]:
    if any(w % base for w in widths):
        raise UserError(f"{where}: level widths {widths} are not multiples of the base width {base}")
    return tuple(w // base for w in widths)


@dataclasses.dataclass(frozen=True)
class EncoderLayout:
    """The taming-style encoder shape read from a state dict (`encoder.conv_in`, `encoder.down.<i>.block.<j>`)."""

    in_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    levels: list[int]


def encoder_layout(state: Mapping[str, Tensor], where: str, kind: str) -> EncoderLayout:
    """Base width, per-level multipliers, blocks per level and latent channels of a taming-style encoder (taming
    VQGAN and the MaskGIT VQGAN port share this module tree)."""
    conv_in = get(state, "encoder.conv_in.weight", where, kind)
    ch = int(conv_in.shape[0])
    levels = level_indices(state, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    mult = width_multipliers([int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels], ch, where)
    return EncoderLayout(
        in_channels=int(conv_in.shape[1]), ch=ch, ch_mult=mult,
        num_res_blocks=len(level_indices(state, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")),
        z_channels=int(get(state, "encoder.conv_out.weight", where, kind).shape[0]), levels=levels)


def check_fits(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], source: str) -> None:
    """Strict key/shape check of `given` against a model's state dict; one-line UserError listing offenders."""
    problem = state_dict_mismatch(expected, given)
    if problem:
        raise UserError(f"{source}: weights do not fit the model architecture ({problem})")


def drop(state: dict[str, Tensor], prefix: str, reason: str, exact: bool = False) -> Dropped | None:
    """Remove keys starting with `prefix` (or equal to it when `exact`) from `state`; None when none matched."""
    keys = [k for k in state if (k == prefix if exact else k.startswith(prefix))]
    for k in keys:
        del state[k]
    return Dropped(prefix, len(keys), reason) if keys else None


def dtypes(state: Mapping[str, Tensor]) -> list[str]:
    return sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})
