"""The protocol card: every setting that decides what an evaluation number means, and its canonical hash.

Follows metrics-protocol.md §12. The card is a nested dict of field groups (data, conversion, model, precision,
runtime, plus the groups the computed metrics describe themselves with: psnr, ssim, lpips, fid, is, codebook, …). Rows are
comparable only when their `card_hash` agrees: the SHA-256 of the canonical JSON (sorted keys, no whitespace)
of the card *minus* run-specific fields (which checkpoint, measured values, device, versions, world size, batch
size, seed, date). `weights_conformant` is part of the hash, so random stand-in weights never compare with
official ones, and so is the mode, so `gsq-compat` rows never compare with `gsqbench` rows; a compatibility mode's
card also carries a `compat` group listing every way it differs from the pinned protocol (gsqbench.modes).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any, Iterable, Mapping

CARD_VERSION = 1

#: Dotted paths left out of the hash: they describe *this run* (subject, measurement, machine), not the protocol.
RUN_SPECIFIC: tuple[str, ...] = (
    "card_hash",
    "model.checkpoint_sha256", "model.step", "model.tokenizer_spec_hash", "model.fairness_hash",
    "model.code_agreement",
    "model.loaded",  # a loaded subject's own facts (source, kind, weights it holds, file): which subject, not protocol
    "model.lookup_precision",  # what this subject ran (None without a codebook search); `model.lookup` is hashed
    "codebook.tokens_counted", "codebook.codebook_V", "codebook.codebook_G",
    "codebook.tokens_per_group",  # the subject's size, measured T
    "precision.device", "precision.driver",
    "psnr.psnr_capped_images",  # a measured count (identical reconstructions), not a setting
    "data.smaller_than_crop",  # a measured count (images the crop upscaled); N and the id/originals hashes pin the data
    "fid.is_std_over_splits", "fid.fid_reference_source",  # a measured spread; where the same statistics came from
    "fid.fid_reference_key",  # derived from data + extractor fields (hashed already); set only when caching
    "fid.fid_note",  # the small-N warning, derived from N (hashed in the data group)
    "rfd.rfd_reference_source", "rfd.rfd_reference_key",  # the same two for FD-DINOv2
    "kid.kid_std_over_subsets",  # a measured spread
    "runtime",
)

#: Crop protocol descriptions (the data module implements them; metrics-protocol.md §2).
CROP_PROTOCOLS: dict[str, dict[str, Any]] = {
    "gsq": {"crop_pct": 0.875, "resize_library": "PIL", "resize_kernel": "bilinear", "resize_antialias": True,
            "crop_offset_rounding": "round((H-S)/2)"},
    "adm": {"crop_pct": None, "resize_library": "PIL", "resize_kernel": "box-halving+bicubic",
            "resize_antialias": True, "crop_offset_rounding": "floor((H-S)/2)"},
    "train": {"crop_pct": 1.0, "resize_library": "PIL", "resize_kernel": "bilinear", "resize_antialias": True,
              "crop_offset_rounding": "round((H-S)/2)", "note": "train-time transform; never defines eval"},
}

def _plain(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings (strict JSON has no NaN), tuples become lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII: the same card always serialises to the same bytes."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=str)


def _drop_path(card: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = card
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def hashable_view(card: Mapping[str, Any]) -> dict:
    """The card without its run-specific fields."""
    view = copy.deepcopy(dict(card))
    for path in RUN_SPECIFIC:
        _drop_path(view, path)
    return view


def card_hash(card: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(hashable_view(card)).encode("ascii")).hexdigest()


def id_list_hash(image_ids: Iterable[str]) -> str:
    """SHA-256 over the ordered image ids, newline-separated."""
    h = hashlib.sha256()
    for image_id in image_ids:
        h.update(str(image_id).encode("utf-8") + b"\n")
    return h.hexdigest()


def _weight_conformant(name: str) -> bool:
    """True when the installed, verified file `name` is the official one (random stand-ins are not)."""
    from gsqbench import weights

    try:
        weights.weight_path(name)
    except weights.WeightsUnavailable:
        return False
    return weights.is_conformant(name)


def dataset_fields(dataset: Any) -> dict[str, Any]:
    """Data fields a dataset describes itself with (`describe()`, gsqbench.data), else its plain attributes."""
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        return dict(describe())
    out = {k: getattr(dataset, k) for k in ("kind", "name", "split", "crop", "size", "path")
           if isinstance(getattr(dataset, k, None), (str, int))}
    if out.get("crop") in CROP_PROTOCOLS:
        out.update(CROP_PROTOCOLS[out["crop"]])
    return out


def conversion_group(mode: str) -> dict[str, Any]:
    """The card's conversion group of an eval mode (gsqbench.modes: one table entry per mode)."""
    from gsqbench.modes import check_mode

    m = check_mode(mode, "eval.mode")
    return {"uint8_rule": m.card_uint8_rule, "model_input": m.card_model_input,
            "clamp": [-1, 1], "converted_once": True,
            # gsq-compat: as the official evaluation, PSNR/SSIM/LPIPS read the float pair the truncated uint8 is
            # cut from; each mode's text is in its gsqbench.modes entry
            "metric_inputs": m.card_metric_inputs}


def compat_group(mode: str) -> dict[str, Any] | None:
    """The card's `compat` group: what a compatibility mode reproduces and every way it differs from the pinned
    protocol (hashed, so a changed mode definition gets a new card hash); None for the pinned `gsqbench` mode."""
    from gsqbench.modes import check_mode

    m = check_mode(mode, "eval.mode")
    return m.compat_card() if m.is_compat else None


def build_card(
    *,
    mode: str,
    metrics: Iterable[Any],
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    precision: Mapping[str, Any],
    runtime: Mapping[str, Any],
) -> dict:
    """Assemble the card of one evaluation from its fixed groups and the metrics that ran.

    Each metric (gsqbench.metrics.base.Metric) describes its own card group(s) (`card_fields()`); groups several
    metrics share (LPIPS alex + vgg) are merged. `weights_conformant` is True only when every weight file the
    metrics declare (`weights`) is installed and the official one.
    """
    metrics = list(metrics)
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "mode": mode,
        "data": dict(data),
        "conversion": conversion_group(mode),
        "model": dict(model),
        "precision": dict(precision),
    }
    compat = compat_group(mode)
    if compat is not None:
        card["compat"] = compat
    for metric in metrics:
        for group, fields in metric.card_fields().items():
            card.setdefault(group, {}).update(fields)
    needed = sorted({name for metric in metrics for name in type(metric).weights})
    card["weights_conformant"] = all(_weight_conformant(name) for name in needed)
    card["runtime"] = dict(runtime)
    card["card_hash"] = card_hash(card)
    return card
