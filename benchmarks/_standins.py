"""Random-init stand-ins for the pretrained weights the benchmarks need, installed through gsqbench's weight manager
as the tests install theirs: the official architecture and file layout, saved under the official file name, listed
with its sha256 in a `GSQBENCH_WEIGHTS_MANIFEST` override and imported (`gsqbench.weights.import_file`) into a
private GSQBENCH_HOME. So the real loading code runs and the cost is the real cost; the values are meaningless
(no metric or loss value from a stand-in is reported as a result).

Names: `inception-fid` (torch-fidelity InceptionV3, FID/IS), `alexnet` and `vgg16` (LPIPS trunks, torchvision
`features.*` keys), `dinov2-vits14-reg` (DINOv2 ViT-S/14 with 4 registers in the facebookresearch layout, the DINO
discriminator's backbone).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from gsqbench import weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_weights import random_dinov2_fb  # noqa: E402  (the tests' FB-layout DINOv2 file, one recipe for both)

FILENAMES = {name: weights.get_weight(name).filename
             for name in ("inception-fid", "alexnet", "vgg16", "dinov2-vits14-reg")}


def _default_init(shapes: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default initialisation for every entry of a (meta) state dict, by key: conv/linear weights and
    biases U(±1/sqrt(fan_in)) (what nn.Conv2d/nn.Linear draw), BatchNorm weight 1, bias 0, running mean 0,
    running var 1. The modules are built on the meta device and filled here, so a stand-in costs the file write
    rather than the initialisation of the full network (VGG16's classifier alone is 120 M parameters)."""
    g = torch.Generator().manual_seed(seed)
    state, weights_of = {}, {k[: -len(".weight")] for k, v in shapes.items() if k.endswith(".weight") and v.dim() > 1}
    for key, ref in shapes.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            value = torch.ones(ref.shape)
        elif key.endswith("running_mean"):
            value = torch.zeros(ref.shape)
        elif key.endswith(".weight") and ref.dim() > 1 or key.endswith(".bias") and module in weights_of:
            fan_in = shapes[module + ".weight"][0].numel()
            value = (torch.rand(ref.shape, generator=g) * 2 - 1) / fan_in**0.5
        elif key.endswith(".weight"):  # a norm's gain
            value = torch.ones(ref.shape)
        else:  # a norm's shift, or any other buffer
            value = torch.zeros(ref.shape, dtype=ref.dtype if ref.dtype.is_floating_point else torch.float32)
        state[key] = value
    return state


def _random_inception_state() -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 (its state-dict layout) at PyTorch's default init, built without its weight
    download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)
        original = FeatureExtractorInceptionV3.load_state_dict
        FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # no weights to load
        try:
            with torch.device("meta"):  # shapes only
                model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                    feature_extractor_weights_path=str(empty))
        finally:
            FeatureExtractorInceptionV3.load_state_dict = original
    return _default_init(model.state_dict(), seed=1)


def _random_trunk(net: str) -> dict[str, torch.Tensor]:
    """The torchvision trunk LPIPS loads (`features.*` keys) at PyTorch's default init."""
    import torchvision

    with torch.device("meta"):
        features = torchvision.models.alexnet().features if net == "alexnet" else torchvision.models.vgg16().features
    return _default_init({f"features.{k}": v for k, v in features.state_dict().items()}, seed=2)


def _make(name: str) -> dict[str, torch.Tensor]:
    if name == "inception-fid":
        return _random_inception_state()
    if name == "dinov2-vits14-reg":
        return random_dinov2_fb(seed=0)
    return _random_trunk(name)


def real_weights_installed(names: tuple[str, ...]) -> bool:
    try:
        for name in names:
            weights.weight_path(name)
        return True
    except weights.WeightsUnavailable:
        return False


def install(names: tuple[str, ...], folder: Path) -> None:
    """Write random stand-ins of `names` under `folder` and make the weight manager use them (this process and
    the child processes it starts: GSQBENCH_HOME, TORCH_HOME and the manifest are environment variables)."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in names:
        path = folder / FILENAMES[name]
        torch.save(_make(name), path)
        manifest[name] = {"filename": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    os.environ["GSQBENCH_HOME"] = str(folder / "home")
    os.environ["TORCH_HOME"] = str(folder / "torch")
    os.environ["GSQBENCH_WEIGHTS_MANIFEST"] = json.dumps(manifest)
    for name in names:
        weights.import_file(folder / FILENAMES[name], name)


def ensure(names: tuple[str, ...], folder: Path) -> bool:
    """Use installed weights if all of `names` are verified; else install random stand-ins. True = real weights."""
    if real_weights_installed(names):
        return True
    install(names, folder)
    return False
