"""rFID and IS with torch-fidelity's TF-compatible Inception (metrics-protocol.md §6, §7).

Follows torch-fidelity (`FeatureExtractorInceptionV3('inception-v3-compat')`, TF1 bilinear resize to 299 inside;
`metric_fid.fid_statistics_to_metric`, `metric_isc.isc_features_to_metric`) and Heusel et al. 2017 for FID:
features of real and fake images are streamed into float64 sums Σf, Σffᵀ and counts N per side (all-reduced
across ranks), μ = Σf/N, Σ = (Σffᵀ − Nμμᵀ)/(N − 1), and
FID = ‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2·Σ Re √eig(Σ_r Σ_f) in float64.
IS (Salimans et al. 2016) uses the fake side's bias-free logits, softmax in float64, seeded permutation, 10 splits.
The real side's statistics can come from a verified reference-statistics cache (keyed by SHA-256 over the §6 key
fields), in which case its Inception pass is skipped.

Key fields the evaluator only knows after its single pass over the data (the originals hash, and N and the id list
when an unreadable image was skipped) may be passed as None ("pending"): the cache is then looked up by the other
fields (the cache file name is the SHA-256 of the key without `originals_hash`), and `check_reference` verifies the
complete key once the pass is done. A stale cache entry is then dropped and the real side recomputed (a second
read, only in that case); a user's statistics file that does not match is an error.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes, sha256_file
from gsqbench.metrics.base import Metric, MetricContext, MetricValue
from gsqbench.metrics.common import check_image_pair, exact_fp32, resolve_weights
from gsqbench.registry import register_metric

log = logging.getLogger(__name__)

EXTRACTOR = "inception-v3-compat"
FEATURE_LAYERS = ("64", "192", "768", "2048")
_LAYERS = ", ".join(FEATURE_LAYERS)
LOGITS = "logits_unbiased"
RESIZE_MODE = "tf1-bilinear-299-align_corners_false-no-antialias"
DTYPES = "extractor float32 (tf32 off); statistics float64"
IS_SPLITS, IS_SEED = 10, 2020
# fields the evaluator provides; the metric adds the extractor-side fields (§6)
CALLER_KEY_FIELDS = ("dataset", "split", "crop", "n", "ids_hash", "originals_hash")
# known only after reading every image: not part of the cache file's name, verified once the pass is done
POST_PASS_FIELDS = ("originals_hash",)
# fields that may be pending (None) before the pass: N and the id list change when an image cannot be read, and a
# dataset without an `ids` list only knows them afterwards
PENDABLE_FIELDS = ("n", "ids_hash", "originals_hash")


# ---------------------------------------------------------------------------------------------------------------
# Statistics and distances


class FeatureStats:
    """Streaming mean and centred scatter (float64) and N (int64) of one side's features.

    Batches are merged with Chan et al.'s pairwise update (n, μ, M2 = Σ(f − μ)(f − μ)ᵀ) instead of raw sums Σf and
    Σffᵀ: features far from the origin make Σffᵀ − Nμμᵀ cancel catastrophically even in float64 (§13 #13), while the
    centred form keeps the covariance accurate to rounding and (nearly) independent of batching and sharding.

    Rows are buffered and merged MERGE_ROWS at a time: each merge costs several passes over the d×d scatter
    (32 MB at d = 2048), which per batch of 32 images cost more than the Inception forwards on a CPU. Merge points
    depend only on the sequence of rows (the buffer is part of `state_dict`), so results stay reproducible.
    """

    MERGE_ROWS = 1024

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.int64, device=device)  # merged rows (call flush() before reading)
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._synced = False

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = int(self.n)
        n = n_a + n_b
        if n_b == 0:
            return
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2.add_(m2_b).addr_(delta, delta, alpha=n_a * n_b / n)  # in place: no d×d temporaries
        self.n = self.n + n_b

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to(self.mean.device, torch.float64)  # (b, d); float64 before any product (§13 #13)
        if f.shape[0] == 0:
            return
        self._buffer.append(f)
        self._buffered += f.shape[0]
        if self._buffered >= self.MERGE_ROWS:
            self.flush()

    def flush(self) -> None:
        """Merge the buffered rows."""
        if not self._buffer:
            return
        f = torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        mean_b = f.mean(dim=0)
        centred = f - mean_b
        self._merge(f.shape[0], mean_b, centred.T @ centred)

    def state_dict(self) -> dict[str, Any]:
        dim = self.mean.numel()
        buffer = torch.cat(self._buffer).cpu() if self._buffer else torch.zeros(0, dim, dtype=torch.float64)
        return {"mean": self.mean.cpu(), "m2": self.m2.cpu(), "n": int(self.n), "synced": self._synced,
                "buffer": buffer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.mean.device
        self.mean = state["mean"].to(device, torch.float64)
        self.m2 = state["m2"].to(device, torch.float64).clone()
        self.n = torch.tensor(int(state["n"]), dtype=torch.int64, device=device)
        buffer = state["buffer"].to(device, torch.float64)
        self._buffer, self._buffered = ([buffer], buffer.shape[0]) if buffer.shape[0] else ([], 0)
        self._synced = bool(state["synced"])

    def sync(self) -> None:
        """Merge every rank's (n, μ, M2) in rank order (once; a second call would double-count)."""
        if self._synced:
            return
        self.flush()
        parts = distributed.all_gather_objects((int(self.n), self.mean.cpu(), self.m2.cpu()))
        device = self.mean.device
        self.mean = torch.zeros_like(self.mean)
        self.m2 = torch.zeros_like(self.m2)
        self.n = torch.zeros_like(self.n)
        for n_b, mean_b, m2_b in parts:
            self._merge(n_b, mean_b.to(device), m2_b.to(device))
        self._synced = True

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ (d,) and unbiased Σ (d, d) as float64 numpy arrays; needs N ≥ 2."""
        self.flush()
        n = int(self.n)
        if n < 2:
            raise ValueError(f"FID statistics need at least 2 images per side, got {n}")
        sigma = self.m2 / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # symmetric up to rounding; make it exactly so
        return self.mean.cpu().numpy(), sigma.cpu().numpy()


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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·Σ Re √eig(Σ1Σ2) in float64, the eigenvalue form torch-fidelity uses.

    eig(Σ1Σ2) of two PSD matrices is real and ≥ 0 in exact arithmetic; rounding can give tiny negative or complex
    values, so the square root is taken in complex128 and only the real part kept.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise UserError(f"FID statistics: shapes μ {mu1.shape}/{mu2.shape}, Σ {sigma1.shape}/{sigma2.shape} differ")
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = float(np.sqrt(eig).real.sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


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


# ---------------------------------------------------------------------------------------------------------------
# Extractor


def build_inception(
    weights_path: str | Path, device: torch.device | str = "cpu", feature_layer: str = "2048"
) -> torch.nn.Module:
    """torch-fidelity's TF-compatible InceptionV3 returning (features[layer], logits_unbiased) per batch.

    torch-fidelity unpickles its weight file with weights_only=False; we load it with weights_only=True ourselves
    and hand over an in-memory re-serialisation of the plain tensors, so no untrusted pickle is ever executed.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if feature_layer not in FEATURE_LAYERS:
        raise UserError(f"FID feature layer: '{feature_layer}' is not valid; expected one of {_LAYERS}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"Inception weights {weights_path}: cannot load as a tensor state dict ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Inception weights {weights_path}: expected a state dict of tensors")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        model = FeatureExtractorInceptionV3(
            EXTRACTOR, [feature_layer, LOGITS], feature_extractor_weights_path=buf,
            feature_extractor_internal_dtype="float32",
        )
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
        raise UserError(
            f"Inception weights {weights_path}: not a torch-fidelity InceptionV3 state dict ({exc})"
        ) from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Reference-statistics cache


def reference_key(caller_fields: Mapping[str, Any], extractor_fields: Mapping[str, Any]) -> tuple[dict, str]:
    """The §6 key (caller's data fields + extractor fields) and its SHA-256 over canonical JSON."""
    missing = [f for f in CALLER_KEY_FIELDS if f not in caller_fields]
    if missing:
        raise UserError(
            f"FID reference key: missing field(s) {', '.join(missing)}; expected {', '.join(CALLER_KEY_FIELDS)}"
        )
    key = {**{k: caller_fields[k] for k in sorted(caller_fields)}, **extractor_fields}
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return json.loads(canonical), hashlib.sha256(canonical.encode()).hexdigest()


def lookup_sha(key: Mapping[str, Any]) -> Optional[str]:
    """SHA-256 of a key without its post-pass fields (the cache file's name); None while another field is pending."""
    rest = {k: v for k, v in key.items() if k not in POST_PASS_FIELDS}
    if any(rest.get(k) is None for k in PENDABLE_FIELDS if k not in POST_PASS_FIELDS):
        return None
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def save_reference_stats(
    path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int, key: Mapping, key_sha: str
) -> Path:
    """Write μ, Σ (float64), N and the key fields as one npz, atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), n=np.int64(n),
             key_json=np.array(json.dumps(dict(key), sort_keys=True, default=str)), key_sha256=np.array(key_sha))
    return atomic_write_bytes(path, buf.getvalue())


def load_reference_stats(
    path: str | Path, expected_key: Optional[Mapping] = None
) -> tuple[np.ndarray, np.ndarray, Optional[int], Optional[dict]]:
    """(μ, Σ, N or None, key or None) from an npz, verified: shapes, finiteness and, when given, every key field
    (fields whose expected value is None are pending: the caller verifies them later with `key_mismatch`).

    Files without key fields (the ADM / torch-fidelity layout: just `mu` and `sigma`) are accepted with a warning
    that their provenance is unknown."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as exc:
        raise UserError(f"FID reference statistics {path}: cannot read as .npz ({exc})") from None
    if "mu" not in data or "sigma" not in data:
        raise UserError(f"FID reference statistics {path}: needs arrays 'mu' and 'sigma' (found {sorted(data)})")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(
            f"FID reference statistics {path}: mu {mu.shape} / sigma {sigma.shape}; expected finite (d,) and (d, d)"
        )
    n = int(data["n"]) if "n" in data else None
    stored = json.loads(str(data["key_json"])) if "key_json" in data else None
    if expected_key is not None and stored is not None:
        _verify_key(path, stored, expected_key)
    if stored is None:
        log.warning("reference statistics %s carry no key fields (e.g. the ADM / torch-fidelity mu/sigma layout): "
                    "their provenance is unknown; data, crop, N and extractor are unverified", path)
    return mu, sigma, n, stored


def key_mismatch(stored: Mapping, expected: Mapping) -> list[str]:
    """Fields the file records that differ from this evaluation's (pending fields, None in PENDABLE_FIELDS, are
    skipped); data fields first."""
    bad = [k for k in stored
           if not (k in PENDABLE_FIELDS and k in expected and expected[k] is None) and stored[k] != expected.get(k)]
    return sorted(bad, key=lambda k: (k not in CALLER_KEY_FIELDS, k))


def _mismatch_message(path: Path, stored: Mapping, expected: Mapping, bad: Sequence[str]) -> str:
    f = bad[0]
    return (f"FID reference statistics {path}: field '{f}' is {stored.get(f)!r}, this evaluation needs "
            f"{expected.get(f)!r} ({len(bad)} field(s) differ); delete the file or use matching statistics")


def _verify_key(path: Path, stored: Mapping, expected: Mapping) -> None:
    """Every field the file records must equal this evaluation's; data fields are reported before extractor ones."""
    bad = key_mismatch(stored, expected)
    if bad:
        raise UserError(_mismatch_message(path, stored, expected, bad))
    unverified = sorted(set(expected) - set(stored))
    if unverified:
        log.warning("reference statistics %s do not record %s: unverified", path, ", ".join(unverified))


# ---------------------------------------------------------------------------------------------------------------
# Metric


@register_metric("rfid@inception")
class FIDMetric(Metric):
    """`rfid@inception` (lower is better) and `is@inception` (higher is better) of reconstructions vs originals.

    `reference`: the evaluator's key fields (dataset, split, crop, n, ids_hash, originals_hash); with `cache_dir`
    the real statistics are cached under that key. `reference_stats`: a precomputed npz (mu, sigma, optional n and
    key fields). When real statistics come from a file, `update` runs Inception on the fake side only.
    `extractor`: an already built `build_inception(weights_path, device, feature_layer)` to reuse.
    """

    family, card_group = "fid", "fid"
    outputs = {"rfid@inception": "lower", "is@inception": "higher"}
    weights = ("inception-fid",)
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
        extractor: Optional[torch.nn.Module] = None,
    ) -> None:
        if feature_layer not in FEATURE_LAYERS:
            raise UserError(f"FID feature layer: '{feature_layer}' is not valid; expected one of {_LAYERS}")
        if int(is_splits) < 1:
            raise UserError(f"IS splits: {is_splits!r}; expected a positive integer (default {IS_SPLITS})")
        self.device = torch.device(device)
        self.feature_layer, self.is_splits, self.is_seed = feature_layer, int(is_splits), int(is_seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        path, self._unavailable = resolve_weights("inception-fid", weights_path, required)
        self.weights_path = path
        if path is None:
            self.model = None
        else:  # a caller may share one built extractor (same weights file) across metric instances
            self.model = extractor if extractor is not None else build_inception(path, self.device, feature_layer)
        dim = int(feature_layer)
        self.real = FeatureStats(dim, self.device)
        self.fake = FeatureStats(dim, self.device)
        self._logits = RowStore(1008)
        self._ids: list[str] = []
        self.key: Optional[dict] = None
        self.key_sha: Optional[str] = None
        self.lookup_sha: Optional[str] = None  # the cache file's name: the key without post-pass fields
        self.reference_source = "computed"
        self._ref: Optional[tuple[np.ndarray, np.ndarray, Optional[int]]] = None
        self._ref_origin: Optional[tuple[str, Path, Optional[dict]]] = None  # (file | cache, path, stored key)
        self.is_std: Optional[float] = None  # population std over splits (torch-fidelity's "±"), set by compute
        self._synced = False
        if self.model is not None:
            self._init_reference(reference, reference_stats)

    @classmethod
    def create(cls, ctx: MetricContext) -> "FIDMetric":
        s = ctx.settings
        return cls(ctx.device, required=ctx.requires_any(tuple(cls.outputs)), reference=ctx.fid_reference,
                   cache_dir=s.fid_cache_dir, reference_stats=s.fid_reference_stats)

    def card_fields(self) -> dict[str, dict]:
        """The `fid` group, and the `is` group of the Inception Score computed from the same features."""
        return {"fid": self.card(), "is": {"splits": self.is_splits, "permutation_seed": self.is_seed,
                                            "logits": LOGITS, "softmax_dtype": "float64"}}

    def _extractor_fields(self) -> dict:
        import torch_fidelity

        return {"extractor": EXTRACTOR, "weights_sha256": sha256_file(self.weights_path),
                "feature_layer": self.feature_layer, "resize": RESIZE_MODE, "dtypes": DTYPES,
                "torch_fidelity": torch_fidelity.__version__}

    def _cache_file(self) -> Optional[Path]:
        if self.cache_dir is None or not self.lookup_sha:
            return None
        return self.cache_dir / f"fid-ref-{self.lookup_sha}.npz"

    def _set_key(self, fields: Mapping[str, Any]) -> None:
        self.key, self.key_sha = reference_key(fields, self._extractor_fields())
        self.lookup_sha = lookup_sha(self.key)

    def _init_reference(self, reference: Optional[Mapping[str, Any]], reference_stats: Optional[str | Path]) -> None:
        if reference is not None:
            self._set_key(reference)
        if reference_stats is not None:
            mu, sigma, n, stored = load_reference_stats(reference_stats, self.key)
            if mu.size != int(self.feature_layer):
                raise UserError(
                    f"FID reference statistics {reference_stats}: {mu.size}-d; layer {self.feature_layer} needs "
                    f"{self.feature_layer}-d"
                )
            self._ref, self.reference_source = (mu, sigma, n), f"file:{Path(reference_stats).name}"
            self._ref_origin = ("file", Path(reference_stats), stored)
            return
        cache = self._cache_file()
        if cache is not None and cache.is_file():
            mu, sigma, n, stored = load_reference_stats(cache, self.key)
            self._ref, self.reference_source = (mu, sigma, n), f"cache:{self.lookup_sha}"
            self._ref_origin = ("cache", cache, stored)
            log.info("FID reference statistics from cache %s (real-side Inception pass skipped)", cache)

    @property
    def uses_cached_reference(self) -> bool:
        return self._ref is not None

    def check_reference(self, fields: Mapping[str, Any]) -> bool:
        """Verify the real-side statistics from a file or cache against the complete key of what was evaluated.

        A user's file that does not match is an error (one line); a stale cache entry is dropped and True returned:
        the evaluator then feeds the real images again (`update_real`) and the statistics are recomputed.
        """
        if self.model is None:
            return False
        self._set_key(fields)
        if self._ref_origin is None or self._ref_origin[2] is None:
            return False
        origin, path, stored = self._ref_origin
        bad = key_mismatch(stored, self.key)
        if not bad:
            return False
        if origin == "file":
            raise UserError(_mismatch_message(path, stored, self.key, bad))
        log.warning("FID reference cache %s does not match the images evaluated (field '%s' differs): "
                    "recomputing the real-side statistics", path, bad[0])
        self._ref, self._ref_origin, self.reference_source = None, None, "computed"
        return True

    @torch.no_grad()
    def update_real(self, real_u8: torch.Tensor, image_ids: Sequence[str]) -> None:
        """Real side only: the second read after `check_reference` returned True, or `gsqbench stats`."""
        if self.model is None:
            return
        if len(image_ids) != real_u8.shape[0]:
            raise UserError(f"FID: got {len(image_ids)} image ids for a batch of {real_u8.shape[0]} images")
        self.real.update(self._features(real_u8)[0])

    def export_reference(self, path: str | Path, fields: Mapping[str, Any]) -> Path:
        """Write this metric's real-side statistics (after `sync`) with the complete key of `fields` (`gsqbench
        stats`): the file `--fid-reference-stats` verifies."""
        self._set_key(fields)
        mu, sigma = self.real.mean_cov()
        return save_reference_stats(path, mu, sigma, int(self.real.n), self.key, self.key_sha)

    def _features(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with exact_fp32():
            feats, logits = self.model(images_u8.to(self.device))
        return feats, logits

    @torch.no_grad()
    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        if self.model is None:
            return
        check_image_pair(real_u8, fake_u8, what="FID")
        if len(image_ids) != fake_u8.shape[0]:
            raise UserError(f"FID: got {len(image_ids)} image ids for a batch of {fake_u8.shape[0]} images")
        if self._ref is None:
            self.real.update(self._features(real_u8)[0])
        feats, logits = self._features(fake_u8)
        self.fake.update(feats)
        # a copy: an extractor may return logits as a view of a larger output, which would otherwise stay alive
        self._logits.append(logits)  # copied into the store's blocks
        self._ids.extend(str(i) for i in image_ids)

    def state_dict(self) -> Optional[dict[str, Any]]:
        """Streaming state for a resumable evaluation: both sides' (μ, M2, N), the fake logits and their ids."""
        if self.model is None:
            return {"unavailable": True}
        return {"real": self.real.state_dict(), "fake": self.fake.state_dict(), "ids": list(self._ids),
                "logits": self._logits.tensor().clone(),  # a view would save the whole block
                "reference_source": self.reference_source, "synced": self._synced}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.model is None or state.get("unavailable"):
            if (self.model is None) != bool(state.get("unavailable")):
                raise ValueError("FID state saved with the other weights availability")
            return
        if state["reference_source"] != self.reference_source:
            raise ValueError(f"FID state used reference {state['reference_source']}, now {self.reference_source}")
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

    def _real_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ref is not None:
            mu, sigma, n = self._ref
            n_fake = int(self.fake.n)
            if n is not None and n != n_fake:
                raise UserError(f"FID reference statistics hold N={n} images but {n_fake} were reconstructed; "
                                "the reference must be the same originals (metrics-protocol.md §6)")
            return mu, sigma
        mu, sigma = self.real.mean_cov()
        self._maybe_cache(mu, sigma, int(self.real.n))
        return mu, sigma

    def _maybe_cache(self, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
        cache = self._cache_file()
        if cache is None or not distributed.is_main():
            return
        if self.key is not None and any(self.key.get(f) is None for f in PENDABLE_FIELDS):
            return  # the key was never completed (check_reference not called): nothing verifiable to cache
        if self.key is not None and int(self.key.get("n", n)) != n:
            log.warning("not caching FID reference: key says N=%s but %d images were seen", self.key.get("n"), n)
            return
        save_reference_stats(cache, mu, sigma, n, self.key, self.key_sha)
        log.info("cached FID reference statistics at %s", cache)

    def compute(self) -> list[MetricValue]:
        if self.model is None:
            return [MetricValue.missing(k, self._unavailable, d) for k, d in self.outputs.items()]
        n_fake, n_real = int(self.fake.n), int(self.real.n) if self._ref is None else 2
        if min(n_fake, n_real) < 2:
            fid = MetricValue.missing(
                "rfid@inception", f"FID needs at least 2 images per side, got {n_real} real and {n_fake} fake", "lower"
            )
        else:
            mu_r, sigma_r = self._real_stats()
            mu_f, sigma_f = self.fake.mean_cov()
            value = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)
            fid = MetricValue("rfid@inception", value, direction="lower", n=n_fake)
        logits = self._logits.tensor()
        try:
            mean, std, scores = inception_score(logits, self.is_splits, self.is_seed)
            self.is_std = std
            # stderr of the mean over splits (sample std); the population std torch-fidelity prints is `is_std`
            stderr = float(np.std(scores, ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else None
            is_value = MetricValue("is@inception", mean, stderr=stderr, direction="higher", n=logits.shape[0])
        except ValueError as exc:
            is_value = MetricValue.missing("is@inception", str(exc), "higher")
        return [fid, is_value]

    def card(self) -> dict:
        import torch_fidelity

        return {"fid_backend": f"torch-fidelity {torch_fidelity.__version__}", "fid_extractor": EXTRACTOR,
                "fid_weights_sha256": self._extractor_fields()["weights_sha256"] if self.model is not None else None,
                "fid_feature_layer": self.feature_layer, "fid_resize": RESIZE_MODE, "fid_antialias": False,
                "fid_dtypes": DTYPES, "fid_reference_key": self.key_sha, "fid_reference_source": self.reference_source,
                "fid_n_real": int(self.real.n) if self._ref is None else self._ref[2],
                "fid_n_fake": int(self.fake.n), "is_splits": self.is_splits, "is_permutation_seed": self.is_seed,
                "is_logits": LOGITS, "is_std_over_splits": self.is_std}
