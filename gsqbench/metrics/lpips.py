"""LPIPS (Zhang et al. 2018) via the `lpips` package, v0.1 heads, AlexNet or VGG16 trunk: metrics-protocol.md §5.

The v0.1 linear heads ship inside the lpips wheel. The ImageNet trunk comes from a verified local file
(`alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth`, torchvision's state dicts) loaded with weights_only=True
into `lpips.LPIPS(..., pnet_rand=True)`, so nothing is ever downloaded. Input is u8/127.5 − 1 in [−1, 1]
(never [0, 1], peer bug §13 #6); fp32 with TF32 off.

In `gsq-compat` (`input = "official-float"`) it computes what the official evaluation computes: torchmetrics'
LPIPS (the same v0.1 network) on clamp(2x − 1, −1, 1) of the official float pair (the real side fp32, the fake side
rounded in bf16; the scaling layer's fp32 buffers promote both to fp32), under bf16 autocast of the evaluation
device (gsq-reference.md §6). Autocast's op lists differ by device (CUDA runs the feature normalisation's pow and
sum in fp32, CPU in bf16), so CPU values differ from CUDA ones in about the third significant digit.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch

from gsqbench.errors import UserError
from gsqbench.io import sha256_file
from gsqbench.metrics import official
from gsqbench.metrics.base import MetricContext, MetricInput
from gsqbench.metrics.common import PerImageMetric, check_image_pair, exact_fp32, pixel_input, resolve_weights
from gsqbench.registry import register_metric

log = logging.getLogger(__name__)

NETS = {"alex": "alexnet", "vgg": "vgg16"}  # lpips net name → gsqbench weight name
# SHA-256 of the v0.1 heads in the lpips wheel (metrics-protocol.md §11)
HEADS_SHA256 = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}


def u8_to_lpips_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [−1, 1] (u/127.5 − 1), the range the v0.1 heads were calibrated on."""
    if images_u8.dtype != torch.uint8:
        raise UserError(f"LPIPS input: dtype {images_u8.dtype}; expected uint8 (converted here to [-1, 1])")
    x = images_u8.to(torch.float32) / 127.5 - 1.0
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0, "LPIPS input left [-1, 1]"
    return x


def official_lpips_inputs(real01: torch.Tensor, fake01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flex_gen's LPIPS inputs: clamp(2x − 1, −1, 1) of the official pair, each in its own dtype (fp32, bf16)."""
    official.check_official_pair(real01, fake01, "LPIPS")
    return (2 * real01 - 1).clamp(-1.0, 1.0), (2 * fake01 - 1).clamp(-1.0, 1.0)


def trunk_state_dict_to_lpips(model: torch.nn.Module, trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision `features.<i>.<param>` keys onto lpips' `net.slice<k>.<i>.<param>`.

    lpips slices torchvision's `features` Sequential keeping each layer's original index as its child name, so
    the layer index identifies the slice.
    """
    slice_of: dict[str, str] = {}
    for name, _ in model.net.named_children():
        for child, _ in getattr(model.net, name).named_children():
            slice_of[child] = name
    mapped: dict[str, torch.Tensor] = {}
    for key, value in trunk.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue  # classifier weights are not part of the perceptual trunk
        if len(parts) != 3 or parts[1] not in slice_of:
            raise UserError(f"LPIPS trunk: unexpected key '{key}'; expected torchvision features.<i>.<weight|bias>")
        mapped[f"net.{slice_of[parts[1]]}.{parts[1]}.{parts[2]}"] = value
    expected = {k for k in model.state_dict() if k.startswith("net.")}
    if set(mapped) != expected:
        missing = sorted(expected - set(mapped))[:3]
        raise UserError(f"LPIPS trunk: state dict does not fit the {model.pnet_type} trunk (missing {missing})")
    return mapped


def build_lpips(net: str, trunk_path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """An eval-mode `lpips.LPIPS` v0.1 with the package's heads and the trunk read from `trunk_path`."""
    import lpips

    if net not in NETS:
        raise UserError(f"LPIPS net: '{net}' is not valid; expected one of {', '.join(NETS)}")
    with warnings.catch_warnings():
        # lpips still calls torchvision with the deprecated `pretrained=False`; harmless, we load the trunk below
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    from gsqbench.tensorfile import load_state_file

    trunk = load_state_file(trunk_path, "LPIPS trunk")  # pickled objects are refused, never unpickled
    model.load_state_dict(trunk_state_dict_to_lpips(model, trunk), strict=False)
    return model.eval().requires_grad_(False).to(device)


def lpips_heads_sha256(net: str) -> str:
    import lpips

    return sha256_file(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth")


class LPIPSMetric(PerImageMetric):
    """`lpips@alex` or `lpips@vgg`: mean of per-image LPIPS v0.1 ± CI (metrics-protocol.md §5); lower is better.

    The registered forms are `LPIPSAlex` and `LPIPSVgg` (one net each, so the registry knows each key's weights);
    `LPIPSMetric(net)` builds either directly.
    """

    family, card_group = "lpips", "lpips"
    net: ClassVar[str] = "alex"

    def __init__(
        self,
        net: Optional[str] = None,
        device: torch.device | str = "cpu",
        *,
        weights_path: Optional[str | Path] = None,
        required: bool = False,
        inputs: MetricInput = "uint8",
    ) -> None:
        net = net or type(self).net
        if net not in NETS:
            raise UserError(f"LPIPS net: '{net}' is not valid; expected one of {', '.join(NETS)}")
        if inputs not in ("uint8", "official-float"):
            raise UserError(f"LPIPS input: '{inputs}' is not valid; expected uint8 or official-float")
        self.net, self.input = net, inputs
        self.outputs = {f"lpips@{net}": "lower"}
        super().__init__()
        self.device = torch.device(device)
        path, self._unavailable = resolve_weights(NETS[net], weights_path, required)
        self.trunk_path = path
        self.model = build_lpips(net, path, self.device) if path is not None else None
        if self.model is not None and lpips_heads_sha256(net) != HEADS_SHA256[net]:
            log.warning("lpips package heads for %s differ from the pinned v0.1 file; LPIPS not comparable", net)

    @classmethod
    def create(cls, ctx: MetricContext) -> Optional["LPIPSMetric"]:
        if cls.net not in ctx.settings.lpips_nets:
            return None
        return cls(cls.net, ctx.device, required=ctx.requires_any(tuple(cls.outputs)), inputs=pixel_input(ctx))

    @torch.no_grad()
    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        if self.model is None:
            return
        if self.input == "official-float":
            self._append(image_ids, {self.keys[0]: self._official(real_u8, fake_u8)})
            return
        check_image_pair(real_u8, fake_u8, what="LPIPS")
        with exact_fp32():
            real = u8_to_lpips_input(real_u8.to(self.device))
            fake = u8_to_lpips_input(fake_u8.to(self.device))
            values = self.model(real, fake, normalize=False).reshape(-1)  # (b,) spatial mean, sum over layers
        self._append(image_ids, {self.keys[0]: values})

    def _official(self, real01: torch.Tensor, fake01: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS as the official evaluation computes it (module docstring), (b,) in float32."""
        real, fake = official_lpips_inputs(real01.to(self.device), fake01.to(self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.model(real, fake, normalize=False).reshape(-1).float()

    def card(self) -> dict:
        trunk_sha = sha256_file(self.trunk_path) if self.trunk_path is not None else None
        fields = {f"lpips_{self.net}_version": "0.1", f"lpips_{self.net}_input_range": "[-1, 1]",
                  f"lpips_{self.net}_trunk_sha256": trunk_sha, f"lpips_{self.net}_heads_sha256": HEADS_SHA256[self.net],
                  f"lpips_{self.net}_spatial_reduction": "mean", f"lpips_{self.net}_dtype": "float32, tf32 off"}
        if self.input == "official-float":  # gsq-compat only: gsqbench cards (and their hashes) stay as they were
            fields.update({f"lpips_{self.net}_inputs": "clamp(2x-1) of the official float pair: real fp32, fake bf16",
                           f"lpips_{self.net}_dtype": "bf16 autocast of the evaluation device (official: CUDA)"})
        return fields


@register_metric("lpips@alex")
class LPIPSAlex(LPIPSMetric):
    """LPIPS v0.1 with the AlexNet trunk (the headline LPIPS, comparable with GSQ's numbers)."""

    net = "alex"
    outputs = {"lpips@alex": "lower"}
    weights = ("alexnet",)


@register_metric("lpips@vgg")
class LPIPSVgg(LPIPSMetric):
    """LPIPS v0.1 with the VGG16 trunk (reported alongside; Open-MAGVIT2 and SimVQ report both)."""

    net = "vgg"
    outputs = {"lpips@vgg": "lower"}
    weights = ("vgg16",)
