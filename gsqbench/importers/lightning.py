"""Read release files without running pickled code: torch checkpoints (incl. PyTorch Lightning) and safetensors.

Torch files are only ever opened with `torch.load(weights_only=True)`. Some Lightning checkpoints pickle a
reference to a callback class (PyTorch Lightning 1.x keyed `checkpoint["callbacks"]` by the callback's TYPE,
e.g. taming's `last.ckpt` holds `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`) or an
`argparse.Namespace` of hyper-parameters. Those globals, and exactly those (`STAND_INS`), are mapped to inert
stand-in classes defined here: the weights-only unpickler instantiates the stand-in (plain `object.__new__`)
and stores its state as data; no Lightning or argparse code is imported or run. Before loading, the file is
statically scanned with `torch.serialization.get_unsafe_globals_in_checkpoint`; any other global (a function
such as `posix.system`, any other class) makes the whole file refused with one line, and nothing in it is
unpickled. There is no fallback to `weights_only=False`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gsqbench.tensorfile import pickle_refusal, torch_load_tensors, unsafe_pickle_globals
from gsqbench.errors import UserError

log = logging.getLogger(__name__)

_CALLBACK_MODULES = ("pytorch_lightning.callbacks", "lightning.pytorch.callbacks")
# (module under a callbacks package, class) of the stateful built-in callbacks Lightning 1.x keyed by type
_CALLBACK_CLASSES = (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"))


class InertStandIn:
    """Holds whatever state the pickle gives it as plain data; never calls upstream code."""

    pickled_name: str = ""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["pickled_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


def _stand_in(name: str) -> type:
    # one class per global, so that two callback types used as dict keys stay two keys
    return type(f"StandIn[{name}]", (InertStandIn,), {"pickled_name": name, "__module__": __name__})


STAND_INS: dict[str, type] = {
    f"{pkg}.{module}.{cls}": _stand_in(f"{pkg}.{module}.{cls}")
    for pkg in _CALLBACK_MODULES for module, cls in _CALLBACK_CLASSES
}
STAND_INS["argparse.Namespace"] = _stand_in("argparse.Namespace")


def _load_weights_only(path: Path, stand_ins: list[str]) -> Any:
    return torch_load_tensors(path, {name: STAND_INS[name] for name in stand_ins})


def read_checkpoint(path: str | Path) -> tuple[Any, list[str]]:
    """(object, stand-in globals used) from a `.safetensors` file or a torch/Lightning checkpoint.

    Safetensors files come back as a {name: tensor} dict. Torch files are scanned, then loaded weights-only
    with the allow-listed stand-ins that the scan found (and no others).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"release file {p}: not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(p, device="cpu"), []
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{p}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    unsafe = unsafe_pickle_globals(p)
    if unsafe is None:
        return _load_weights_only(p, []), []
    refused = [name for name in unsafe if name not in STAND_INS]
    if refused:
        raise pickle_refusal(p, refused)
    if unsafe:
        log.info("%s: reading %s as inert stand-ins", p, ", ".join(unsafe))
    return _load_weights_only(p, unsafe), unsafe
