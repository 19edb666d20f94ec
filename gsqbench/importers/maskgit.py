"""Importer for the MaskGIT VQGAN PyTorch port (`maskgit-vqgan-imagenet-f16-256.bin`, HF fun-research/TiTok).

Layout: a plain state dict (bytedance/1d-tokenizer `modeling/titok.py` `PretrainedTokenizer` loads it with
`torch.load` and `strict=True`), keys `encoder.*`, `decoder.*`, `quantize.embedding.weight`. Nothing is
dropped. The architecture comes from tensor shapes. The upstream model takes images in [0, 1]; the wrapper
(gsqbench.models.maskgit) converts, so the imported tokenizer follows gsqbench's [-1, 1] contract.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from gsqbench.errors import UserError
from gsqbench.importers.common import Release, encoder_layout, get, tensor_dict
from gsqbench.models import maskgit

KIND = "maskgit"
UPSTREAM = {"repo": "bytedance/1d-tokenizer", "files": ["modeling/modules/maskgit_vqgan.py", "modeling/titok.py"],
            "commit": "be0b076c13bf0cb28eb560d70a325448d64bc59e"}
SIGNATURE = ("encoder.mid.0.norm1.weight", "encoder.down.0.block.0.conv1.weight")


def state_of(obj: Any) -> Mapping[str, Any] | None:
    return obj if isinstance(obj, Mapping) else None


def looks_like(state: Mapping[str, Any]) -> bool:
    return all(k in state for k in SIGNATURE) and "quant_conv.weight" not in state


def read(obj: Any, path: Path, weights: str | None = None) -> Release:
    if weights == "ema":
        raise UserError(f"--weights ema: the MaskGIT VQGAN release holds one set of weights ({path}); "
                        "use --weights raw")
    state = tensor_dict(obj, str(path), "a plain state dict (MaskGIT VQGAN PyTorch port)")
    where = str(path)
    enc = encoder_layout(state, where, "MaskGIT VQGAN")
    cfg = maskgit.MaskGITConfig(num_channels=enc.in_channels, hidden_channels=enc.ch, channel_mult=enc.ch_mult,
                                num_res_blocks=enc.num_res_blocks, z_channels=enc.z_channels)
    codebook = get(state, "quantize.embedding.weight", where, "MaskGIT VQGAN")
    qspec = maskgit.quantizer_spec(int(codebook.shape[0]), int(codebook.shape[1]))
    variant = "imagenet-f16-256" if cfg == maskgit.MaskGITConfig() and qspec["codebook_size"] == 1024 else None
    meta = {"variant": variant, "weights": "raw", "weights_entry": None,
            "input_range": "[0, 1] upstream; the wrapper maps gsqbench's [-1, 1] to (x + 1) / 2 and back",
            "dropped": [], "ignored_entries": []}
    return Release(KIND, maskgit.ARCHITECTURE, cfg.to_dict(), qspec, state, meta)
