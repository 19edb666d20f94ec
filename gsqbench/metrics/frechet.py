"""What every Fréchet-distance metric shares: streaming float64 statistics, the distance, and the verified
real-side reference statistics (a precomputed file or a cache keyed by data + extractor).

Follows metrics-protocol.md §6 (Heusel et al. 2017; torch-fidelity's eigenvalue form of the distance): features of
real and fake images are merged batch by batch into float64 (N, μ, M2) per side (all-reduced across ranks),
Σ = M2/(N − 1), and FD = ‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2·Σ Re √eig(Σ_r Σ_f). `rfid@inception`
(gsqbench/metrics/fid.py) and `rfd@dinov2` (gsqbench/metrics/rfd_dinov2.py) both use this one code path; only the
extractor differs. The reference-statistics key is the SHA-256 over the §6 key fields (the evaluator's data fields +
the extractor's own), verified field by field on every load, never a free-form name.

The evaluation reads every image once, so the fields known only after its pass (the originals hash; N and the
id-list hash when an image could not be read or the dataset lists no ids) come as None ("pending") when a metric
is built: the cache is looked up by the other fields (its file name is the SHA-256 of the key without
`originals_hash`), and `RealReference.check(fields)` verifies the complete key after the pass. A stale cache entry is
then dropped (the evaluator reads the real images again, only in that case); a user's file that does not match is
an error.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes
from gsqbench.metrics.base import MetricValue

log = logging.getLogger(__name__)

# fields the evaluator provides; each metric adds its extractor-side fields (§6)
CALLER_KEY_FIELDS = ("dataset", "split", "crop", "n", "ids_hash", "originals_hash")
# known only after reading every image: not part of the cache file's name, verified once the pass is done
POST_PASS_FIELDS = ("originals_hash",)
# fields that may be pending (None) before the pass: N and the id list change when an image cannot be read, and a
# dataset without an `ids` list only knows them afterwards
PENDABLE_FIELDS = ("n", "ids_hash", "originals_hash")


# ---------------------------------------------------------------------------------------------------------------
# Statistics and distance


class FeatureStats:
    """Streaming mean and centred scatter (float64) and N (int64) of one side's features.

    Batches are merged with Chan et al.'s pairwise update (n, μ, M2 = Σ(f − μ)(f − μ)ᵀ) instead of raw sums Σf and
    Σffᵀ: features far from the origin make Σffᵀ − Nμμᵀ cancel catastrophically even in float64 (§13 #13), while the
    centred form keeps the covariance accurate to rounding and (nearly) independent of batching and sharding.

    Rows are buffered and merged MERGE_ROWS at a time: each merge costs several passes over the d×d scatter
    (32 MB at d = 2048), which per batch of 32 images cost more than the Inception forwards on a CPU. Merge points
    depend only on the sequence of rows (the buffer is part of `state_dict`), so results stay reproducible and a
    resumed evaluation ends bit-identical to an uninterrupted one.
    """

    MERGE_ROWS = 1024

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._n = torch.zeros((), dtype=torch.int64, device=device)  # merged rows
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._synced = False

    @property
    def n(self) -> torch.Tensor:
        """Rows seen (merged and buffered), int64."""
        return self._n + self._buffered

    @n.setter
    def n(self, value: torch.Tensor) -> None:
        self.flush()
        self._n = torch.as_tensor(value, dtype=torch.int64, device=self.mean.device)

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = int(self._n)
        n = n_a + n_b
        if n_b == 0:
            return
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2.add_(m2_b).addr_(delta, delta, alpha=n_a * n_b / n)  # in place: no d×d temporaries
        self._n = self._n + n_b

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
        """(μ, M2, N) so far and the rows not merged yet, as CPU tensors (for a resumable evaluation)."""
        dim = self.mean.numel()
        buffer = torch.cat(self._buffer).cpu() if self._buffer else torch.zeros(0, dim, dtype=torch.float64)
        return {"mean": self.mean.cpu(), "m2": self.m2.cpu(), "n": int(self._n), "synced": self._synced,
                "buffer": buffer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.mean.device
        self.mean = state["mean"].to(device, torch.float64)
        self.m2 = state["m2"].to(device, torch.float64).clone()
        self._n = torch.tensor(int(state["n"]), dtype=torch.int64, device=device)
        buffer = state["buffer"].to(device, torch.float64)
        self._buffer, self._buffered = ([buffer], int(buffer.shape[0])) if buffer.shape[0] else ([], 0)
        self._synced = bool(state["synced"])

    def sync(self) -> None:
        """Merge every rank's (n, μ, M2) in rank order (once; a second call would double-count)."""
        if self._synced:
            return
        self.flush()
        parts = distributed.all_gather_objects((int(self._n), self.mean.cpu(), self.m2.cpu()))
        device = self.mean.device
        self.mean = torch.zeros_like(self.mean)
        self.m2 = torch.zeros_like(self.m2)
        self._n = torch.zeros_like(self._n)
        for n_b, mean_b, m2_b in parts:
            self._merge(n_b, mean_b.to(device), m2_b.to(device))
        self._synced = True

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ (d,) and unbiased Σ (d, d) as float64 numpy arrays; needs N ≥ 2."""
        self.flush()
        n = int(self._n)
        if n < 2:
            raise ValueError(f"Fréchet statistics need at least 2 images per side, got {n}")
        sigma = self.m2 / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # symmetric up to rounding; make it exactly so
        return self.mean.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr √(Σ1Σ2) in float64.

    tr √(Σ1Σ2) = Σ √eig(Σ1Σ2), the eigenvalue form torch-fidelity uses, computed through the symmetric matrix
    A·Σ2·A with A = √Σ1 (Σ1 = A·A, so Σ1Σ2 = A·(A·Σ2) has the eigenvalues of (A·Σ2)·A): two symmetric
    eigendecompositions (LAPACK syevd) instead of one general one (geev) on a 2048² matrix, several times faster,
    and with real eigenvalues by construction. Eigenvalues that rounding makes slightly negative are clamped to 0
    (both matrices are PSD in exact arithmetic).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise UserError(f"FID statistics: shapes μ {mu1.shape}/{mu2.shape}, Σ {sigma1.shape}/{sigma2.shape} differ")
    diff = mu1 - mu2
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # √Σ1
    inner = root @ sigma2 @ root
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------------
# Reference-statistics files


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
    """SHA-256 of a key without its post-pass fields (the cache file's name); None while N or the id list is
    pending."""
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
    path: str | Path, expected_key: Optional[Mapping] = None, what: str = "FID"
) -> tuple[np.ndarray, np.ndarray, Optional[int], Optional[dict]]:
    """(μ, Σ, N or None, key or None) from an npz, verified: shapes, finiteness and, when given, every key field
    (fields in PENDABLE_FIELDS whose expected value is None are checked later, `RealReference.check`).

    Files without key fields (the ADM / torch-fidelity layout: just `mu` and `sigma`) are accepted with a warning
    that their provenance is unknown."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as exc:
        raise UserError(f"{what} reference statistics {path}: cannot read as .npz ({exc})") from None
    if "mu" not in data or "sigma" not in data:
        raise UserError(f"{what} reference statistics {path}: needs arrays 'mu' and 'sigma' (found {sorted(data)})")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(
            f"{what} reference statistics {path}: mu {mu.shape} / sigma {sigma.shape}; expected finite (d,) and (d, d)"
        )
    n = int(data["n"]) if "n" in data else None
    stored = json.loads(str(data["key_json"])) if "key_json" in data else None
    if expected_key is not None and stored is not None:
        _verify_key(path, stored, expected_key, what)
    if stored is None:
        log.warning("%s reference statistics %s carry no key fields (e.g. the ADM / torch-fidelity mu/sigma layout): "
                    "their provenance is unknown; data, crop, N and extractor are unverified", what, path)
    return mu, sigma, n, stored


def key_mismatch(stored: Mapping, expected: Mapping) -> list[str]:
    """Fields the file records that differ from this evaluation's (pending ones skipped), data fields first."""
    bad = [k for k in stored
           if not (k in PENDABLE_FIELDS and k in expected and expected[k] is None) and stored[k] != expected.get(k)]
    return sorted(bad, key=lambda k: (k not in CALLER_KEY_FIELDS, k))


def _mismatch_message(path: Path, stored: Mapping, expected: Mapping, bad: list[str], what: str) -> str:
    f = bad[0]
    return (f"{what} reference statistics {path}: field '{f}' is {stored.get(f)!r}, this evaluation needs "
            f"{expected.get(f)!r} ({len(bad)} field(s) differ); delete the file or use matching statistics")


def _verify_key(path: Path, stored: Mapping, expected: Mapping, what: str = "FID") -> None:
    """Every field the file records must equal this evaluation's; data fields are reported before extractor ones."""
    bad = key_mismatch(stored, expected)
    if bad:
        raise UserError(_mismatch_message(path, stored, expected, bad, what))
    unverified = sorted(set(expected) - set(stored))
    if unverified:
        log.warning("reference statistics %s do not record %s: unverified", path, ", ".join(unverified))


class RealReference:
    """Where one Fréchet metric's real-side statistics come from: this pass, a precomputed file, or the cache.

    `reference`: the evaluator's key fields (dataset, split, crop, n, ids_hash, originals_hash; pending ones None);
    with `cache_dir` the statistics computed in this pass are cached under `<prefix>-<lookup sha256>.npz` (the key
    without `originals_hash`) and found there next time (every key field verified, the pending ones by `check`).
    `stats_file`: precomputed statistics (mu, sigma, optional n and key fields). `what` names the metric in
    messages; `dim` is the feature dimension the statistics must have.
    """

    def __init__(self, *, what: str, prefix: str, dim: int, extractor_fields: Mapping[str, Any],
                 reference: Optional[Mapping[str, Any]] = None, cache_dir: Optional[str | Path] = None,
                 stats_file: Optional[str | Path] = None) -> None:
        self.what, self.prefix, self.dim = what, prefix, int(dim)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.extractor_fields = dict(extractor_fields)
        self.key: Optional[dict] = None
        self.key_sha: Optional[str] = None
        self.lookup_sha: Optional[str] = None
        self.source = "computed"
        self.stats: Optional[tuple[np.ndarray, np.ndarray, Optional[int]]] = None
        self._origin: Optional[tuple[str, Path, Optional[dict]]] = None  # (file | cache, path, stored key)
        if reference is not None:
            self.set_key(reference)
        if stats_file is not None:
            self._load_file(Path(stats_file))
            return
        cache = self.cache_file()
        if cache is not None and cache.is_file():
            mu, sigma, n, stored = load_reference_stats(cache, self.key, what)
            self.stats, self.source = (mu, sigma, n), f"cache:{self.lookup_sha}"
            self._origin = ("cache", cache, stored)
            log.info("%s reference statistics from cache %s (real-side pass skipped)", what, cache)

    def set_key(self, fields: Mapping[str, Any]) -> None:
        self.key, self.key_sha = reference_key(fields, self.extractor_fields)
        self.lookup_sha = lookup_sha(self.key)

    def _load_file(self, path: Path) -> None:
        mu, sigma, n, stored = load_reference_stats(path, self.key, self.what)
        if mu.size != self.dim:
            raise UserError(f"{self.what} reference statistics {path}: {mu.size}-d; these features need {self.dim}-d")
        self.stats, self.source = (mu, sigma, n), f"file:{path.name}"
        self._origin = ("file", path, stored)

    def check(self, fields: Mapping[str, Any]) -> bool:
        """After the pass: take the complete key of what was evaluated and verify precomputed statistics against it.

        A user's file that does not match is an error (one line); a stale cache entry is dropped and True returned:
        the caller then feeds the real images again and the statistics of this pass are used (and cached).
        """
        self.set_key(fields)
        if self._origin is None or self._origin[2] is None:
            return False
        origin, path, stored = self._origin
        bad = key_mismatch(stored, self.key)
        if not bad:
            return False
        if origin == "file":
            raise UserError(_mismatch_message(path, stored, self.key, bad, self.what))
        log.warning("%s reference cache %s does not match the images evaluated (field '%s' differs): recomputing "
                    "the real-side statistics", self.what, path, bad[0])
        self.stats, self._origin, self.source = None, None, "computed"
        return True

    def cache_file(self) -> Optional[Path]:
        if self.cache_dir is None or not self.lookup_sha:
            return None
        return self.cache_dir / f"{self.prefix}-{self.lookup_sha}.npz"

    @property
    def precomputed(self) -> bool:
        """True when the real side needs no extractor pass (statistics from a file or the cache)."""
        return self.stats is not None

    @property
    def n(self) -> Optional[int]:
        return self.stats[2] if self.stats is not None else None

    def real_stats(self, computed: FeatureStats, n_fake: int) -> tuple[np.ndarray, np.ndarray]:
        """μ, Σ of the real side: the precomputed ones (N checked against the fake side) or those of this pass,
        which are then cached (rank 0) when a cache directory and key are set."""
        if self.stats is not None:
            mu, sigma, n = self.stats
            if n is not None and n != n_fake:
                raise UserError(f"{self.what} reference statistics hold N={n} images but {n_fake} were reconstructed; "
                                "the reference must be the same originals (metrics-protocol.md §6)")
            return mu, sigma
        mu, sigma = computed.mean_cov()
        self._maybe_cache(mu, sigma, int(computed.n))
        return mu, sigma

    def _maybe_cache(self, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
        cache = self.cache_file()
        if cache is None or not distributed.is_main():
            return
        if self.key is not None and any(self.key.get(f) is None for f in PENDABLE_FIELDS):
            return  # the key was never completed (check() not called): nothing verifiable to cache
        if self.key is not None and int(self.key.get("n", n)) != n:
            log.warning("not caching %s reference: key says N=%s but %d images were seen", self.what,
                        self.key.get("n"), n)
            return
        save_reference_stats(cache, mu, sigma, n, self.key, self.key_sha)
        log.info("cached %s reference statistics at %s", self.what, cache)


def frechet_value(key: str, real: FeatureStats, fake: FeatureStats, reference: RealReference,
                  what: str) -> MetricValue:
    """The MetricValue of one Fréchet distance (lower is better), or unavailable with the reason below 2 images."""
    n_fake = int(fake.n)
    n_real = 2 if reference.precomputed else int(real.n)
    if min(n_fake, n_real) < 2:
        got = f"{n_fake} fake" if reference.precomputed else f"{n_real} real and {n_fake} fake"
        return MetricValue.missing(key, f"{what} needs at least 2 images per side, got {got}", "lower")
    mu_r, sigma_r = reference.real_stats(real, n_fake)
    mu_f, sigma_f = fake.mean_cov()
    return MetricValue(key, frechet_distance(mu_r, sigma_r, mu_f, sigma_f), direction="lower", n=n_fake)
