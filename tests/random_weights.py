"""Random-init weight files for tests, kept small: every tensor of >= 2 dims is an overlapping strided view of a
small random buffer (He scale), BatchNorm at identity, biases small. `torch.save` keeps views with their storage, so
a 138 M-parameter VGG16 file stays under a megabyte while every loader sees an ordinary state dict of the official
shapes. Results made with these files are non-conformant by design (they are installed through the manifest
override)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from unittest import mock

import torch


def compact_random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith("running_var") or (t.ndim == 1 and name.endswith("weight")):
            out[name] = torch.ones(shape)
        elif name.endswith("running_mean") or t.ndim == 1:
            out[name] = torch.randn(shape, generator=g) * 0.01 if name.endswith("bias") and "bn" not in name \
                else torch.zeros(shape)
        else:
            inner = math.prod(shape[1:])
            buf = torch.randn(inner + 13 * shape[0], generator=g) * math.sqrt(2.0 / inner)
            out[name] = buf.as_strided(shape, (13, *torch.empty(shape[1:]).stride()))
    return out


def inception_file(path: Path, seed: int = 1) -> Path:
    """torch-fidelity's InceptionV3 ('inception-v3-compat') layout, random, under the given (official) name."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), torch.device("meta"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(compact_random_state(net, seed), path)
    return path


def vgg16_file(path: Path, seed: int = 2) -> Path:
    """torchvision VGG16 layout (the file torch-fidelity's prc and LPIPS-VGG use), random."""
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.vgg16()
    torch.save(compact_random_state(net, seed), path)
    return path


def random_dinov2_fb(seed: int = 0) -> dict[str, torch.Tensor]:
    """timm's ViT-S/14-reg4 at 518 in the facebookresearch layout, as the hub file is: the class token without its
    position, pos_embed with the class position first, registers as `register_tokens`, a mask token. Values
    N(0, 0.02); norm and layer-scale gains near 0.5 so every block visibly changes the tokens. Written from timm's key
    list here (not from gsqbench's converter, which the tests check against it)."""
    import timm

    with torch.device("meta"):  # shapes only: values are drawn below (cheaper than timm's init)
        vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, ref in vit.state_dict().items():
        value = torch.randn(ref.shape, generator=g) * 0.02
        if key.endswith((".gamma", "norm1.weight", "norm2.weight", "norm.weight")):
            value = value + 0.5
        state[key] = value
    fb = {k: v for k, v in state.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    # FB keeps a class-token position (pos_embed[:, 0]) that DINOv2 adds to cls_token; registers get no position
    cls_pos = torch.randn(1, 1, state["cls_token"].shape[-1], generator=g) * 0.02
    fb["cls_token"] = state["cls_token"] - cls_pos
    fb["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    fb["register_tokens"] = state["reg_token"]
    fb["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return fb


def manifest(files: dict[str, Path]) -> str:
    """GSQBENCH_WEIGHTS_MANIFEST value registering `files` (weight name -> file) with their sha256."""
    return json.dumps({name: {"filename": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                       for name, p in files.items()})
