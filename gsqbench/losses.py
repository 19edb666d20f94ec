"""Training losses for tokenizers: reconstruction, LPIPS-VGG perceptual loss, adversarial losses and their helpers.

Follows the official GSQ-GAN code (`flex_gen/discriminators/base_discriminator.py`; gsq-reference.md §5.2):

- reconstruction: MSE (or L1) on [-1, 1] pixels, mean over all elements;
- perceptual: taming-style LPIPS with a VGG16 trunk and the v0.1 linear heads, `.mean()` over the batch. The
  `lpips` package computes it; the heads ship in its wheel, the trunk (`vgg16`, torchvision layout) comes from
  the offline weight manager. Without the trunk the loss is OFF (logged, `enabled=False`, recorded in `card()`),
  unless required, which makes it a UserError;
- discriminator: hinge 0.5·mean(relu(1 − real) + relu(1 + fake)); vanilla 0.5·mean(softplus(−real) +
  softplus(fake)); non-saturating on per-sample mean logits;
- generator: non-saturating softplus(−mean_per_sample(logits)) averaged over the batch (official quirk: the
  per-sample mean comes first), vanilla mean(softplus(−logits)), hinge −mean(logits);
- LeCAM regulariser (Tseng et al. 2021) with EMA 0.999 of the mean logits; R1-style gradient penalty;
- taming adaptive weight ‖∇L_rec‖ / max(‖∇L_G‖, 1e-3) at the decoder's last layer, clamped to ≤ 1e3.

The official final recipe uses MSE + LPIPS + non-saturating G / hinge D, no adaptive weight, no LeCAM, no GP.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------------------------

RECONSTRUCTION_LOSSES = ("l2", "l1")


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str = "l2") -> Tensor:
    """Mean over all elements of (x − x̂)² ('l2', official) or |x − x̂| ('l1'); computed in fp32 under autocast."""
    if kind not in RECONSTRUCTION_LOSSES:
        raise UserError(f"loss.reconstruction: unknown kind '{kind}'{did_you_mean(kind, RECONSTRUCTION_LOSSES)}")
    x, x_hat = x.float(), x_hat.float()
    return F.mse_loss(x_hat, x) if kind == "l2" else F.l1_loss(x_hat, x)


# ---------------------------------------------------------------------------------------------------------------
# Adversarial losses
# ---------------------------------------------------------------------------------------------------------------


def _per_sample_mean(logits: Tensor) -> Tensor:
    return logits.reshape(logits.shape[0], -1).float().mean(dim=1)  # (b,)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def vanilla_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean())


def non_saturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Official: sigmoid cross-entropy on per-sample mean logits (real → 1, fake → 0), halved."""
    real, fake = _per_sample_mean(real_logits), _per_sample_mean(fake_logits)
    return 0.5 * (F.softplus(-real) + F.softplus(fake)).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.float().mean()


def vanilla_g_loss(fake_logits: Tensor) -> Tensor:
    return F.softplus(-fake_logits.float()).mean()


def non_saturating_g_loss(fake_logits: Tensor) -> Tensor:
    """Official quirk (spec §5.2): the per-sample mean of all logits first, then softplus(−mean), batch mean."""
    return F.softplus(-_per_sample_mean(fake_logits)).mean()


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non_saturating": non_saturating_d_loss,
}
G_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "hinge": hinge_g_loss,
    "vanilla": vanilla_g_loss,
    "non_saturating": non_saturating_g_loss,
}
# The official configs spell it 'non_saturate'; accept that and the hyphenated form for the same loss.
_ALIASES = {"non_saturate": "non_saturating", "non-saturating": "non_saturating", "ns": "non_saturating"}


def _lookup(table: dict, kind: str, field: str):
    key = _ALIASES.get(kind, kind)
    if key not in table:
        raise UserError(f"{field}: unknown adversarial loss '{kind}'{did_you_mean(kind, table)}")
    return table[key]


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return _lookup(D_LOSSES, kind, "loss.disc_loss_type")(real_logits, fake_logits)


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    return _lookup(G_LOSSES, kind, "loss.gen_loss_type")(fake_logits)


# ---------------------------------------------------------------------------------------------------------------
# Regularisers and weights
# ---------------------------------------------------------------------------------------------------------------


class LeCamEMA:
    """EMA of the mean real/fake logits (decay 0.999, init 0) for the LeCAM regulariser; state is two floats."""

    def __init__(self, decay: float = 0.999, init: float = 0.0):
        self.decay = decay
        self.real = float(init)
        self.fake = float(init)

    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        d = self.decay
        self.real = self.real * d + float(real_logits.detach().float().mean()) * (1.0 - d)
        self.fake = self.fake * d + float(fake_logits.detach().float().mean()) * (1.0 - d)

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay, "real": self.real, "fake": self.fake}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.decay, self.real, self.fake = float(state["decay"]), float(state["real"]), float(state["fake"])


def lecam_loss(real_logits: Tensor, fake_logits: Tensor, ema: LeCamEMA) -> Tensor:
    """mean(relu(real − ema_fake)²) + mean(relu(ema_real − fake)²); call `ema.update` first (official order)."""
    return (F.relu(real_logits.float() - ema.fake).pow(2).mean()
            + F.relu(ema.real - fake_logits.float()).pow(2).mean())


def gradient_penalty(images: Tensor, logits: Tensor) -> Tensor:
    """R1-style penalty mean_b ‖∂ΣD(x)/∂x‖² (official `gradient_penalty`, use_WGAN=False); images need grad."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        (grads,) = torch.autograd.grad(logits.float().sum(), images, create_graph=True)
        return grads.reshape(grads.shape[0], -1).float().pow(2).sum(dim=1).mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e3) -> Tensor:
    """Taming/official adaptive weight ‖∇_w L_rec‖ / max(‖∇_w L_G‖, 1e-3), clamped to ≤ max_weight, detached.

    `rec_loss` is what the official code passes: reconstruction + weighted perceptual loss. NaN falls back to 1.
    """
    with torch.autocast(device_type=last_layer.device.type, enabled=False):
        (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
        (g_adv,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = g_rec.float().norm(p=2) / g_adv.float().norm(p=2).clamp(min=1e-3)
    weight = weight.clamp(max=max_weight).detach()
    if torch.isnan(weight):
        return torch.ones((), device=weight.device)
    return weight


def adversarial_active(step: int, start_step: int) -> bool:
    """The discriminator (and the generator's adversarial term) is on from `start_step` (official default 0)."""
    return step >= start_step


def adopt_weight(weight: float, step: int, start_step: int, value: float = 0.0) -> float:
    """taming's `adopt_weight`: `value` before `start_step`, `weight` from then on."""
    return weight if adversarial_active(step, start_step) else value


# ---------------------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS-VGG)
# ---------------------------------------------------------------------------------------------------------------

PERCEPTUAL_INPUT_RANGES = ("[-1,1]", "[0,1]")
# torchvision vgg16 `features.<i>` → lpips slice holding module <i> (lpips keeps torchvision's indices).
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def vgg_features_to_lpips(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a torchvision VGG16 state dict (`features.<i>.weight|bias`, classifier ignored) to lpips' `net.*` keys."""
    slice_of = {i: s for s, idx in _VGG_SLICES for i in idx}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) in slice_of:
            out[f"net.slice{slice_of[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
    return out


def _read_vgg_trunk(path: str | Path, expected: set[str]) -> dict[str, Tensor]:
    """torchvision VGG16 file → lpips `net.*` tensors; UserError naming the file if it is not one."""
    from gsqbench.tensorfile import load_state_file

    state = load_state_file(path, "VGG16 trunk file")  # pickled objects are refused, never unpickled
    mapped = vgg_features_to_lpips(state)
    if set(mapped) != expected:
        missing = sorted(expected - set(mapped))[:3]
        raise UserError(f"VGG16 trunk file {path}: not a torchvision vgg16 state dict (missing {missing}); "
                        "expected keys features.<i>.weight/bias")
    return mapped


def build_lpips_vgg(trunk: str | Path) -> nn.Module:
    """lpips.LPIPS(net='vgg', v0.1) with the v0.1 heads from the lpips wheel and the VGG16 trunk from `trunk`.

    Built on the meta device: otherwise lpips makes torchvision construct and randomly initialise the whole
    VGG16 including its 120M-parameter classifier (seconds of CPU) only to drop it. Every tensor is then
    loaded explicitly (strict), so nothing uninitialised survives.
    """
    import lpips

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation chatter
        model = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    model = model.to_empty(device="cpu")
    model.scaling_layer = type(model.scaling_layer)()  # lpips' constant shift/scale, rebuilt off the meta device
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                       weights_only=True)
    heads.update({k.replace("lin", "lins.", 1): v for k, v in heads.items()})  # lpips registers heads twice
    scaling = {f"scaling_layer.{k}": v for k, v in model.scaling_layer.state_dict().items()}
    trunk_state = _read_vgg_trunk(trunk, {k for k in model.state_dict() if k.startswith("net.")})
    try:
        model.load_state_dict({**scaling, **heads, **trunk_state}, strict=True)
    except RuntimeError as exc:
        raise UserError(f"VGG16 trunk file {trunk}: does not fit lpips' VGG16 ({exc})".replace("\n", " ")) from None
    return model.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """LPIPS-VGG loss on images in [-1, 1] (the tokenizer boundary); frozen, always eval, grads reach the input.

    `input_range='[-1,1]'` feeds the images as LPIPS expects; `'[0,1]'` reproduces the official quirk of feeding
    x01 = 0.5·x + 0.5 to LPIPS' [-1, 1] scaling layer (spec §14). `trunk=None` asks the weight manager for
    `vgg16`; when it is unavailable the loss returns 0 and `enabled` is False unless `required`.
    """

    def __init__(self, trunk: str | Path | None = None, *, required: bool = False, input_range: str = "[-1,1]"):
        super().__init__()
        if input_range not in PERCEPTUAL_INPUT_RANGES:
            raise UserError(f"loss.perceptual_input_range: '{input_range}' is not valid; "
                            f"valid: {', '.join(PERCEPTUAL_INPUT_RANGES)}")
        self.input_range = input_range
        self.unavailable: Optional[str] = None
        self.trunk_path: Optional[Path] = None
        self.model: Optional[nn.Module] = None
        path = Path(trunk) if trunk is not None else self._trunk_from_weight_manager(required)
        if path is not None:
            if not path.is_file():
                self._unavailable(f"VGG16 trunk file {path} does not exist", required)
            else:
                self.model = build_lpips_vgg(path)
                self.trunk_path = path

    def _trunk_from_weight_manager(self, required: bool) -> Optional[Path]:
        from gsqbench.weights import WeightsUnavailable, weight_path

        try:
            return weight_path("vgg16")
        except WeightsUnavailable as exc:
            self._unavailable(str(exc), required)
            return None

    def _unavailable(self, reason: str, required: bool) -> None:
        if required:
            raise UserError(f"loss.perceptual (LPIPS-VGG) is required but unavailable: {reason}")
        self.unavailable = reason
        log.warning("LPIPS-VGG perceptual loss is OFF (weight 0): %s", reason)

    @property
    def enabled(self) -> bool:
        return self.model is not None

    def card(self) -> dict:
        """What the protocol card records about the perceptual loss."""
        return {"perceptual_loss": "lpips-vgg-v0.1" if self.enabled else "off",
                "perceptual_input_range": self.input_range, "perceptual_trunk": str(self.trunk_path or ""),
                "perceptual_unavailable": self.unavailable or ""}

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        if self.model is not None:
            self.model.eval()  # frozen network: dropout in the heads must never switch on
        return self

    def forward(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Mean LPIPS over the batch; x and x̂ in [-1, 1], (b, 3, H, W)."""
        if self.model is None:
            return x_hat.new_zeros(()).float()
        if self.input_range == "[0,1]":
            x, x_hat = 0.5 * x + 0.5, 0.5 * x_hat + 0.5
        return self.model(x, x_hat).mean()
