"""Importer for taming-transformers VQGAN releases (e.g. `vqgan_imagenet_f16_16384/checkpoints/last.ckpt`).

Layout: a PyTorch Lightning 1.x checkpoint, `{"state_dict": ..., "epoch", "global_step",
"optimizer_states", "lr_schedulers", "callbacks": {ModelCheckpoint: {...}}, ...}`; the callback class used as
a dict key is read as an inert stand-in (gsqbench.importers.lightning). Upstream (`VQModel.init_from_ckpt`)
loads `["state_dict"]` non-strictly; we load it strictly after dropping `loss.` (the LPIPS network and the
PatchGAN discriminator of `VQLPIPSWithDiscriminator`, training-only). The architecture comes from tensor shapes
(levels with `attn` keys give the attention levels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from gsqbench.errors import UserError
from gsqbench.importers.common import Release, drop, encoder_layout, get, tensor_dict
from gsqbench.models import taming

KIND = "taming"
UPSTREAM = {"repo": "CompVis/taming-transformers", "files": ["taming/models/vqgan.py",
            "taming/modules/diffusionmodules/model.py", "taming/modules/vqvae/quantize.py"],
            "commit": "3ba01b241669f5ade541ce990f7650a3b8f65318"}
SIGNATURE = ("encoder.mid.block_1.norm1.weight", "quant_conv.weight")


def state_of(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj if isinstance(obj, Mapping) else None


def looks_like(state: Mapping[str, Any]) -> bool:
    return all(k in state for k in SIGNATURE)


def read(obj: Any, path: Path, weights: str | None = None) -> Release:
    if weights == "ema":
        raise UserError(f"--weights ema: taming releases hold no EMA weights ({path}); use --weights raw")
    lightning = isinstance(obj, Mapping) and "state_dict" in obj
    state = tensor_dict(state_of(obj), f"{path}" + (" ['state_dict']" if lightning else ""),
                        "a Lightning checkpoint with 'state_dict' (taming VQGAN) or a plain state dict")
    dropped = [d for d in [drop(state, "loss.", "training loss modules (LPIPS and PatchGAN discriminator of "
                                "VQLPIPSWithDiscriminator)")] if d]
    where = str(path)
    enc = encoder_layout(state, where, "taming VQGAN")
    cfg = taming.TamingConfig(
        in_channels=enc.in_channels, ch=enc.ch, ch_mult=enc.ch_mult,
        out_ch=int(get(state, "decoder.conv_out.weight", where, "taming VQGAN").shape[0]),
        num_res_blocks=enc.num_res_blocks,
        attn_levels=tuple(i for i in enc.levels if f"encoder.down.{i}.attn.0.q.weight" in state),
        z_channels=enc.z_channels,
    )
    codebook = get(state, "quantize.embedding.weight", where, "taming VQGAN")
    qspec = taming.quantizer_spec(int(codebook.shape[0]), int(codebook.shape[1]))
    variant = None
    if cfg == taming.TamingConfig() and qspec["dim"] == 256:
        variant = f"f16-{qspec['codebook_size']}"
    meta = {
        "variant": variant, "weights": "raw", "weights_entry": "state_dict" if lightning else None,
        "input_range": "[-1, 1]", "dropped": [d.to_dict() for d in dropped],
        "ignored_entries": sorted(str(k) for k in obj if k != "state_dict") if lightning else [],
    }
    return Release(KIND, taming.ARCHITECTURE, cfg.to_dict(), qspec, state, meta)
