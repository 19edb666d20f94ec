"""DiffAugment: differentiable, batch-wise augmentations applied to every discriminator input.

Follows Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training" (NeurIPS 2020) in the
variant the official GSQ DINO discriminator uses (`flex_gen/layers/projected_gan_t/diffaug.py`, from
StyleGAN-T; gsq-reference.md §5.3), policy 'color,translation,cutout':

- color: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5) (one draw per sample each);
- translation: integer shift up to round(0.125 * size) pixels per axis, vacated pixels are zero;
- cutout: one square of round(0.2 * size) pixels per sample set to zero (clipped at the border).

Every op is differentiable w.r.t. the images (gradients reach the generator). Randomness comes only from the
`generator` argument (or torch's global RNG when None), so a run is reproducible from its seed; each call
draws fresh values, which gives the independent draws for real and fake batches.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from gsqbench.errors import UserError, did_you_mean

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.2


def _rand(shape: tuple[int, ...], x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """U[0, 1) drawn on the generator's device (a CPU generator may drive CUDA tensors), returned on x's device."""
    device = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, shape: tuple[int, ...], x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, shape, generator=generator, device=device).to(x.device)


def brightness(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    return x + (_rand((x.shape[0], 1, 1, 1), x, generator) - 0.5)


def saturation(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)  # per-pixel grey level
    return (x - mean) * (_rand((x.shape[0], 1, 1, 1), x, generator) * 2.0) + mean


def contrast(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # per-image mean
    return (x - mean) * (_rand((x.shape[0], 1, 1, 1), x, generator) + 0.5) + mean


def translation(x: Tensor, generator: Optional[torch.Generator] = None, ratio: float = TRANSLATION_RATIO) -> Tensor:
    """Shift each image by (dy, dx) ∈ [-s, s]² pixels, s = round(ratio·size); out[i, j] = x[i + dy, j + dx] or 0."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(-sy, sy + 1, (b, 1, 1), x, generator)
    dx = _randint(-sx, sx + 1, (b, 1, 1), x, generator)
    # Index into a zero-padded copy so out-of-range source pixels read zeros; gather keeps it differentiable.
    padded = torch.nn.functional.pad(x, (sx, sx, sy, sy))  # (b, c, h + 2sy, w + 2sx)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy + sy  # (b, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx + sx  # (b, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def cutout(x: Tensor, generator: Optional[torch.Generator] = None, ratio: float = CUTOUT_RATIO) -> Tensor:
    """Zero one square of side round(ratio·size) per image; its centre is uniform over the image (may clip)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # Centre range as in DiffAugment: [0, size + (1 - side % 2)), so even and odd squares can touch both borders.
    cy = _randint(0, h + (1 - ch % 2), (b, 1, 1), x, generator)
    cx = _randint(0, w + (1 - cw % 2), (b, 1, 1), x, generator)
    top, left = cy - ch // 2, cx - cw // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (b, h, w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AugmentFn = Callable[[Tensor, Optional[torch.Generator]], Tensor]
POLICIES: dict[str, tuple[AugmentFn, ...]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}
DEFAULT_POLICY = "color,translation,cutout"


def parse_policy(policy: str) -> list[str]:
    """'color,translation' -> ['color', 'translation']; unknown names are a UserError."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise UserError(f"diffaug policy: unknown augmentation '{name}'{did_you_mean(name, POLICIES)}")
    return names


def diff_augment(x: Tensor, policy: str = DEFAULT_POLICY, generator: Optional[torch.Generator] = None) -> Tensor:
    """Apply the policy's ops in order (color, translation, cutout) to a float batch (b, c, h, w)."""
    for name in parse_policy(policy):
        for fn in POLICIES[name]:
            x = fn(x, generator)
    return x
