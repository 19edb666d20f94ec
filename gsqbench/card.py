"""The protocol card: every setting that decides what an evaluation number means, and its canonical hash.

Follows metrics-protocol.md §12. The card is a nested dict of field groups (data, conversion, model, precision,
fid, is, psnr, ssim, lpips, codebook, runtime); only groups for the metrics actually computed appear. Rows are
comparable only when their `card_hash` agrees: the SHA-256 of the canonical JSON (sorted keys, no whitespace)
of the card *minus* run-specific fields (which checkpoint, measured values, device, versions, world size, batch
size, seed, date). `weights_conformant` is part of the hash, so random stand-in weights never compare with
official ones, and so is the mode, so `gsq-compat` rows never compare with `gsqbench` rows.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

CARD_VERSION = 1

#: Dotted paths left out of the hash: they describe *this run* (subject, measurement, machine), not the protocol.
RUN_SPECIFIC: tuple[str, ...] = (
    "card_hash",
    "model.checkpoint_sha256", "model.step", "model.tokenizer_spec_hash", "model.fairness_hash",
    "model.code_agreement",
    "model.lookup_precision",  # a property of the subject's quantizer block (its kwargs), like V and G
    "codebook.V", "codebook.G", "codebook.d", "codebook.tokens_counted",
    "codebook.codebook_V", "codebook.codebook_G", "codebook.tokens_per_group",  # the subject's size, measured T
    "precision.device", "precision.driver",
    "psnr.psnr_capped_images",  # a measured count (identical reconstructions), not a setting
    "fid.is_std_over_splits", "fid.fid_reference_source",  # a measured spread; where the same statistics came from
    "fid.fid_reference_key",  # derived from data + extractor fields (hashed already); set only when caching
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

METRIC_FAMILIES = ("pixel", "lpips", "fid", "codebook", "cost")


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


def lpips_heads_sha256(net: str) -> Optional[str]:
    """Hash of the v0.1 linear heads shipped in the installed lpips wheel (spec §11 lists the expected values)."""
    try:
        import lpips
    except ImportError:
        return None
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _weight_sha(name: str) -> tuple[Optional[str], bool]:
    """(sha256 of the installed verified file or None, conformant)."""
    from gsqbench import weights

    try:
        path = weights.weight_path(name)
    except weights.WeightsUnavailable:
        return None, False
    return weights.sha256_file(path), weights.is_conformant(name)


def _pixel_groups(mode: str, psnr_cap_db: float) -> dict[str, dict]:
    compat = mode == "gsq-compat"
    inputs = "uint8 (trunc-compat; official used float [0,1])" if compat else "uint8"
    return {
        "psnr": {"aggregations": ["mean_per_image", "pooled"], "data_range": 255, "colour_space": "RGB",
                 "cap_db": psnr_cap_db, "inputs": inputs, "dtype": "float64"},
        "ssim": {"window": "gaussian", "taps": 11, "sigma": 1.5, "truncate": 3.5, "K1": 0.01, "K2": 0.03,
                 "data_range": 255, "covariance": "population", "ssim_border": "valid", "dtype": "float64",
                 "channels": "per-RGB-channel mean", "aggregation": "mean_per_image", "inputs": inputs},
    }


def _lpips_group(nets: Iterable[str]) -> tuple[dict, list[bool]]:
    trunk_names = {"alex": "alexnet", "vgg": "vgg16"}
    group: dict[str, Any] = {"version": "0.1", "input_range": "[-1,1] from u8/127.5-1", "spatial_reduction": "mean",
                             "dtype": "float32, TF32 off", "nets": {}}
    conformant = []
    for net in sorted(nets):
        sha, ok = _weight_sha(trunk_names[net])
        conformant.append(ok)
        group["nets"][net] = {"trunk_sha256": sha, "heads_sha256": lpips_heads_sha256(net)}
    return group, conformant


def _fid_groups(mode: str, n: int) -> tuple[dict, dict, bool]:
    try:
        import torch_fidelity

        version = getattr(torch_fidelity, "__version__", None)
    except ImportError:
        version = None
    sha, ok = _weight_sha("inception-fid")
    fid = {"backend": "torch-fidelity", "backend_version": version, "extractor": "inception-v3-compat",
           "weights_sha256": sha, "feature_layer": "2048", "resize": "tf1-bilinear-299", "antialias": False,
           "extractor_dtype": "float32", "stats_dtype": "float64", "N_real": n, "N_fake": n,
           "uint8_rule": "trunc-compat" if mode == "gsq-compat" else "round-half-even"}
    is_group = {"splits": 10, "permutation_seed": 2020, "logits": "logits_unbiased", "softmax_dtype": "float64"}
    return fid, is_group, ok


def _codebook_group(quantizer: Any, tokens_counted: Optional[int]) -> dict:
    return {"V": getattr(quantizer, "codebook_size", None), "G": getattr(quantizer, "groups", None),
            "d": getattr(quantizer, "dim", None), "tokens_counted": tokens_counted,
            "definitions_version": 1, "split": "eval"}


def build_card(
    *,
    mode: str,
    families: Iterable[str],
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    precision: Mapping[str, Any],
    runtime: Mapping[str, Any],
    quantizer: Any = None,
    tokens_counted: Optional[int] = None,
    lpips_nets: Iterable[str] = ("alex", "vgg"),
    psnr_cap_db: float = 100.0,
    extra: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> dict:
    """Assemble the card for one evaluation. `extra` (group → fields) lets a metric add or refine its group.

    `weights_conformant` is True only when every weight file the computed metrics depend on is the official one.
    """
    families = set(families)
    compat = mode == "gsq-compat"
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "mode": mode,
        "data": dict(data),
        "conversion": {"uint8_rule": "trunc-compat" if compat else "round-half-even",
                       "model_input": "ToTensor+Normalize(0.5,0.5) fp32" if compat else "u8/127.5-1 fp32",
                       "clamp": [-1, 1], "converted_once": True,
                       # the metric contract is uint8-only: in gsq-compat PSNR/SSIM/LPIPS see the truncated uint8,
                       # where the official code fed them float [0, 1] (a documented deviation)
                       "metric_inputs": "uint8 (trunc-compat; official: float for PSNR/SSIM/LPIPS)" if compat
                       else "uint8"},
        "model": dict(model),
        "precision": dict(precision),
    }
    conformant: list[bool] = []
    if "pixel" in families:
        card.update(_pixel_groups(mode, psnr_cap_db))
    if "lpips" in families:
        card["lpips"], ok = _lpips_group(lpips_nets)
        conformant += ok
    if "fid" in families:
        card["fid"], card["is"], ok_fid = _fid_groups(mode, int(data.get("N") or 0))
        conformant.append(ok_fid)
    if "codebook" in families:
        card["codebook"] = _codebook_group(quantizer, tokens_counted)
    for group, fields in (extra or {}).items():
        card[group] = dict(fields)  # a metric's own description replaces the pinned defaults for its group
    card["weights_conformant"] = all(conformant)
    card["runtime"] = dict(runtime)
    card["card_hash"] = card_hash(card)
    return card
