"""KID (`kid@inception`): the kernel inception distance of Bińkowski et al. 2018, computed as torch-fidelity does.

Follows torch-fidelity 0.4 `metric_kid.kid_features_to_metric` (its defaults; the MMD-GAN reference code): features
are the 2048-d pool features of the same TF-compatible Inception as rFID (`inception-v3-compat`, shared with the
`rfid@inception` metric's network and forward through `MetricContext.shared`); `kid_subsets` = 100 subsets of
`kid_subset_size` = 1000 rows drawn without replacement, per subset first from the fake side and then from the real
side, by one `numpy.random.RandomState(2020)`; polynomial kernel k(x, y) = (γ·xᵀy + 1)³ with γ = 1/d; the unbiased
MMD² estimator; reported: the mean over subsets (and their population std, in the card).

Deliberate differences: the arithmetic is float64 (torch-fidelity computes in its features' dtype, float32, where
the kernel sums lose ~1e-4 relative precision before the cancellation of the MMD² difference), and the features are
stored as float16 on disk during the pass (gsqbench/metrics/features.py). torch-fidelity refuses N < subset size;
gsqbench uses m = min(1000, N_real, N_fake) instead (the estimator is unbiased for any m ≥ 2, only its variance
grows) and records m in the card: at m = N every subset is the whole set and the std over subsets is 0.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gsqbench.errors import UserError
from gsqbench.metrics.base import Facts, MetricContext, MetricValue
from gsqbench.metrics.common import SharedExtractor, exact_fp32, resolve_weights
from gsqbench.metrics.features import FeatureStore, PairedFeatureMetric, compute_on_main, store_root
from gsqbench.metrics.fid import EXTRACTOR, RESIZE_MODE, WEIGHT_NAME, inception_extractor_fields, shared_inception
from gsqbench.registry import register_metric

log = logging.getLogger(__name__)

KEY = "kid@inception"
FEATURE_LAYER = "2048"
SUBSETS, SUBSET_SIZE, SEED = 100, 1000, 2020  # torch-fidelity defaults (kid_subsets, kid_subset_size, rng_seed)
DEGREE, COEF0 = 3, 1.0  # kid_kernel_poly_degree, kid_kernel_poly_coef0; gamma None → 1/d


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int = DEGREE, coef0: float = COEF0) -> float:
    """Unbiased MMD² of two (m, d) samples under k(a, b) = (aᵀb/d + coef0)^degree (torch-fidelity `mmd2`,
    `mmd_est='unbiased'`): (Σ_{i≠j} K_xx + Σ_{i≠j} K_yy)/(m(m−1)) − 2·Σ K_xy/m²."""
    m, d = x.shape
    gamma = 1.0 / d

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T * gamma + coef0) ** degree

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_xx = k_xx.sum() - torch.diagonal(k_xx).sum()
    off_yy = k_yy.sum() - torch.diagonal(k_yy).sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid_subsets(fake: np.ndarray, real: np.ndarray, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
                seed: int = SEED, device: torch.device | str = "cpu") -> np.ndarray:
    """MMD² per subset (float64), subsets drawn exactly as torch-fidelity draws them (fake rows, then real rows).

    `fake` and `real` may be memory-mapped (float16 on disk); only one subset's rows are read at a time.
    """
    n_fake, n_real = len(fake), len(real)
    if subset_size < 2 or n_fake < subset_size or n_real < subset_size:
        raise ValueError(f"KID subset size {subset_size} needs 2 <= size <= N (fake {n_fake}, real {n_real})")
    rng = np.random.RandomState(seed)
    out = np.zeros(subsets, dtype=np.float64)
    for i in range(subsets):
        idx_fake = rng.choice(n_fake, subset_size, replace=False)
        idx_real = rng.choice(n_real, subset_size, replace=False)
        x = torch.from_numpy(np.asarray(fake[idx_fake], dtype=np.float64)).to(device)
        y = torch.from_numpy(np.asarray(real[idx_real], dtype=np.float64)).to(device)
        out[i] = polynomial_mmd2(x, y)
    return out


@register_metric(KEY)
class KIDMetric(PairedFeatureMetric):
    """KID of reconstructions vs originals on Inception pool features, over subsets as torch-fidelity (opt-in).

    Unbiased MMD² with the polynomial kernel (x·y/d + 1)³; see the module docstring."""

    pair_name = "KID"
    family, card_group = "kid", "kid"
    outputs = {KEY: "lower"}
    weights = (WEIGHT_NAME,)
    selected_by_default = False

    def __init__(self, device: torch.device | str = "cpu", *, weights_path: Optional[str | Path] = None,
                 required: bool = False, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE, seed: int = SEED,
                 features_dir: Optional[str | Path] = None, keep_features: bool = False,
                 extractor: Optional[Any] = None, shared: Optional[dict] = None) -> None:
        if int(subsets) < 1 or int(subset_size) < 2:
            raise UserError(f"KID: subsets {subsets!r} / subset size {subset_size!r}; expected >= 1 and >= 2")
        self.device = torch.device(device)
        self.subsets, self.subset_size, self.seed = int(subsets), int(subset_size), int(seed)
        path, self._unavailable = resolve_weights(WEIGHT_NAME, weights_path, required)
        self.weights_path = path
        self.model = None
        self.store: Optional[FeatureStore] = None
        if path is not None:
            self.model = extractor if extractor is not None else shared_inception(shared, path, self.device,
                                                                                  FEATURE_LAYER)
            self.store = FeatureStore(features_dir, ("fake", "real"), int(FEATURE_LAYER), keep=keep_features)
        self.used_subset_size: Optional[int] = None
        self.std: Optional[float] = None

    @classmethod
    def create(cls, ctx: MetricContext) -> "KIDMetric":
        keep = bool(getattr(ctx.settings, "keep_features", False))
        return cls(ctx.device, required=ctx.requires_any(tuple(cls.outputs)), shared=ctx.shared,
                   features_dir=store_root(ctx.out_dir, KEY, keep), keep_features=keep)

    @classmethod
    def comparable(cls, key: str, facts: Facts) -> Optional[str]:
        # the estimator is unbiased at any N (unlike FD): only the two-sample minimum of the U-statistic remains
        if facts.n_images < 2:
            return f"KID needs at least 2 images per side; N = {facts.n_images}"
        return None

    def _features(self, images_u8: torch.Tensor) -> torch.Tensor:
        with exact_fp32():  # a SharedExtractor moves the batch itself (and may hand back rFID's forward of it)
            return self.model(images_u8 if isinstance(self.model, SharedExtractor) else images_u8.to(self.device))[0]

    def compute(self) -> list[MetricValue]:
        if self.model is None:
            return [MetricValue.missing(KEY, self._unavailable, "lower")]
        value, std, m, n = compute_on_main(self._compute_main)
        self.std, self.used_subset_size = std, m
        if value is None:
            return [MetricValue.missing(KEY, f"KID needs at least 2 images per side, got {n}", "lower")]
        return [MetricValue(KEY, value, direction="lower", n=n)]

    def _compute_main(self) -> tuple[Optional[float], Optional[float], Optional[int], int]:
        fake, real = self.store.open("fake"), self.store.open("real")
        n = min(len(fake), len(real))
        m = min(self.subset_size, len(fake), len(real))
        if m < 2:
            return None, None, None, n
        mmds = kid_subsets(fake, real, self.subsets, m, self.seed, self.device)
        return float(np.mean(mmds)), float(np.std(mmds)), m, int(len(fake))

    def card(self) -> dict:
        import torch_fidelity

        weights = inception_extractor_fields(self.weights_path, FEATURE_LAYER)["weights_sha256"] \
            if self.weights_path is not None else None
        return {"kid_backend": f"torch-fidelity {torch_fidelity.__version__} kid_features_to_metric, reproduced",
                "kid_extractor": EXTRACTOR, "kid_weights_sha256": weights, "kid_feature_layer": FEATURE_LAYER,
                "kid_resize": RESIZE_MODE, "kid_subsets": self.subsets, "kid_subset_size": self.used_subset_size,
                "kid_subset_size_requested": self.subset_size, "kid_kernel": "polynomial (x.y/d + 1)^3",
                "kid_estimator": "unbiased MMD^2", "kid_seed": self.seed,
                "kid_sampling": "numpy RandomState(seed); per subset choice(N_fake, m) then choice(N_real, m), "
                                "no replacement",
                "kid_feature_storage": "float16 .npy, sorted by image id", "kid_arithmetic": "float64",
                "kid_min_images": 2, "kid_std_over_subsets": self.std}
