"""Published tokenizer releases: LlamaGen, Open-MAGVIT2, MaskGIT VQGAN, taming VQGAN.

Each kind has a module in this package that reads the upstream file layout into a `Release` (our architecture name, model
and quantizer specs, the state dict under the upstream key names, dropped keys with reasons). This module ties
them together: the file is read without running pickled code (`lightning.read_checkpoint`), the kind is given
or recognised from signature keys, the model is rebuilt from the specs (gsqbench.models.published registry)
and loaded strictly. `import_release` writes gsqbench's own checkpoint format (model.safetensors + model.json
with an `architecture` field), which `gsqbench.checkpoints.load_tokenizer` rebuilds later; `load_release`
loads a release file directly (what `gsqbench eval RELEASE_FILE` uses).

The metadata records what a protocol card needs: the release file's sha256, the upstream repository, files and
commit the reimplementation follows, which weights were taken (EMA or raw), every dropped key prefix with its
reason, and which pickled globals were read as inert stand-ins.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from gsqbench.checkpoints import MODEL_JSON, load_state_strict, save_tokenizer, sha256_file
from gsqbench.errors import UserError, did_you_mean
from gsqbench.importers.common import Release, check_fits, dtypes
from gsqbench.importers.lightning import read_checkpoint
from gsqbench.models.published import PublishedTokenizer, build_architecture

KINDS: dict[str, str] = {
    "llamagen": "gsqbench.importers.llamagen",
    "open-magvit2": "gsqbench.importers.magvit2",
    "maskgit": "gsqbench.importers.maskgit",
    "taming": "gsqbench.importers.taming",
}
WEIGHTS = ("ema", "raw")


def _module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise UserError(f"--kind: {kind!r} is not a known release kind{did_you_mean(kind, KINDS)}")
    return importlib.import_module(KINDS[kind])


def detect_kind(obj: Any, path: Path) -> str:
    """The release kind whose signature keys the file's state dict has (exactly one must match)."""
    found = []
    for kind in KINDS:
        module = _module(kind)
        state = module.state_of(obj)
        if state is not None and module.looks_like(state):
            found.append(kind)
    if len(found) != 1:
        what = "none" if not found else " and ".join(found)
        raise UserError(f"{path}: cannot tell which published tokenizer this is (signature keys match {what}); "
                        f"pass --kind ({', '.join(KINDS)}) to see which keys differ")
    return found[0]


def read_release(path: str | Path, kind: str | None = None, weights: str | None = None) -> Release:
    """Read and check a release file (no model with real weights is built; the check runs on the meta device)."""
    p = Path(path)
    if weights is not None and weights not in WEIGHTS:
        raise UserError(f"--weights: {weights!r} is not valid; valid: {', '.join(WEIGHTS)}")
    module = _module(kind) if kind is not None else None
    obj, stand_ins = read_checkpoint(p)
    kind = kind or detect_kind(obj, p)
    module = module or _module(kind)
    release: Release = module.read(obj, p, weights)
    with torch.device("meta"):
        skeleton = build_architecture(release.architecture, release.model_spec, release.quantizer_spec)
    check_fits(skeleton.state_dict(), release.state_dict, str(p))
    variant = release.meta.get("variant")
    release.meta = {
        "source": "published-release",
        "kind": kind,
        "architecture": release.architecture,
        "official_name": f"{kind}-{variant.lower()}" if variant else f"{kind}-{p.stem}",
        "release_file": str(p.resolve()),
        "checkpoint_sha256": sha256_file(p),
        "upstream": module.UPSTREAM,
        "pickled_stand_ins": stand_ins,
        "release_dtypes": dtypes(release.state_dict),
        **release.meta,
        "model_spec": release.model_spec,
        "quantizer_spec": release.quantizer_spec,
    }
    return release


def load_release(path: str | Path, kind: str | None = None, weights: str | None = None
                 ) -> tuple[PublishedTokenizer, dict[str, Any]]:
    """A release file → (tokenizer on CPU in eval mode, metadata), strictly loaded."""
    release = read_release(path, kind, weights)
    tok = build_architecture(release.architecture, release.model_spec, release.quantizer_spec)
    load_state_strict(tok, release.state_dict, str(path))
    return tok.eval(), release.meta


def import_release(path: str | Path, out: str | Path, kind: str | None = None, weights: str | None = None,
                   *, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Strict-load a release and write it as a gsqbench checkpoint directory; returns (out dir, metadata)."""
    out = Path(out)
    if (out / MODEL_JSON).exists() and not overwrite:
        raise UserError(f"--out {out}: already holds a checkpoint; choose another directory or pass --force")
    tok, meta = load_release(path, kind, weights)
    save_tokenizer(out, tok, None, meta["quantizer_spec"], meta)
    return out, meta
