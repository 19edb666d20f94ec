"""Safe reading of torch files that must hold only tensors: the one pickle refusal, one-line errors, no fallback.

Every foreign `.pt`/`.pth`/`.ckpt` gsqbench reads (official releases, published tokenizers, pretrained networks for
metrics and discriminators, training state) goes through `torch_load_tensors`: a static scan refuses pickled code
references before anything is unpickled, then `torch.load(weights_only=True)` reads it. There is never a fallback
to `weights_only=False`.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from gsqbench.errors import UserError


def pickle_refusal(path: str | Path, names: list[str]) -> UserError:
    """The one message for a file that carries pickled code references (every torch file reader uses it)."""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return UserError(f"refusing to load {path}: it contains executable pickle content ({shown}); only tensor "
                     "checkpoints are accepted")


def unsafe_pickle_globals(path: str | Path) -> list[str] | None:
    """Pickle globals in a torch file outside torch's weights-only allow-list, found by static disassembly (nothing
    is executed). None when the file cannot be scanned (the legacy non-zip format, or not a torch file): it is then
    loaded weights-only, whose unpickler refuses every global it does not allow."""
    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except Exception:
        return None


def load_error_reason(exc: BaseException) -> str:
    """A short cause from a torch.load error, without torch's advice to retry with weights_only=False."""
    text = str(exc)
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if detail:
        text = detail.group(1)
    if "weights_only" in text:
        text = "the weights-only unpickler rejected its content"
    return " ".join(f"{type(exc).__name__}: {text}".split())[:200]


def torch_load_tensors(path: str | Path, stand_ins: Mapping[str, type] | None = None) -> Any:
    """`torch.load(weights_only=True)` of a file that must hold only tensors and plain containers.

    The file is scanned first: a pickled reference to anything else (a function such as `posix.system`, a class)
    is refused with one line before anything is unpickled; `stand_ins` maps the few globals a caller accepts
    (gsqbench.importers.lightning's inert stand-ins) to the classes that replace them. A broken or foreign file
    is a one-line UserError too. There is no fallback to `weights_only=False`.
    """
    stand_ins = dict(stand_ins or {})
    unsafe = unsafe_pickle_globals(path)
    refused = [name for name in unsafe or [] if name not in stand_ins]
    if refused:
        raise pickle_refusal(path, refused)
    allowed = [(stand_ins[name], name) for name in unsafe or []]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a global the static scan could not see (legacy format): refused the same way
            raise pickle_refusal(path, [found.group(1)]) from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({load_error_reason(exc)})") from None
    except Exception as exc:  # zip/EOF/runtime errors: a truncated or foreign file
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({load_error_reason(exc)})") from None


def load_state_file(path: str | Path, what: str, unwrap: Optional[str] = None) -> dict[str, Tensor]:
    """A pretrained network's weight file as a flat state dict of tensors (optionally `state[unwrap]`, e.g. a
    checkpoint's "model" entry); anything else is a one-line UserError naming `what` and the file."""
    try:
        state = torch_load_tensors(path)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    if unwrap and isinstance(state, dict) and isinstance(state.get(unwrap), dict):
        state = state[unwrap]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{what} {path}: expected a state dict of tensors (got {type(state).__name__})")
    return state


def meta_state_buffer(state: Mapping[str, Tensor]) -> io.BytesIO:
    """A tensor-free copy of `state` (meta tensors of the same shapes and dtypes) as an in-memory torch file: lets a
    third-party constructor that insists on loading a weight file (torch-fidelity's extractors) run its own strict
    key/shape check on the meta device, without reading our file with weights_only=False or spending a random init."""
    buf = io.BytesIO()
    torch.save({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}, buf)
    buf.seek(0)
    return buf
