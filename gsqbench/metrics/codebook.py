"""Codebook usage, perplexity, entropy and dead codes from quantizer indices (metrics-protocol.md §8).

Counts c_g ∈ ℕ^V per group by an int64 bincount on the evaluation device, all-reduced across ranks. Definitions
(T_g tokens per group, T = G·T_g):
  usage_pooled = #{v : Σ_g c_g[v] > 0}/V          (official GSQ `used_codebook`/100)
  usage_group_{mean,min,max} over u_g = #{v : c_g[v] > 0}/V;  usage_product = ∏_g u_g (independence proxy)
  ppl_pooled = exp(H), H = −Σ p ln p, p = Σ_g c_g / T  (official `perplexity`, without its 1e-10)
  ppl_group_mean = mean_g exp(H_g)                (official `prod_perplexity`, a mean despite the name)
  entropy_bits = H/ln 2, entropy_norm = H/ln V, dead_codes = V − #used (pooled), tokens_counted = T.
Fractions are in [0, 1]; #used ≤ min(V, T_g·G) so usage is bounded by the token count, which is always reported.

Measurability (`comparable`): usage, perplexity, entropy and dead codes need T_g ≥ 5·V counted tokens per group
(a codebook used uniformly then shows 1 − e^−5 ≈ 99.3 % usage); below that their value is bounded by the token
count, not by the quantizer, and the verdict states the ceiling, e.g. "≤ 7.8 %: 320 tokens per group for
V = 4,096". `tokens_counted` itself is always comparable.

Large codebooks: a dense (G, V) histogram is kept only for V ≤ 2^24. Beyond that (e.g. LFQ with K > 24 bits) the
metric keeps per-dimension histograms when `levels` (the mixed-radix digits of the fused index, FSQ levels or
[2]*K for LFQ, least-significant first) are given, and reports the V-space keys as unavailable (n/a).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.metrics.base import Direction, Facts, Metric, MetricContext, MetricValue
from gsqbench.registry import register_metric

MAX_DENSE_CODES = 1 << 24
#: counted tokens per group, in multiples of V, from which codebook statistics are comparable
MIN_TOKENS_PER_CODE = 5

DIRECTIONS: dict[str, Direction] = {
    "tokens_counted": "none",
    "usage_pooled": "higher",
    "usage_group_mean": "higher",
    "usage_group_min": "higher",
    "usage_group_max": "higher",
    "usage_product": "higher",
    "ppl_pooled": "higher",
    "ppl_group_mean": "higher",
    "entropy_bits": "higher",
    "entropy_norm": "higher",
    "dead_codes": "lower",
}


def entropy_nats(counts: np.ndarray) -> float:
    """H = −Σ_{p>0} p ln p of a count vector (float64); 0 for an empty or one-code histogram."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum())


def codebook_stats(counts: np.ndarray) -> dict[str, float]:
    """All §8 values from a (G, V) int64 count array (the closed forms; no device or DDP involved)."""
    counts = np.asarray(counts, dtype=np.int64)
    g, v = counts.shape
    pooled = counts.sum(axis=0)
    used_group = (counts > 0).sum(axis=1) / v  # (G,)
    h_pooled = entropy_nats(pooled)
    ppl_group = [math.exp(entropy_nats(c)) for c in counts]
    return {
        "tokens_counted": float(counts.sum()),
        "usage_pooled": float((pooled > 0).sum() / v),
        "usage_group_mean": float(used_group.mean()),
        "usage_group_min": float(used_group.min()),
        "usage_group_max": float(used_group.max()),
        "usage_product": float(np.prod(used_group)),
        "ppl_pooled": math.exp(h_pooled),
        "ppl_group_mean": float(np.mean(ppl_group)),
        "entropy_bits": h_pooled / math.log(2),
        "entropy_norm": h_pooled / math.log(v) if v > 1 else float("nan"),
        "dead_codes": float(v - (pooled > 0).sum()),
    }


def codebook_ceiling(key: str, tokens_per_group: int, v: int, g: int) -> str:
    """The best value `key` can show with T_g tokens per group, as text ('≤ 7.8 %', '≤ 320', '≥ 3,776')."""
    t_g = tokens_per_group
    used_group, used_pooled = min(v, t_g), min(v, g * t_g)
    if key in ("usage_group_mean", "usage_group_min", "usage_group_max"):
        return f"≤ {100 * used_group / v:.2g} %" if used_group < v / 10 else f"≤ {100 * used_group / v:.1f} %"
    if key == "usage_pooled":
        return f"≤ {100 * used_pooled / v:.2g} %" if used_pooled < v / 10 else f"≤ {100 * used_pooled / v:.1f} %"
    if key == "usage_product":
        return f"≤ {100 * (used_group / v) ** g:.2g} %"
    if key == "ppl_pooled":
        return f"≤ {used_pooled:,}"
    if key == "ppl_group_mean":
        return f"≤ {used_group:,}"
    if key == "entropy_bits":
        return f"≤ {math.log2(used_pooled):.3g} bits"
    if key == "entropy_norm":
        return f"≤ {math.log(used_pooled) / math.log(v):.3g}" if v > 1 else "n/a"
    if key == "dead_codes":
        return f"≥ {v - used_pooled:,}"
    raise KeyError(key)


def _digits(indices: torch.Tensor, levels: Sequence[int]) -> list[torch.Tensor]:
    """Mixed-radix digits of fused indices, least-significant first: digit k = (i // ∏_{j<k} L_j) mod L_k."""
    out, rest = [], indices
    for lk in levels:
        out.append(rest % lk)
        rest = rest // lk
    return out


@register_metric("codebook")
class CodebookMetric(Metric):
    """Codebook usage, perplexity, entropy and dead codes of the eval set's indices (metrics-protocol.md §8).

    Directions: usage, ppl and entropy higher; dead_codes lower; tokens_counted none. `code_counts()` is the (G, V)
    array stored as `codes.npz`."""

    family, card_group = "codebook", "codebook"
    outputs = DIRECTIONS

    def __init__(
        self,
        codebook_size: Optional[int] = None,
        groups: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        *,
        levels: Optional[Sequence[int]] = None,
    ) -> None:
        # V cannot be inferred from indices (an unused top code is invisible), so without it every key but
        # tokens_counted is reported unavailable rather than guessed
        self.V = int(codebook_size) if codebook_size is not None else None
        self.G = int(groups) if groups is not None else None
        if (self.V is not None and self.V < 1) or (self.G is not None and self.G < 1):
            raise UserError(f"codebook metric: codebook_size={codebook_size}, groups={groups}; both must be >= 1")
        self.device = torch.device(device) if device is not None else None
        self.levels = [int(x) for x in levels] if levels is not None else None
        if self.levels is not None and math.prod(self.levels) != self.V:
            raise UserError(
                f"codebook metric: levels {self.levels} multiply to {math.prod(self.levels)}, not V={self.V}"
            )
        self.dense = self.V is not None and self.V <= MAX_DENSE_CODES
        self.counts: Optional[torch.Tensor] = None  # (G, V) int64, allocated on the first batch's device
        self.dim_counts: Optional[list[torch.Tensor]] = None  # per digit (G, L_k) when V > 2^24
        self.n_images = torch.zeros((), dtype=torch.int64)
        self.tokens_per_image: Optional[int] = None
        self._allocated = False
        self._synced = False

    @classmethod
    def create(cls, ctx: MetricContext) -> Optional["CodebookMetric"]:
        # V cannot be inferred from the indices seen, so the metric needs the quantizer it is sized from
        return cls.for_quantizer(ctx.quantizer, ctx.device) if ctx.quantizer is not None else None

    @classmethod
    def for_quantizer(cls, quantizer, device: Optional[torch.device | str] = None) -> "CodebookMetric":
        """Sized from a quantizer's `codebook_size`, `groups` and (FSQ/LFQ) `levels` attributes."""
        levels = getattr(quantizer, "levels", None)
        return cls(quantizer.codebook_size, quantizer.groups, device, levels=list(levels) if levels else None)

    @classmethod
    def comparable(cls, key: str, facts: Facts) -> Optional[str]:
        """Comparable from T_g ≥ 5·V tokens per group (module docstring); the reason states the ceiling."""
        v, g, t_g = facts.codebook_size, facts.groups or 1, facts.tokens_per_group
        if key == "tokens_counted" or v is None:
            return None
        if t_g >= MIN_TOKENS_PER_CODE * v:
            return None
        return (f"{codebook_ceiling(key, t_g, v, g)}: {t_g:,} tokens per group for V = {v:,} "
                f"(comparable from {MIN_TOKENS_PER_CODE}·V = {MIN_TOKENS_PER_CODE * v:,})")

    def _allocate(self, device: torch.device) -> None:
        self.device = self.device or device
        self.n_images = self.n_images.to(self.device)
        self._allocated = True
        if self.dense:
            self.counts = torch.zeros(self.G, self.V, dtype=torch.int64, device=self.device)
        elif self.V is not None and self.levels is not None:
            self.dim_counts = [torch.zeros(self.G, lk, dtype=torch.int64, device=self.device) for lk in self.levels]

    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        if qout is None or getattr(qout, "indices", None) is None:
            raise ValueError("codebook metric needs the QuantizerOutput (qout.indices) of each batch")
        self.update_indices(qout.indices)

    def update_indices(self, indices: torch.Tensor) -> None:
        """Count a batch of indices (b, h, w, G) int64 in [0, V)."""
        self._check(indices)
        if self.G is None:
            self.G = int(indices.shape[-1])
        if not self._allocated:
            self._allocate(indices.device)
        b, h, w, g = indices.shape
        idx = indices.to(self.device).long()
        self.n_images += b
        self.tokens_per_image = h * w
        if self.dense:
            offset = torch.arange(g, device=self.device, dtype=torch.int64) * self.V  # one bincount for all groups
            flat = (idx + offset).reshape(-1)
            self.counts += torch.bincount(flat, minlength=g * self.V).view(g, self.V)
        elif self.dim_counts is not None:
            for lk, hist, digit in zip(self.levels, self.dim_counts, _digits(idx, self.levels)):
                offset = torch.arange(g, device=self.device, dtype=torch.int64) * lk
                hist += torch.bincount((digit + offset).reshape(-1), minlength=g * lk).view(g, lk)

    def _check(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor) or indices.ndim != 4:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise UserError(f"quantizer indices: shape {shape}; expected (b, h, w, groups) — (b, h, w) is refused so "
                            "spatial axes are never taken as groups (use a trailing groups axis of 1)")
        if self.G is not None and indices.shape[-1] != self.G:
            raise UserError(f"quantizer indices: {indices.shape[-1]} groups on the last axis; expected groups={self.G}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise UserError(f"quantizer indices: dtype {indices.dtype}; expected an integer dtype (int64)")
        if indices.numel() and (int(indices.min()) < 0 or (self.V is not None and int(indices.max()) >= self.V)):
            raise UserError(f"quantizer indices: values in [{int(indices.min())}, {int(indices.max())}]; "
                            f"expected [0, {self.V})")

    def sync(self) -> None:
        """All-reduce the int64 counts across ranks (once)."""
        if self._synced:
            return
        # a rank whose shard was empty has seen no batch: agree on G and tokens/image, then reduce same-shape tensors
        meta = distributed.all_reduce_max(torch.tensor([self.G or 0, self.tokens_per_image or 0], dtype=torch.int64))
        self.G, self.tokens_per_image = int(meta[0]) or None, int(meta[1]) or None
        if not self._allocated and self.G is not None:
            self._allocate(self.device or torch.device("cpu"))
        if self.counts is not None:
            self.counts = distributed.all_reduce_sum(self.counts)
        if self.dim_counts is not None:
            self.dim_counts = [distributed.all_reduce_sum(c) for c in self.dim_counts]
        self.n_images = distributed.all_reduce_sum(self.n_images)
        self._synced = True

    def state_dict(self) -> dict:
        """Counts so far (int64 tensors), images, tokens per image and the group count."""
        return {"counts": None if self.counts is None else self.counts.cpu(),
                "dim_counts": None if self.dim_counts is None else [c.cpu() for c in self.dim_counts],
                "n_images": int(self.n_images), "tokens_per_image": self.tokens_per_image, "G": self.G,
                "allocated": self._allocated, "synced": self._synced}

    def load_state_dict(self, state) -> None:
        if state["G"] is not None and self.G is not None and int(state["G"]) != self.G:
            raise ValueError(f"codebook state has G={state['G']}, this metric G={self.G}")
        self.G = state["G"]
        if state["allocated"]:
            self._allocate(self.device or torch.device("cpu"))
            if state["counts"] is not None:
                self.counts = state["counts"].to(self.device, torch.int64)
            if state["dim_counts"] is not None:
                self.dim_counts = [c.to(self.device, torch.int64) for c in state["dim_counts"]]
        self.n_images = torch.tensor(int(state["n_images"]), dtype=torch.int64, device=self.n_images.device)
        self.tokens_per_image, self._synced = state["tokens_per_image"], bool(state["synced"])

    def code_counts(self) -> Optional[np.ndarray]:
        """(G, V) int64 counts for `codes.npz`, or None when V > 2^24 (no dense histogram kept)."""
        return self.counts.cpu().numpy() if self.counts is not None else None

    def dimension_counts(self) -> Optional[list[np.ndarray]]:
        """Per-dimension (G, L_k) histograms for V > 2^24 with known levels, else None."""
        return [c.cpu().numpy() for c in self.dim_counts] if self.dim_counts is not None else None

    def compute(self) -> list[MetricValue]:
        n = int(self.n_images)
        tokens = float(n * (self.tokens_per_image or 0) * (self.G or 0))
        if n == 0 or tokens == 0:
            return [MetricValue.missing(k, "no tokens counted", d) for k, d in DIRECTIONS.items()]
        if self.counts is None:
            if self.V is None:
                reason = ("codebook size unknown: construct CodebookMetric(quantizer.codebook_size, quantizer.groups)"
                          " or CodebookMetric.for_quantizer(quantizer)")
            elif self.dim_counts is not None:
                reason = f"codebook size V={self.V} > 2^24: no dense histogram is kept (per-dimension histograms only)"
            else:
                reason = f"codebook size V={self.V} > 2^24: usage not measured (give levels for per-digit histograms)"
            rows = [MetricValue("tokens_counted", tokens, direction="none", n=n)]
            return rows + [MetricValue.missing(k, reason, d) for k, d in DIRECTIONS.items() if k != "tokens_counted"]
        stats = codebook_stats(self.code_counts())
        # internal invariant (§8 bound): every token adds one index per group, so #used ≤ T_g per group
        assert stats["usage_group_max"] <= (tokens / self.G) / self.V + 1e-12
        return [MetricValue(k, stats[k], direction=d, n=n) for k, d in DIRECTIONS.items()]

    def card(self) -> dict:
        t_g = int(self.n_images) * (self.tokens_per_image or 0)
        return {"codebook_V": self.V, "codebook_G": self.G, "tokens_per_group": t_g,
                "tokens_counted": t_g * (self.G or 0), "codebook_definitions": "metrics-protocol §8 v1",
                "codebook_dense_histogram": self.dense}


@register_metric("code_agreement")
class CodeAgreementMetric(Metric):
    """Fraction of tokens whose code is the exact nearest code, for runs evaluated with a non-exact lookup.

    The run's lookup (e.g. the official bf16 one in gsq-compat, or `--lookup fp32-expanded`) is compared with the
    exact nearest code on the same latents (metrics-protocol.md §9); only for quantizers with a codebook search, and
    only when the evaluation's lookup is not already `exact`.

    The latent the quantizer sees is captured with a forward pre-hook; the comparison lookup runs on it per batch.
    """

    family, card_group = "codebook", ""
    outputs = {"code_agreement": "higher"}

    def __init__(self, quantizer: torch.nn.Module) -> None:
        self.quantizer = quantizer
        self.z: Optional[torch.Tensor] = None
        self.handle = quantizer.register_forward_pre_hook(self._capture)
        self.counts = torch.zeros(2, dtype=torch.int64)  # (agreeing tokens, tokens)

    @classmethod
    def create(cls, ctx: MetricContext) -> Optional["CodeAgreementMetric"]:
        q = ctx.quantizer
        if q is None or q.lookup_precision is None or ctx.settings.lookup_mode == "exact":
            return None
        return cls(q)

    def _capture(self, module: torch.nn.Module, args: tuple) -> None:
        self.z = args[0].detach()

    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        if self.z is None or qout is None:
            return
        current = self.quantizer.lookup_precision
        self.quantizer.lookup_precision = "exact"
        try:
            other = self.quantizer(self.z).indices
        finally:
            self.quantizer.lookup_precision = current
        self.counts += torch.tensor([int((other == qout.indices).sum()), int(qout.indices.numel())])
        self.z = None

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state) -> None:
        self.counts = state["counts"].to(torch.int64).clone()

    def sync(self) -> None:
        self.close()
        self.counts = distributed.all_reduce_sum(self.counts)

    def close(self) -> None:
        self.handle.remove()

    def compute(self) -> list[MetricValue]:
        agree, total = int(self.counts[0]), int(self.counts[1])
        if total == 0:
            return []
        return [MetricValue("code_agreement", agree / total, direction="higher", n=total)]
