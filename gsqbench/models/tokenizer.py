"""The Tokenizer: encoder → (1×1 projection) → quantizer → (1×1 projection) → decoder.

Images cross the boundary as float (b, 3, H, W) in **[-1, 1]** (the official `Normalize(0.5, 0.5)` range,
gsq-reference.md §3.6); decoder output is unclamped. The quantizer is mounted under the attribute name
`quantizers` (plural) so the official key `quantizers.codebook.weight` loads without renaming; the
`quantizer` property is the name the rest of gsqbench uses. Projections exist only when the quantizer's
`dim` differs from the backbone's `embedding_dim` (e.g. FSQ/LFQ latents), and the decoder's adaptive
GroupNorm is conditioned on the decoder input, i.e. after `proj_out`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import Tensor, nn

from gsqbench.errors import UserError
from gsqbench.models.autoencoder import AutoencoderConfig, Decoder, Encoder, PRESETS, preset_config
from gsqbench.quantizer import QuantizerOutput


class Tokenizer(nn.Module):
    """Image tokenizer with `encode`, `decode`, `decode_indices` and `forward` (docs/contracts.md)."""

    def __init__(self, config: AutoencoderConfig, quantizer: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        qdim = int(getattr(quantizer, "dim"))
        needs_proj = qdim != config.embedding_dim
        self.proj_in = nn.Conv2d(config.embedding_dim, qdim, 1) if needs_proj else None
        self.proj_out = nn.Conv2d(qdim, config.embedding_dim, 1) if needs_proj else None
        self.quantizers = quantizer

    @property
    def quantizer(self) -> nn.Module:
        return self.quantizers

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_images(self, x: Tensor) -> None:
        f, c = self.downsample_factor, self.config.input_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise UserError(
                f"images: shape {tuple(x.shape)} is not (b, {c}, H, W) with H and W divisible by the "
                f"downsampling factor {f}"
            )

    def encode(self, x: Tensor) -> QuantizerOutput:
        """x in [-1, 1], (b, 3, H, W) → QuantizerOutput with z_q in quantizer space (b, dim, H/f, W/f)."""
        self._check_images(x)
        z = self.encoder(x)
        if self.proj_in is not None:
            z = self.proj_in(z)
        return self.quantizers(z)

    def decode(self, z_q: Tensor) -> Tensor:
        """Quantised latent (b, dim, h, w) → unclamped image (b, 3, h·f, w·f)."""
        if self.proj_out is not None:
            z_q = self.proj_out(z_q)
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(b, h, w, g) int64 codes → image; equals decode(encode(x).z_q) in eval mode, under bf16 autocast too
        (codebook quantizers return their fp32 rows as z_q, so both paths decode the same tensor)."""
        return self.decode(self.quantizers.indices_to_codes(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        out = self.encode(x)
        return self.decode(out.z_q), out


def resolve_model_config(model: Mapping[str, Any], quantizer_dim: int | None = None) -> AutoencoderConfig:
    """`{"preset": ..., "latent_dim": D, **AutoencoderConfig overrides}` → AutoencoderConfig.

    Without `preset` the official class defaults are the base. `latent_dim` is an alias of
    `embedding_dim`; when neither is given the backbone latent matches the quantizer's `dim`.
    """
    if not isinstance(model, Mapping):
        raise UserError(f"model: expected a mapping, got {model!r}")
    values = dict(model)
    preset = values.pop("preset", None)
    latent = values.pop("latent_dim", None)
    if latent is not None and "embedding_dim" in values and values["embedding_dim"] != latent:
        raise UserError(
            f"model.latent_dim: {latent!r} conflicts with model.embedding_dim {values['embedding_dim']!r}; give one"
        )
    if latent is not None:
        values["embedding_dim"] = latent
    if "embedding_dim" not in values and quantizer_dim is not None:
        values["embedding_dim"] = quantizer_dim
    if preset is None:
        return AutoencoderConfig.from_dict(values)
    if not isinstance(preset, str):
        raise UserError(f"model.preset: {preset!r} is not a name (valid: {', '.join(sorted(PRESETS))})")
    base = preset_config(preset, values.pop("embedding_dim", PRESETS.get(preset, AutoencoderConfig()).embedding_dim))
    AutoencoderConfig.check_keys(values)  # did-you-mean for typos before replace() re-validates the whole config
    return dataclasses.replace(base, **values)


def build_tokenizer(model: Mapping[str, Any], quantizer: Mapping[str, Any]) -> Tokenizer:
    """Build the backbone from `model` and the quantizer through the registry (`{"name": ..., **kwargs}`)."""
    from gsqbench.registry import build_quantizer  # the registry loads plugin files: import on use only

    q = build_quantizer(quantizer)
    cfg = resolve_model_config(model, quantizer_dim=int(getattr(q, "dim")))
    return Tokenizer(cfg, q)
