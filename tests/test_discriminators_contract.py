"""Contract tests run over every registered discriminator (built-ins and plugin files).

A discriminator takes images in [0, 1] (the official trainer feeds x01 = 0.5·x + 0.5; spec §5.1), returns logits with
the batch as first axis, passes gradients to its input (the G step trains through it) and to its own trainable
parameters (the D step), declares `augments_inside`, and gives `example_config()` kwargs for these checks.
tests/test_plugins.py calls `check_discriminator_contract` on a file written at test time.
"""
from __future__ import annotations

import io

import pytest
import torch

from gsqbench.registry import DISCRIMINATORS, build_discriminator, discover_discriminators

NAMES = discover_discriminators().names()


def _images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _forward(disc: torch.nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)  # a discriminator that augments inside draws from the global RNG
    return disc(x)


def check_discriminator_contract(name: str) -> None:
    cls = DISCRIMINATORS.get(name)
    assert (cls.__doc__ or "").strip(), "a one-line description for `gsqbench list discriminators`"
    assert isinstance(getattr(cls, "augments_inside", None), bool), "declare augments_inside = True/False"
    assert getattr(cls, "input_range", "[0,1]") == "[0,1]"
    torch.manual_seed(0)
    disc = build_discriminator(name, cls.example_config()).train()
    x = _images().requires_grad_(True)
    logits = _forward(disc, x)
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    logits.float().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    trainable = [p for p in disc.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    # state dict round trip: a fresh instance built the same way (frozen parts, e.g. a backbone from its weight
    # file, are not in the state dict), its trainable tensors scrambled, then loaded strictly, computes the same logits
    disc.eval()
    buf = io.BytesIO()
    torch.save(disc.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(0)
    fresh = build_discriminator(name, cls.example_config()).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        scrambled = _forward(fresh, _images(seed=1))
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    with torch.no_grad():
        expected = _forward(disc, _images(seed=1))
        assert not torch.equal(expected, scrambled)  # the scramble mattered, so the load below is what restores it
        assert torch.equal(expected, _forward(fresh, _images(seed=1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(_forward(disc, _images()).float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str, one_thread) -> None:
    check_discriminator_contract(name)


def test_builtin_discriminators_registered() -> None:
    assert {"patchgan", "dino"} <= set(NAMES)
