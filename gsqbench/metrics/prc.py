"""Precision and recall of the reconstructed distribution (Kynkäänniemi et al. 2019), as torch-fidelity's `prc`.

Follows torch-fidelity 0.4 (`metric_prc.calculate_precision_recall_part` with its defaults): features are VGG16
`fc2_relu` (4096-d) from torch-fidelity's own `FeatureExtractorVGG16` (torchvision's IMAGENET1K_V1 weights,
`vgg16-397923af.pth`, the file LPIPS-VGG also uses; TF1-compatible bilinear resize to 224, ImageNet mean/std on the
0–255 scale), k = 3 neighbours. Each sample's k-NN radius is the distance to its (k+1)-th nearest sample of its own
set (the sample itself counts as the first); precision = the fraction of fake samples inside at least one real
sample's ball (distance ≤ radius), recall = the fraction of real samples inside at least one fake sample's ball.

Computed on rank 0 from the float16 features stored on disk (gsqbench/metrics/features.py), in row × column blocks
(never an N×N matrix), with `torch.cdist` as torch-fidelity, in float64 (torch-fidelity: its features' float32).
Values depend on N (the radii shrink as N grows), so they compare only at equal N (N is in the card hash).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gsqbench.errors import UserError
from gsqbench.io import sha256_file
from gsqbench.metrics.base import Facts, MetricContext, MetricValue
from gsqbench.metrics.common import exact_fp32, resolve_weights, shared_object
from gsqbench.metrics.features import FeatureStore, PairedFeatureMetric, compute_on_main, store_root
from gsqbench.registry import register_metric

log = logging.getLogger(__name__)

WEIGHT_NAME = "vgg16"
FEATURE = "fc2_relu"
DIM = 4096
NEIGHBOURHOOD = 3  # torch-fidelity prc_neighborhood
KEYS = ("precision@vgg16", "recall@vgg16")
RESIZE_MODE = "tf1-bilinear-224-align_corners_false-no-antialias"
BLOCK = 4096  # rows per distance block (a BLOCK x BLOCK float64 matrix at a time)


def build_vgg16(weights_path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorVGG16 returning (fc2_relu,) per uint8 batch, from a local torchvision file.

    torch-fidelity unpickles its weight file itself (weights_only=False) into a randomly initialised torchvision
    VGG16 (138 M parameters). Here the file is loaded with weights_only=True; torch-fidelity's constructor runs on
    the meta device with a tensor-free copy of the state dict (so its own strict key/shape check still applies and
    no random init is spent), and the checked tensors are then assigned into the module it built.
    """
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    from gsqbench.tensorfile import load_state_file, meta_state_buffer

    state = load_state_file(weights_path, "VGG16 weights")
    buf = meta_state_buffer(state)
    try:
        with torch.device("meta"):
            model = FeatureExtractorVGG16("vgg16", [FEATURE], feature_extractor_weights_path=buf,
                                          feature_extractor_internal_dtype="float32")
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
        raise UserError(f"VGG16 weights {weights_path}: not a torchvision VGG16 state dict ({exc})") from None
    kept = model.model.state_dict().keys()  # torch-fidelity dropped classifier 4-6 (fc2 is the last layer used)
    model.model.load_state_dict({k: state[k].to(torch.float32).contiguous() for k in kept}, strict=True,
                                assign=True)
    return model.to(device).eval().requires_grad_(False)


def knn_radii(feats: np.ndarray, k: int = NEIGHBOURHOOD, device: torch.device | str = "cpu",
              block: int = BLOCK) -> torch.Tensor:
    """Distance from each row to its (k+1)-th nearest row of the same set (itself first): torch-fidelity's
    `cdist(...).kthvalue(k + 1)`, over column blocks with a running top-(k+1)."""
    n = len(feats)
    if n < k + 1:
        raise ValueError(f"k-NN radii need at least k+1 = {k + 1} samples, got {n}")
    radii = []
    for r0 in range(0, n, block):
        rows = _block(feats, r0, block, device)
        best: Optional[torch.Tensor] = None
        for c0 in range(0, n, block):
            d = torch.cdist(rows, _block(feats, c0, block, device))
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False, sorted=True).values
        radii.append(best[:, k])
    return torch.cat(radii)


def covered_fraction(query: np.ndarray, ref: np.ndarray, ref_radii: torch.Tensor,
                     device: torch.device | str = "cpu", block: int = BLOCK) -> float:
    """Fraction of query rows within the k-NN ball (distance ≤ radius) of at least one ref row."""
    hits = 0
    for q0 in range(0, len(query), block):
        rows = _block(query, q0, block, device)
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for r0 in range(0, len(ref), block):
            d = torch.cdist(rows, _block(ref, r0, block, device))
            hit |= (d <= ref_radii[r0:r0 + d.shape[1]].to(d.device)[None, :]).any(dim=1)
        hits += int(hit.sum())
    return hits / len(query)


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = NEIGHBOURHOOD,
                     device: torch.device | str = "cpu", block: int = BLOCK) -> tuple[float, float]:
    """(precision, recall) of fake vs real features, torch-fidelity's definitions (features_1 = fake)."""
    radii_real = knn_radii(real, k, device, block)
    radii_fake = knn_radii(fake, k, device, block)
    return covered_fraction(fake, real, radii_real, device, block), covered_fraction(real, fake, radii_fake, device,
                                                                                     block)


def _block(feats: np.ndarray, start: int, size: int, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(feats[start:start + size], dtype=np.float64)).to(device)


@register_metric("prc@vgg16")
class PrecisionRecallMetric(PairedFeatureMetric):
    """Improved precision and recall (k = 3) of reconstructions on VGG16 fc2 features, as torch-fidelity (opt-in).

    precision: fake samples inside the real k-NN manifold; recall: real samples inside the fake one."""

    pair_name = "precision/recall"
    family, card_group = "prc", "prc"
    outputs = {"precision@vgg16": "higher", "recall@vgg16": "higher"}
    weights = (WEIGHT_NAME,)
    selected_by_default = False

    def __init__(self, device: torch.device | str = "cpu", *, weights_path: Optional[str | Path] = None,
                 required: bool = False, k: int = NEIGHBOURHOOD, features_dir: Optional[str | Path] = None,
                 keep_features: bool = False, extractor: Optional[Any] = None, shared: Optional[dict] = None,
                 block: int = BLOCK) -> None:
        if int(k) < 1:
            raise UserError(f"precision/recall: k = {k!r}; expected a positive integer (default {NEIGHBOURHOOD})")
        self.device, self.k, self.block = torch.device(device), int(k), int(block)
        path, self._unavailable = resolve_weights(WEIGHT_NAME, weights_path, required)
        self.weights_path = path
        self.model = None
        self.store: Optional[FeatureStore] = None
        if path is not None:
            self.model = extractor if extractor is not None else shared_object(
                shared, ("vgg16-prc", str(path), str(self.device)), lambda: build_vgg16(path, self.device))
            self.store = FeatureStore(features_dir, ("fake", "real"), DIM, keep=keep_features)
        self.n: Optional[int] = None

    @classmethod
    def create(cls, ctx: MetricContext) -> "PrecisionRecallMetric":
        keep = bool(getattr(ctx.settings, "keep_features", False))
        return cls(ctx.device, required=ctx.requires_any(tuple(cls.outputs)), shared=ctx.shared,
                   features_dir=store_root(ctx.out_dir, "prc@vgg16", keep), keep_features=keep)

    @classmethod
    def comparable(cls, key: str, facts: Facts) -> Optional[str]:
        if facts.n_images < NEIGHBOURHOOD + 1:
            return (f"{key} needs at least k+1 = {NEIGHBOURHOOD + 1} images per side for a k-NN radius (k = "
                    f"{NEIGHBOURHOOD}); N = {facts.n_images}")
        return None

    def _features(self, images_u8: torch.Tensor) -> torch.Tensor:
        with exact_fp32():
            return self.model(images_u8.to(self.device))[0]

    def compute(self) -> list[MetricValue]:
        if self.model is None:
            return [MetricValue.missing(k, self._unavailable, d) for k, d in self.outputs.items()]
        precision, recall, n = compute_on_main(self._compute_main)
        self.n = n
        if precision is None:
            reason = (f"precision/recall need at least k+1 = {self.k + 1} images per side (k = {self.k}), "
                      f"got {n}")
            return [MetricValue.missing(k, reason, d) for k, d in self.outputs.items()]
        return [MetricValue("precision@vgg16", precision, direction="higher", n=n),
                MetricValue("recall@vgg16", recall, direction="higher", n=n)]

    def _compute_main(self) -> tuple[Optional[float], Optional[float], int]:
        fake, real = self.store.open("fake"), self.store.open("real")
        n = min(len(fake), len(real))
        if n < self.k + 1:
            return None, None, n
        precision, recall = precision_recall(fake, real, self.k, self.device, self.block)
        return precision, recall, n

    def card(self) -> dict:
        import torch_fidelity

        return {"prc_backend": f"torch-fidelity {torch_fidelity.__version__} prc, reproduced blockwise",
                "prc_extractor": "vgg16 (torch-fidelity FeatureExtractorVGG16)", "prc_feature": FEATURE,
                "prc_weights_sha256": sha256_file(self.weights_path) if self.weights_path is not None else None,
                "prc_resize": RESIZE_MODE, "prc_normalize": "ImageNet mean/std on the 0-255 scale",
                "prc_k": self.k, "prc_distance": "euclidean, torch.cdist, float64",
                "prc_convention": "precision: fake inside real k-NN balls; recall: real inside fake k-NN balls",
                "prc_feature_storage": "float16 .npy, sorted by image id", "prc_min_images": self.k + 1,
                "prc_n": self.n}
