"""rFID and IS with torch-fidelity's TF-compatible Inception (metrics-protocol.md §6, §7).

Follows torch-fidelity (`FeatureExtractorInceptionV3('inception-v3-compat')`, TF1 bilinear resize to 299 inside;
`metric_fid.fid_statistics_to_metric`, `metric_isc.isc_features_to_metric`) and Heusel et al. 2017 for FID. The
streaming float64 statistics, the distance and the verified reference-statistics file/cache are the shared Fréchet
code path in gsqbench/metrics/frechet.py (also used by `rfd@dinov2`); this module adds the Inception extractor and
IS (Salimans et al. 2016: the fake side's bias-free logits, softmax in float64, seeded permutation, 10 splits).
When the real side's statistics come from a file or the cache, its Inception pass is skipped.
The built extractor is shared through the evaluation's `MetricContext.shared` (KID uses the same network and, via
`SharedExtractor`, the same forward of each batch).

Measurability (`comparable`): FID and IS need N ≥ 2,048 images (below the 2,048-d feature dimension the covariance
is rank-deficient and FID is dominated by its small-N bias); from 2,048 to 10,000 images the value is comparable
only at equal N (the card's data group carries N): `compute` logs a warning and the card's `fid.fid_note` says so.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.io import sha256_file
from gsqbench.metrics.base import Facts, Metric, MetricContext, MetricValue
from gsqbench.metrics.common import SharedExtractor, check_image_pair, exact_fp32, resolve_weights, shared_object
# re-exported: the shared Fréchet code path (callers and tests import these names from here)
from gsqbench.metrics.frechet import (  # noqa: F401
    CALLER_KEY_FIELDS, FeatureStats, RealReference, frechet_distance, frechet_value, load_reference_stats,
    reference_key, save_reference_stats,
)
from gsqbench.registry import register_metric

log = logging.getLogger(__name__)

EXTRACTOR = "inception-v3-compat"
WEIGHT_NAME = "inception-fid"
FEATURE_LAYERS = ("64", "192", "768", "2048")
_LAYERS = ", ".join(FEATURE_LAYERS)
LOGITS = "logits_unbiased"
RESIZE_MODE = "tf1-bilinear-299-align_corners_false-no-antialias"
DTYPES = "extractor float32 (tf32 off); statistics float64"
IS_SPLITS, IS_SEED = 10, 2020
#: images from which FID/IS are comparable at all, and below which they are flagged (biased upward at small N)
MIN_IMAGES, WARN_IMAGES = 2048, 10_000


# ---------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = IS_SEED) -> tuple[float, float, list]:
    """(mean, std, per-split scores) of exp(E_x KL(p(y|x) ‖ p(y))) over `splits` row blocks of a seeded permutation.

    Blocks are rows [i·N/splits, (i+1)·N/splits) after `np.random.RandomState(seed).permutation(N)`, as torch-fidelity
    does, so the value is reproducible from the card (§13 #18). std is the population std over splits. Each block is
    converted to float64 on its own, so the working memory is N/splits rows, not N (400 MB at N = 50,000).
    """
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"IS needs at least {splits} images (one per split), got {n}")
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(n))
    logits = logits.detach().cpu()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_p = torch.log_softmax(logits[perm[lo:hi]].to(torch.float64), dim=1)
        p = log_p.exp()
        log_marginal = p.mean(dim=0).log()
        kl = (p * (log_p - log_marginal)).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores)), scores


class RowStore:
    """Per-image rows (the fake side's logits for IS) kept in a few large float32 blocks instead of one small tensor
    per batch: small long-lived allocations interleaved with the pass's large temporaries fragment the C heap, which
    then holds several times the data (seen at N = 10,000-50,000)."""

    BLOCK_ROWS = 4096

    def __init__(self, width: int) -> None:
        self.width = width
        self._blocks: list[torch.Tensor] = []
        self._fill = 0  # rows used in the last block
        self.rows = 0

    def append(self, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", torch.float32)
        done = 0
        while done < values.shape[0]:
            if not self._blocks or self._fill == self._blocks[-1].shape[0]:
                self._blocks.append(torch.empty(self.BLOCK_ROWS, self.width, dtype=torch.float32))
                self._fill = 0
            take = min(self._blocks[-1].shape[0] - self._fill, values.shape[0] - done)
            self._blocks[-1][self._fill:self._fill + take] = values[done:done + take]
            self._fill += take
            done += take
            self.rows += take

    def tensor(self) -> torch.Tensor:
        """All rows as one (rows, width) float32 tensor (a view of the store when it is one block)."""
        if not self.rows:
            return torch.zeros(0, self.width)
        parts = [*self._blocks[:-1], self._blocks[-1][: self._fill]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def replace(self, values: torch.Tensor) -> None:
        """Hold exactly `values` (adopted as one block, no copy); later appends start a new block."""
        values = values.detach().to("cpu", torch.float32).contiguous()
        self._blocks = [values] if values.shape[0] else []
        self._fill = self.rows = int(values.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Extractor


def build_inception(
    weights_path: str | Path, device: torch.device | str = "cpu", feature_layer: str = "2048"
) -> torch.nn.Module:
    """torch-fidelity's TF-compatible InceptionV3 returning (features[layer], logits_unbiased) per batch.

    torch-fidelity unpickles its weight file with weights_only=False into a randomly initialised network. Here the
    file is loaded with weights_only=True; torch-fidelity's constructor runs on the meta device with a tensor-free
    copy of the state dict (its own strict key/shape check still applies, no untrusted pickle is executed and no
    random init is spent), and the checked tensors are then assigned into the module it built.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if feature_layer not in FEATURE_LAYERS:
        raise UserError(f"FID feature layer: '{feature_layer}' is not valid; expected one of {_LAYERS}")
    from gsqbench.tensorfile import load_state_file, meta_state_buffer

    state = load_state_file(weights_path, "Inception weights")
    buf = meta_state_buffer(state)
    try:
        with torch.device("meta"):
            model = FeatureExtractorInceptionV3(
                EXTRACTOR, [feature_layer, LOGITS], feature_extractor_weights_path=buf,
                feature_extractor_internal_dtype="float32",
            )
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
        raise UserError(
            f"Inception weights {weights_path}: not a torch-fidelity InceptionV3 state dict ({exc})"
        ) from None
    model.load_state_dict({k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous()
                           for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def inception_trunk(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch-fidelity's InceptionV3 layers after its input normalisation: (2048-d pool features, logits_unbiased).

    The layer sequence of `FeatureExtractorInceptionV3.forward` from Conv2d_1a_3x3 on, for an input already resized
    to 299 and scaled to [-1, 1] (tests/test_leaderboard.py checks it against torch-fidelity's own forward)."""
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
        x = getattr(model, name)(x)
    x = torch.flatten(x, 1)
    return x.to(torch.float32), x.mm(model.fc.weight.T).to(torch.float32)


class PytorchFidFrontEnd(torch.nn.Module):
    """pytorch-fid's InceptionV3 input handling on float images in [0, 1] (Open-MAGVIT2's metrics/inception.py:
    `F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)`, then `2x − 1`), followed by the FID
    Inception trunk (`inception_trunk`, the same 2015-12-05 FID weights). Nothing is rounded to uint8."""

    RESIZE = "pytorch-fid: F.interpolate bilinear 299, align_corners False, float [0,1] input, then 2x-1"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.nn.functional.interpolate(x01.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return inception_trunk(self.model, 2 * x - 1)


def shared_inception(shared: Optional[dict], weights_path: Path, device: torch.device,
                     feature_layer: str = "2048") -> SharedExtractor:
    """The evaluation's one Inception (features[layer], logits) extractor for these weights, built on first use."""
    return shared_object(shared, ("inception", str(weights_path), str(device), feature_layer),
                         lambda: SharedExtractor(build_inception(weights_path, device, feature_layer), device))


def shared_float_inception(shared: Optional[dict], weights_path: Path, device: torch.device) -> SharedExtractor:
    """The evaluation's one pytorch-fid-style float extractor (on the same Inception network as `shared_inception`)."""
    base = shared_inception(shared, weights_path, device)
    return shared_object(shared, ("inception-float", str(weights_path), str(device)),
                         lambda: SharedExtractor(PytorchFidFrontEnd(base.model), device))


def inception_extractor_fields(weights_path: Path, feature_layer: str, float_input: bool = False) -> dict:
    """The extractor half of the §6 reference key (and of the card): what makes two feature sets comparable."""
    import torch_fidelity

    return {"extractor": EXTRACTOR, "weights_sha256": sha256_file(weights_path), "feature_layer": feature_layer,
            "resize": PytorchFidFrontEnd.RESIZE if float_input else RESIZE_MODE, "dtypes": DTYPES,
            "torch_fidelity": torch_fidelity.__version__}


def _check_float_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    for side, t in (("real", real), ("fake", fake)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 4 or t.shape[1] != 3:
            raise UserError(f"FID (float input) {side}: expected float (b, 3, H, W) images in [0, 1], got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if real.shape != fake.shape:
        raise UserError(f"FID (float input): real shape {tuple(real.shape)} != fake shape {tuple(fake.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Metric


@register_metric("rfid@inception")
class FIDMetric(Metric):
    """rFID and Inception Score of the reconstructions, TF-FID Inception features (torch-fidelity), float64 stats.

    `rfid@inception` (lower is better) against the originals and `is@inception` (higher is better).

    `reference`: the evaluator's key fields (dataset, split, crop, n, ids_hash, originals_hash); with `cache_dir`
    the real statistics are cached under that key. `reference_stats`: a precomputed npz (mu, sigma, optional n and
    key fields). When real statistics come from a file, `update` runs Inception on the fake side only.
    `extractor`: an already built `build_inception(weights_path, device, feature_layer)` to reuse; `shared`: the
    evaluation's shared-object dict (MetricContext.shared), so KID reuses this network and each batch's forward.
    """

    family, card_group = "fid", "fid"
    outputs = {"rfid@inception": "lower", "is@inception": "higher"}
    weights = (WEIGHT_NAME,)
    reference_stats = True

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        weights_path: Optional[str | Path] = None,
        required: bool = False,
        reference: Optional[Mapping[str, Any]] = None,
        cache_dir: Optional[str | Path] = None,
        reference_stats: Optional[str | Path] = None,
        feature_layer: str = "2048",
        is_splits: int = IS_SPLITS,
        is_seed: int = IS_SEED,
        extractor: Optional[Any] = None,
        shared: Optional[dict] = None,
        float_input: bool = False,
    ) -> None:
        if feature_layer not in FEATURE_LAYERS:
            raise UserError(f"FID feature layer: '{feature_layer}' is not valid; expected one of {_LAYERS}")
        if float_input and (feature_layer != "2048" or reference_stats is not None or cache_dir is not None):
            raise UserError("rFID on float images (magvit2-compat) computes the real statistics in the same pass from "
                            "the 2048-d features; a reference statistics file, a cache or another layer is not used")
        # `input`: the pair `update` receives (gsqbench.evaluate); float01 = the never-rounded float [0, 1] images
        self.float_input = bool(float_input)
        self.input = "float01" if float_input else "uint8"
        if int(is_splits) < 1:
            raise UserError(f"IS splits: {is_splits!r}; expected a positive integer (default {IS_SPLITS})")
        self.device = torch.device(device)
        self.feature_layer, self.is_splits, self.is_seed = feature_layer, int(is_splits), int(is_seed)
        path, self._unavailable = resolve_weights(WEIGHT_NAME, weights_path, required)
        self.weights_path = path
        if path is None:
            self.model = None
        elif extractor is not None:  # a caller may share one built extractor (same weights file)
            self.model = extractor
        elif float_input:
            self.model = shared_float_inception(shared, path, self.device)
        else:
            self.model = shared_inception(shared, path, self.device, feature_layer)
        dim = int(feature_layer)
        self.real = FeatureStats(dim, self.device)
        self.fake = FeatureStats(dim, self.device)
        self._logits = RowStore(1008)
        self._ids: list[str] = []
        self.reference: Optional[RealReference] = None
        self.is_std: Optional[float] = None  # population std over splits (torch-fidelity's "±"), set by compute
        self._synced = False
        if self.model is not None:
            self.reference = RealReference(what="FID", prefix="fid-ref", dim=dim,
                                           extractor_fields=self._extractor_fields(), reference=reference,
                                           cache_dir=cache_dir, stats_file=reference_stats)

    @classmethod
    def create(cls, ctx: MetricContext) -> "FIDMetric":
        from gsqbench.modes import get_mode

        s = ctx.settings
        if get_mode(s.mode).fid_input == "float01":  # the same-pass statistics of the float images (modes.py)
            if s.fid_reference_stats:
                raise UserError(f"--fid-reference-stats: not used in eval.mode {s.mode!r}, which computes the real "
                                "statistics of the float images in the same pass (as its upstream does)")
            return cls(ctx.device, required=ctx.requires_any(tuple(cls.outputs)), shared=ctx.shared, float_input=True)
        return cls(ctx.device, required=ctx.requires_any(tuple(cls.outputs)), reference=ctx.fid_reference,
                   cache_dir=s.fid_cache_dir, reference_stats=s.fid_reference_stats, shared=ctx.shared)

    @classmethod
    def comparable(cls, key: str, facts: Facts) -> Optional[str]:
        """Comparable from N ≥ 2,048 images (module docstring)."""
        if facts.n_images >= MIN_IMAGES:
            return None
        what = "FID" if key == "rfid@inception" else "IS"
        return (f"N = {facts.n_images:,} images < {MIN_IMAGES:,}: {what} of the 2,048-d Inception features is "
                f"dominated by small-N bias (comparable from N = {MIN_IMAGES:,}; at equal N up to {WARN_IMAGES:,})")

    def small_n_note(self) -> Optional[str]:
        """The card note (and logged warning) for 2,048 ≤ N < 10,000 images."""
        n = int(self.fake.n)
        if self.model is None or not MIN_IMAGES <= n < WARN_IMAGES:
            return None
        return f"N = {n:,} < {WARN_IMAGES:,}: FID is biased upward at small N; compare only rows with equal N"

    def card_fields(self) -> dict[str, dict]:
        """The `fid` group, and the `is` group of the Inception Score computed from the same features."""
        return {"fid": self.card(), "is": {"splits": self.is_splits, "permutation_seed": self.is_seed,
                                            "logits": LOGITS, "softmax_dtype": "float64"}}

    def _extractor_fields(self) -> dict:
        return inception_extractor_fields(self.weights_path, self.feature_layer, self.float_input)

    @property
    def key(self) -> Optional[dict]:
        return self.reference.key if self.reference is not None else None

    @property
    def key_sha(self) -> Optional[str]:
        return self.reference.key_sha if self.reference is not None else None

    @property
    def lookup_sha(self) -> Optional[str]:
        return self.reference.lookup_sha if self.reference is not None else None

    @property
    def reference_source(self) -> str:
        return self.reference.source if self.reference is not None else "computed"

    @property
    def uses_cached_reference(self) -> bool:
        return self.reference is not None and self.reference.precomputed

    def _features(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with exact_fp32():
            feats, logits = self.model(images_u8.to(self.device) if not isinstance(self.model, SharedExtractor)
                                       else images_u8)
        return feats, logits

    @torch.no_grad()
    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        if self.model is None:
            return
        if self.float_input:
            _check_float_pair(real_u8, fake_u8)
        else:
            check_image_pair(real_u8, fake_u8, what="FID")
        if len(image_ids) != fake_u8.shape[0]:
            raise UserError(f"FID: got {len(image_ids)} image ids for a batch of {fake_u8.shape[0]} images")
        if not self.uses_cached_reference:
            self.real.update(self._features(real_u8)[0])
        feats, logits = self._features(fake_u8)
        self.fake.update(feats)
        self._logits.append(logits)  # copied into the store's blocks
        self._ids.extend(str(i) for i in image_ids)

    def check_reference(self, fields: Mapping[str, Any]) -> bool:
        """After the pass: verify file/cache statistics against the complete key (see frechet.RealReference.check);
        True when a stale cache was dropped and the real images must be fed again (`update_real`)."""
        return self.reference.check(fields) if self.reference is not None else False

    @torch.no_grad()
    def update_real(self, real_u8: torch.Tensor, image_ids: Sequence[str]) -> None:
        """Real side only: the second read after `check_reference` returned True, or `gsqbench stats`."""
        if self.model is None:
            return
        if len(image_ids) != real_u8.shape[0]:
            raise UserError(f"FID: got {len(image_ids)} image ids for a batch of {real_u8.shape[0]} images")
        self.real.update(self._features(real_u8)[0])

    def export_reference(self, path: str | Path, fields: Mapping[str, Any]) -> Path:
        """Write the real-side statistics (after `sync`) with the complete key of `fields` (`gsqbench stats`): the
        file `--fid-reference-stats` verifies."""
        self.reference.set_key(fields)
        mu, sigma = self.real.mean_cov()
        return save_reference_stats(path, mu, sigma, int(self.real.n), self.reference.key, self.reference.key_sha)

    def state_dict(self) -> dict[str, Any]:
        """Streaming state for a resumable evaluation: both sides' (μ, M2, N, buffered rows), the fake logits and
        their ids."""
        if self.model is None:
            return {"unavailable": True}
        return {"real": self.real.state_dict(), "fake": self.fake.state_dict(), "ids": list(self._ids),
                "logits": self._logits.tensor().clone(),  # a view would save its whole block
                "reference_source": self.reference.source, "synced": self._synced}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (self.model is None) != bool(state.get("unavailable")):
            raise ValueError("FID state saved with the other weights availability")
        if self.model is None:
            return
        if state["reference_source"] != self.reference.source:
            raise ValueError(f"FID state used reference {state['reference_source']}, now {self.reference.source}")
        self.real.load_state_dict(state["real"])
        self.fake.load_state_dict(state["fake"])
        self._ids = list(state["ids"])
        self._logits.replace(state["logits"])
        self._synced = bool(state["synced"])

    def sync(self) -> None:
        """All-reduce the float64 sums/int64 counts; gather fake logits by image id (sorted) for IS."""
        if self.model is None or self._synced:
            return
        self._synced = True
        self.real.sync()
        self.fake.sync()
        local = self._logits.tensor()
        self._logits = RowStore(1008)  # one copy of the logits alive (two while sorting below)
        # one array per rank (not one object per image): gathered, then ordered by image id like every metric (§10)
        parts = distributed.all_gather_objects((self._ids, local.numpy()))
        ids = [i for part in parts for i in part[0]]
        order = sorted(range(len(ids)), key=ids.__getitem__)
        dup = next((ids[a] for a, b in zip(order, order[1:]) if ids[a] == ids[b]), None)
        if dup is not None:
            raise UserError(f"image id '{dup}' occurs more than once in the evaluation set; image ids must be unique")
        rows = parts[0][1] if len(parts) == 1 else np.concatenate([part[1] for part in parts])
        self._ids = [ids[k] for k in order]
        if ids:
            self._logits.replace(torch.from_numpy(rows[order]))

    def compute(self) -> list[MetricValue]:
        if self.model is None:
            return [MetricValue.missing(k, self._unavailable, d) for k, d in self.outputs.items()]
        fid = frechet_value("rfid@inception", self.real, self.fake, self.reference, "FID")
        logits = self._logits.tensor()
        try:
            mean, std, scores = inception_score(logits, self.is_splits, self.is_seed)
            self.is_std = std
            # stderr of the mean over splits (sample std); the population std torch-fidelity prints is `is_std`
            stderr = float(np.std(scores, ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else None
            is_value = MetricValue("is@inception", mean, stderr=stderr, direction="higher", n=logits.shape[0])
        except ValueError as exc:
            is_value = MetricValue.missing("is@inception", str(exc), "higher")
        if self.small_n_note():
            log.warning("rfid@inception / is@inception: %s", self.small_n_note())
        return [fid, is_value]

    def card(self) -> dict:
        import torch_fidelity

        ref = self.reference
        return {"fid_backend": f"torch-fidelity {torch_fidelity.__version__}", "fid_extractor": EXTRACTOR,
                "fid_weights_sha256": self._extractor_fields()["weights_sha256"] if self.model is not None else None,
                "fid_feature_layer": self.feature_layer, "fid_resize": RESIZE_MODE, "fid_antialias": False,
                "fid_dtypes": DTYPES, "fid_reference_key": self.key_sha,
                "fid_reference_source": ref.source if ref is not None else "computed",
                "fid_n_real": ref.n if ref is not None and ref.precomputed else int(self.real.n),
                "fid_n_fake": int(self.fake.n), "is_splits": self.is_splits, "is_permutation_seed": self.is_seed,
                "is_logits": LOGITS, "is_std_over_splits": self.is_std,
                **({"fid_note": self.small_n_note()} if self.small_n_note() else {}),
                **({"fid_resize": PytorchFidFrontEnd.RESIZE, "fid_input": "float [0,1], never rounded"}
                   if self.float_input else {})}
