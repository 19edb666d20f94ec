"""The effective spec of a run: what it will actually use once every fallback is resolved, decided before training.

A suite states intent (`loss.perceptual_weight: 1.0`, `gan.discriminator: dino`); what a run uses also depends on
the machine: the LPIPS-VGG loss is switched off when the VGG16 trunk is not installed, a DINO discriminator may
fall back to a random backbone when allowed. `resolve(shared)` looks all of that up once (weight files present,
their SHA-256) and returns a `config.Effective`; the fairness hash covers it (config.fairness_view), run.json
stores it with one line per fallback, and the trainer builds exactly what it says (gsqbench.train.build_trainer),
so two runs hash alike only when they trained alike. A loaded subject (evaluated, not trained) is identified by the
SHA-256 of its file instead (`release_sha256`; config.loaded_fairness_view). Nothing here touches the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from gsqbench.config import Effective, RunSpec, SharedSpec, Suite
from gsqbench.config import expand_runs as _expand_runs
from gsqbench.errors import UserError

PERCEPTUAL = "lpips-vgg-v0.1"


def _perceptual(shared: SharedSpec, fallbacks: list[str]) -> tuple[str, Optional[str], Optional[str]]:
    """(perceptual, trunk path, trunk sha256) for the LPIPS-VGG training loss."""
    from gsqbench.weights import WeightsUnavailable, verified_file

    loss = shared.loss
    if loss.perceptual_weight <= 0:
        return "off", None, None
    try:
        path, sha = verified_file("vgg16")
    except WeightsUnavailable as exc:
        if loss.perceptual_required:
            raise UserError(f"loss.perceptual (LPIPS-VGG) is required but unavailable: {exc}") from None
        fallbacks.append(f"loss.perceptual_weight {loss.perceptual_weight:g} → off: VGG16 weights missing "
                         f"({exc.reason}; fix: {exc.fix})")
        return "off", None, None
    return PERCEPTUAL, str(path), sha


def _discriminator(shared: SharedSpec, fallbacks: list[str]) -> dict:
    """{backbone, backbone_path, backbone_sha256} of the discriminator (all None without a pretrained backbone)."""
    name = shared.gan.discriminator
    none = {"backbone": None, "backbone_path": None, "backbone_sha256": None}
    if name == "none":
        return none
    from gsqbench.registry import discover_discriminators

    reg = discover_discriminators()
    choose = getattr(reg.get(name), "backbone_choice", None) if name in reg else None
    if choose is None:
        return none
    choice = choose(dict(shared.gan.options))
    if choice.get("fallback"):
        fallbacks.append(choice["fallback"])
    return {"backbone": choice["source"], "backbone_path": choice["path"], "backbone_sha256": choice["sha256"]}


def resolve(shared: SharedSpec) -> Effective:
    """What a run of `shared` will use on this machine (module docstring); UserError when a required part is
    missing (perceptual_required, a DINO backbone without allow_random_backbone). Weight files are hashed on
    every call (once per grid point of a suite), so a file installed or replaced later is seen."""
    fallbacks: list[str] = []
    perceptual, trunk, trunk_sha = _perceptual(shared, fallbacks)
    disc = _discriminator(shared, fallbacks)
    return Effective(perceptual=perceptual, perceptual_trunk=trunk, perceptual_trunk_sha256=trunk_sha,
                     discriminator=shared.gan.discriminator, precision=shared.train.precision,
                     fallbacks=tuple(fallbacks), resolved=True, **disc)


def release_file(path: str | Path) -> Path:
    """The file whose bytes identify a loaded subject: the path itself, or inside a folder the gsqbench weights
    (`model.safetensors`) or the official GSQ release's `checkpoint.pt`; a one-line UserError otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    for name in ("model.safetensors", "checkpoint.pt"):
        if (p / name).is_file():
            return p / name
    what = "does not exist" if not p.exists() else "holds no model.safetensors or checkpoint.pt"
    raise UserError(f"loaded subject '{path}' {what}; expected a published release file, an official GSQ release "
                    "folder or a gsqbench checkpoint folder")


def release_sha256(path: str) -> str:
    """SHA-256 of a loaded subject's file (`release_file`): what its fairness hash records."""
    from gsqbench.io import sha256_file

    return sha256_file(release_file(path))


def expand_runs(suite: Suite, only: list[str] | None = None) -> list[RunSpec]:
    """config.expand_runs with every run's effective spec resolved (and every loaded subject's file hashed): what
    training and evaluating callers use."""
    return _expand_runs(suite, only, resolve=resolve, digest=release_sha256)
