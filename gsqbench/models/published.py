"""Published tokenizers behind gsqbench's Tokenizer contract, and the registry that rebuilds them by name.

`PublishedTokenizer` is the common wrapper: it keeps the upstream module tree (so upstream state-dict keys load
strictly) and exposes the contract of docs/contracts.md "Models": images enter and leave in [-1, 1]
(b, 3, H, W); `encode(x) -> QuantizerOutput` (indices (b, h, w, 1) int64), `decode(z_q)` (unclamped),
`decode_indices(indices)`, `forward(x)`, and `.quantizer` with `dim`, `codebook_size`, `groups`,
`indices_to_codes`. An upstream that works in another pixel range (MaskGIT: [0, 1]) converts inside
`to_model_input` / `from_model_output`, so the evaluator never needs to know.

`ARCHITECTURES` maps the `architecture` name written into a gsqbench checkpoint's `model.json` to a builder
`(model_spec, quantizer_spec) -> PublishedTokenizer`; `gsqbench.checkpoints` uses `build_architecture` to
rebuild an imported tokenizer from its own checkpoint directory.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from torch import Tensor, nn

from gsqbench.errors import UserError, did_you_mean
from gsqbench.quantizer import QuantizerOutput

Builder = Callable[[Mapping[str, Any], Mapping[str, Any]], "PublishedTokenizer"]
ARCHITECTURES: dict[str, Builder] = {}
# modules whose import registers the built-in architectures (imported on first use: they pull in torch models)
_BUILTIN_MODULES = ("gsqbench.models.llamagen", "gsqbench.models.magvit2", "gsqbench.models.maskgit",
                    "gsqbench.models.taming")

C = TypeVar("C")


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    def deco(builder: Builder) -> Builder:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not builder:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = builder
        return builder
    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def build_architecture(name: Any, model: Mapping[str, Any], quantizer: Mapping[str, Any]) -> "PublishedTokenizer":
    """Rebuild a published tokenizer (random weights) from the specs its importer wrote."""
    _load_builtins()
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise UserError(f"model.json: architecture {name!r} is not known{did_you_mean(str(name), ARCHITECTURES)}")
    if not isinstance(model, Mapping) or not isinstance(quantizer, Mapping):
        raise UserError(f"model.json: 'model' and 'quantizer' must be mappings for architecture {name!r}")
    return ARCHITECTURES[name](model, quantizer)


def config_from_dict(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """A frozen config dataclass from a JSON mapping: unknown keys are a UserError, lists become tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], fields)}")
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**clean)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None


def check_positive(where: str, **values: Any) -> None:
    for name, value in values.items():
        items = value if isinstance(value, tuple) else (value,)
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
            raise UserError(f"{where}.{name}: {value!r} must be positive integer(s)")


def quantizer_kwargs(spec: Mapping[str, Any], name: str, required: tuple[str, ...],
                     optional: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments from a `{"name": ..., ...}` quantizer spec; wrong name, missing or unknown keys are a
    one-line UserError."""
    if spec.get("name") != name:
        raise UserError(f"model.json: quantizer name {spec.get('name')!r} does not fit this architecture "
                        f"(expected {name!r})")
    values = {k: v for k, v in spec.items() if k != "name"}
    unknown = [k for k in values if k not in required and k not in optional]
    if unknown:
        raise UserError(f"model.json: quantizer key {unknown[0]!r} is not known for {name!r}"
                        f"{did_you_mean(unknown[0], [*required, *optional])}")
    missing = [k for k in required if k not in values]
    if missing:
        raise UserError(f"model.json: quantizer spec for {name!r} lacks {', '.join(missing)}")
    return {**dict(optional), **values}


class PublishedTokenizer(nn.Module):
    """Base of the imported tokenizers; subclasses build `encoder`, `decoder`, `quantize` and implement
    `latent` (image in the upstream's range → quantizer input) and `decode_latent` (z_q → upstream output)."""

    architecture: ClassVar[str] = ""
    config: Any

    @property
    def quantizer(self) -> nn.Module:
        return self.quantize

    @property
    def downsample_factor(self) -> int:
        raise NotImplementedError

    def to_model_input(self, x: Tensor) -> Tensor:
        """[-1, 1] images → the upstream's input range (identity unless overridden)."""
        return x

    def from_model_output(self, y: Tensor) -> Tensor:
        """The upstream's output range → [-1, 1] (identity unless overridden)."""
        return y

    def latent(self, x: Tensor) -> Tensor:
        """Upstream-range images → the latent the quantizer sees (after any quant_conv)."""
        raise NotImplementedError

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Quantised latent → upstream-range images (after any post_quant_conv)."""
        raise NotImplementedError

    def _check_images(self, x: Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f:
            raise UserError(f"images: shape {tuple(x.shape)} is not (b, 3, H, W) with H and W divisible by the "
                            f"downsampling factor {f}")

    def encode(self, x: Tensor) -> QuantizerOutput:
        """x in [-1, 1], (b, 3, H, W) → QuantizerOutput, z_q (b, dim, H/f, W/f), indices (b, H/f, W/f, 1)."""
        self._check_images(x)
        return self.quantize(self.latent(self.to_model_input(x)))

    def decode(self, z_q: Tensor) -> Tensor:
        """Quantised latent → unclamped image in [-1, 1] convention."""
        return self.from_model_output(self.decode_latent(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantize.indices_to_codes(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        out = self.encode(x)
        return self.decode(out.z_q), out
