"""Importer for LlamaGen VQ-16 / VQ-8 releases (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`).

Layout (FoundationVision/LlamaGen `tokenizer/tokenizer_image/reconstruction_vq_ddp.py`): a torch file holding
`{"model": state_dict}`; training checkpoints may also hold "ema", "optimizer", "discriminator", "steps" and
"args" (an argparse.Namespace, read as an inert stand-in). Upstream picks "ema", else "model", else
"state_dict"; so do we unless `weights` says otherwise. The state dict uses the module names of
gsqbench.models.llamagen. Dropped: `quantize.codebook_used` (training-only usage ring buffer).

The architecture comes from tensor shapes; `codebook_l2_norm` cannot be seen in the weights and takes the
upstream default (True), which both releases use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from gsqbench.errors import UserError
from gsqbench.importers.common import Dropped, Release, drop, get, level_indices, tensor_dict, width_multipliers
from gsqbench.models import llamagen

KIND = "llamagen"
UPSTREAM = {"repo": "FoundationVision/LlamaGen", "files": ["tokenizer/tokenizer_image/vq_model.py",
            "tokenizer/tokenizer_image/reconstruction_vq_ddp.py"], "commit": "0b3a62be43fdabf17806b8be2b0bba9e5ff28399"}
VARIANTS = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}
_ORDER = ("ema", "model", "state_dict")  # upstream's preference
SIGNATURE = "encoder.conv_blocks.0.res.0.conv1.weight"


def state_of(obj: Any) -> Mapping[str, Any] | None:
    """The state dict inside a LlamaGen file (upstream preference order), or the file itself if it is one."""
    if isinstance(obj, Mapping):
        for key in _ORDER:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj if isinstance(obj, Mapping) else None


def looks_like(state: Mapping[str, Any]) -> bool:
    return SIGNATURE in state


def _select(obj: Any, weights: str | None, path: Path) -> tuple[dict[str, Tensor], str | None, str]:
    """(state dict, top-level key it came from, "ema" | "raw")."""
    layout = "{'model': state_dict} (LlamaGen release) or a plain state dict"
    if isinstance(obj, Mapping) and any(k in obj for k in _ORDER):
        if weights == "ema":
            if "ema" not in obj:
                raise UserError(f"--weights ema: {path} has no 'ema' entry (it has {sorted(map(str, obj))}); "
                                "use --weights raw")
            key = "ema"
        elif weights == "raw":
            key = next((k for k in ("model", "state_dict") if k in obj), None)
            if key is None:
                raise UserError(f"--weights raw: {path} has only 'ema' weights; use --weights ema")
        else:
            key = next(k for k in _ORDER if k in obj)
        return tensor_dict(obj[key], f"{path} ['{key}']", layout), key, "ema" if key == "ema" else "raw"
    return tensor_dict(obj, str(path), layout), None, "ema" if weights == "ema" else "raw"


def read(obj: Any, path: Path, weights: str | None = None) -> Release:
    state, top_key, which = _select(obj, weights, path)
    dropped: list[Dropped] = []
    rule = drop(state, "quantize.codebook_used", "training-only ring buffer of recent code indices "
                "(codebook_show_usage); not used to encode or decode", exact=True)
    if rule:
        dropped.append(rule)
    where = str(path)
    conv_in = get(state, "encoder.conv_in.weight", where, "LlamaGen VQ")
    ch = int(conv_in.shape[0])
    enc_levels = level_indices(state, r"encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight")
    dec_levels = level_indices(state, r"decoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight")
    enc_mult = width_multipliers(
        [int(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) for i in enc_levels], ch, where)
    dec_mult = width_multipliers(  # stored lowest resolution first: reverse to level order
        [int(state[f"decoder.conv_blocks.{k}.res.0.conv1.weight"].shape[0]) for k in dec_levels][::-1], ch, where)
    cfg = llamagen.LlamaGenConfig(
        in_channels=int(conv_in.shape[1]), ch=ch, encoder_ch_mult=enc_mult, decoder_ch_mult=dec_mult,
        num_res_blocks=len(level_indices(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight")),
        z_channels=int(get(state, "encoder.conv_out.weight", where, "LlamaGen VQ").shape[0]),
    )
    codebook = get(state, "quantize.embedding.weight", where, "LlamaGen VQ")
    qspec = llamagen.quantizer_spec(int(codebook.shape[0]), int(codebook.shape[1]), l2_norm=True)
    full = cfg.ch == 128 and cfg.z_channels == 256 and cfg.num_res_blocks == 2 and qspec["codebook_size"] == 16384 \
        and qspec["dim"] == 8 and enc_mult == dec_mult
    variant = next((name for name, mult in VARIANTS.items() if full and enc_mult == mult), None)
    meta = {
        "variant": variant, "weights": which, "weights_entry": top_key, "input_range": "[-1, 1]",
        "dropped": [d.to_dict() for d in dropped],
        "assumed": {"codebook_l2_norm": "True (upstream default, used by VQ-16 and VQ-8; not visible in weights)"},
        "ignored_entries": sorted(str(k) for k in obj if k != top_key) if top_key else [],
    }
    return Release(KIND, llamagen.ARCHITECTURE, cfg.to_dict(), qspec, state, meta)
