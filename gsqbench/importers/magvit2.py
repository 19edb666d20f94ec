"""Importer for Open-MAGVIT2 releases (`imagenet_256_L.ckpt` = IN256_L, `imagenet_128_L.ckpt` = IN128_L).

Layout: a Lightning 2.x checkpoint whose `state_dict` holds (TencentARC/SEED-Voken `src/Open_MAGVIT2/models/
lfqgan.py` with `use_ema: True`, and `src/Open_MAGVIT2/modules/ema.py` `LitEma`):
- `encoder.*`, `decoder.*`: the raw (training) weights;
- `loss.*`: discriminator and LPIPS of `VQLPIPSWithDiscriminator` (training-only);
- `model_ema.decay`, `model_ema.num_updates`, and `model_ema.<name without dots>` for EVERY trainable
  parameter of the Lightning module (encoder, decoder and the loss's discriminator).
The authors evaluate inside `ema_scope()` (`evaluation_image.py`), i.e. with the EMA copy, so `weights="ema"`
(the default) maps `model_ema.` + key.replace(".", "") back onto each encoder/decoder key, as upstream's own
`init_from_ckpt` does. The raw copy is still checked strictly against the architecture, then dropped (or used
with `weights="raw"`). Dropped and named: `loss.`, the EMA of the loss modules, the EMA bookkeeping buffers,
and LFQ's non-persistent buffers if a file carries them. LFQ itself has no learned state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from gsqbench.errors import UserError
from gsqbench.importers.common import (Dropped, Release, check_fits, drop, get, level_indices, tensor_dict,
                                       width_multipliers)
from gsqbench.models import magvit2

KIND = "open-magvit2"
UPSTREAM = {"repo": "TencentARC/SEED-Voken", "files": ["src/Open_MAGVIT2/models/lfqgan.py",
            "src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py",
            "src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py", "src/Open_MAGVIT2/modules/ema.py"],
            "commit": "b9a17eac8e2c0779c12a5429b0bfd6c502788484"}
VARIANTS = {"IN256_L": (1, 1, 2, 2, 4), "IN128_L": (1, 2, 2, 4)}
SIGNATURE = "decoder.adaptive.0.gamma.weight"
EMA = "model_ema."
_LFQ_BUFFERS = ("mask", "zero", "codebook", "pre_mask", "post_mask")  # non-persistent upstream; recomputed


def state_of(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj if isinstance(obj, Mapping) else None


def looks_like(state: Mapping[str, Any]) -> bool:
    return SIGNATURE in state


def ema_name(key: str) -> str:
    """LitEma's buffer name for a parameter: dots removed, under `model_ema.`."""
    return EMA + key.replace(".", "")


def _config(state: Mapping[str, torch.Tensor], where: str) -> magvit2.MagvitConfig:
    conv_in = get(state, "encoder.conv_in.weight", where, "Open-MAGVIT2")
    ch = int(conv_in.shape[0])
    levels = level_indices(state, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    mult = width_multipliers([int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels], ch, where)
    return magvit2.MagvitConfig(
        in_channels=int(conv_in.shape[1]), ch=ch, ch_mult=mult,
        out_ch=int(get(state, "decoder.conv_out.weight", where, "Open-MAGVIT2").shape[0]),
        num_res_blocks=len(level_indices(state, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")),
        z_channels=int(get(state, "encoder.conv_out.weight", where, "Open-MAGVIT2").shape[0]),
    )


def read(obj: Any, path: Path, weights: str | None = None) -> Release:
    lightning = isinstance(obj, Mapping) and "state_dict" in obj
    where = f"{path}" + (" ['state_dict']" if lightning else "")
    state = tensor_dict(state_of(obj), where, "a Lightning checkpoint with 'state_dict' (Open-MAGVIT2)")
    which = weights or "ema"
    cfg = _config(state, where)
    with torch.device("meta"):
        expected = magvit2.OpenMagvit2(cfg).state_dict()
    ema_state = {k[len(EMA):]: state[k].item() for k in (EMA + "decay", EMA + "num_updates")
                 if k in state and state[k].numel() == 1}
    dropped: list[Dropped] = []
    for rule in (drop(state, "loss.", "training loss modules (discriminator and LPIPS of VQLPIPSWithDiscriminator)"),
                 drop(state, EMA + "loss", "EMA copies of the loss modules' parameters (LitEma covers every "
                      "trainable parameter of the Lightning module)"),
                 drop(state, EMA + "decay", "LitEma bookkeeping buffer", exact=True),
                 drop(state, EMA + "num_updates", "LitEma bookkeeping buffer", exact=True),
                 *(drop(state, f"quantize.{b}", "LFQ buffer recomputed from the code size (non-persistent "
                        "upstream)", exact=True) for b in _LFQ_BUFFERS)):
        if rule:
            dropped.append(rule)
    raw = {k: v for k, v in state.items() if not k.startswith(EMA)}
    check_fits(expected, raw, where)  # the raw copy must be exactly this architecture
    ema = {k: v for k, v in state.items() if k.startswith(EMA)}
    if which == "ema":
        if not ema:
            raise UserError(f"{where}: no '{EMA}*' EMA weights (trained without use_ema?); pass --weights raw to "
                            "evaluate the raw weights")
        missing = [ema_name(k) for k in expected if ema_name(k) not in ema]
        extra = sorted(set(ema) - {ema_name(k) for k in expected})
        if missing or extra:
            parts = ([f"{len(missing)} missing EMA keys: {', '.join(missing[:5])}"] if missing else []) + \
                    ([f"{len(extra)} unexpected EMA keys: {', '.join(extra[:5])}"] if extra else [])
            raise UserError(f"{where}: EMA weights do not fit the model architecture ({'; '.join(parts)})")
        chosen = {k: ema[ema_name(k)] for k in expected}
        dropped.append(Dropped("encoder./decoder.", len(raw), "raw (non-EMA) training weights; the EMA copy is "
                               "evaluated, as upstream's ema_scope does"))
    elif which == "raw":
        chosen = raw
        if ema:
            dropped.append(Dropped(EMA, len(ema), "EMA weights (not evaluated: --weights raw)"))
    else:
        raise UserError(f"--weights: {weights!r} is not valid; valid: ema, raw")
    variant = next((name for name, mult in VARIANTS.items()
                    if cfg == magvit2.MagvitConfig(ch_mult=mult)), None)
    meta = {
        "variant": variant, "weights": which, "weights_entry": "state_dict" if lightning else None,
        "input_range": "[-1, 1]", "dropped": [d.to_dict() for d in dropped], "ema_state": ema_state,
        "ignored_entries": sorted(str(k) for k in obj if k != "state_dict") if lightning else [],
    }
    return Release(KIND, magvit2.ARCHITECTURE, cfg.to_dict(), magvit2.quantizer_spec(cfg.z_channels), chosen, meta)
