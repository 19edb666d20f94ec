"""VQ baseline: the paper's vector quantizer (flex_gen `vq`, spec gsq-reference.md §8.2), with optional
EMA codebook and dead-code restarts (standard VQ-VAE practice: van den Oord et al. 2017, appendix; Razavi
et al. 2019; as in vector-quantize-pytorch).

Default = the paper's baseline: uniform init U(−1/V, 1/V), no normalisation, nearest code by squared distance
(first index on ties; `lookup_precision` exact by default, or the official expanded form `fp32-expanded` /
`bf16`, see gsqbench/lookup), loss MSE(q, sg[z]) + β·MSE(sg[q], z), straight-through.
`norm: l2` gives cosine VQ. `ema: true` trains the codebook by exponential moving averages of cluster
sizes and member sums (decay 0.99, Laplace smoothing ε = 1e-5), all-reduced across DDP ranks; the codebook
loss term is then dropped and only the commitment term remains.
"""
from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gsqbench import distributed as ddp
from gsqbench.errors import UserError
from gsqbench.quantizer import (
    DEFAULT_LOOKUP,
    QuantizerBase,
    QuantizerOutput,
    check_lookup_precision,
    check_channels,
    check_grouping,
    check_indices,
    from_channels_last_groups,
    grouped_codebook_lookup,
    grouped_output,
    init_codebook,
    nearest_code,
    resolve_norm,
)
from gsqbench.registry import register_quantizer


@register_quantizer("vq")
class VectorQuantizer(QuantizerBase):
    """VQ baseline (paper's): uniform-init codebook, squared-distance lookup; optional EMA and dead-code restarts."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        groups: int = 1,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.0,
        init: Literal["uniform", "spherical"] = "uniform",
        norm: Literal["none", "l2"] | None = None,
        l2_norm: bool | None = None,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1.0,
        lookup_precision: str = DEFAULT_LOOKUP,  # a LookupPrecision, checked in the body (message for "fp32")
    ) -> None:
        super().__init__()
        check_grouping(dim, codebook_size, groups)
        if entropy_weight:
            raise UserError(f"entropy_weight: the VQ baseline has no entropy loss, got {entropy_weight}; use 0")
        if not 0.0 < ema_decay < 1.0:
            raise UserError(f"ema_decay: must be in (0, 1), got {ema_decay}")
        self.norm = resolve_norm(norm, l2_norm, "none")
        if self.norm not in ("none", "l2"):
            raise UserError(f"norm: VQ supports 'none' or 'l2', got {self.norm!r}")
        self.dim, self.codebook_size, self.groups = dim, codebook_size, groups
        self.code_dim = dim // groups
        self.commitment_weight = float(commitment_weight)
        self.ema, self.ema_decay, self.ema_eps = ema, float(ema_decay), float(ema_eps)
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, float(dead_code_threshold)
        self.lookup_precision = check_lookup_precision(lookup_precision)
        self.codebook = nn.Embedding(codebook_size, self.code_dim)
        init_codebook(self.codebook.weight, init)
        if ema:
            self.codebook.weight.requires_grad_(False)  # moved by the EMA step, not by the optimiser
            # start at N = 1, S = C0 so that S/N is the initial codebook: an unused code then keeps its
            # row (both decay alike) instead of being divided by a near-zero smoothed count
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.codebook.weight.detach().clone())
        if restart_dead_codes:
            # running usage (decayed like the EMA) decides which codes are dead
            self.register_buffer("usage_ema", torch.full((codebook_size,), float(dead_code_threshold)))

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"dim": 8, "codebook_size": 32}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, groups={self.groups}, norm={self.norm}, "
                f"ema={self.ema}, lookup_precision={self.lookup_precision}")

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (b, D, h, w) → z_q in z's dtype, indices (b, h, w, G) int64."""
        check_channels(z, self.dim)
        lookup = functools.partial(nearest_code, precision=self.lookup_precision)
        z_n, idx, q = grouped_codebook_lookup(z, self.codebook.weight, self.groups, self.norm, lookup)
        # q holds the rows before this step's EMA update
        commit = F.mse_loss(q.detach(), z_n)
        if self.ema:
            loss = self.commitment_weight * commit
        else:
            loss = F.mse_loss(q, z_n.detach()) + self.commitment_weight * commit
        # Statistics follow the generator's optimisation forward only: the GAN recipe re-runs the generator
        # under no_grad for the D step (gsq-reference §5.1), which must not update the codebook a second time.
        if self.training and torch.is_grad_enabled():
            self._update_codebook(z_n.detach().reshape(-1, self.code_dim), idx)
        return grouped_output(z, z_n, q, idx, self.codebook_size, {"quantizer": loss})

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, idx: Tensor) -> None:
        if not (self.ema or self.restart_dead_codes):
            return
        counts = torch.bincount(idx, minlength=self.codebook_size).float()
        # every rank must apply the same EMA step, so statistics are summed over the global batch
        counts = ddp.all_reduce_sum(counts)
        if self.ema:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)
            self.ema_step(counts, ddp.all_reduce_sum(sums))
        if self.restart_dead_codes:
            self.usage_ema.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
            self._restart(flat)

    @torch.no_grad()
    def ema_step(self, counts: Tensor, sums: Tensor) -> None:
        """N ← γN + (1−γ)n, S ← γS + (1−γ)s, C = S / (Laplace-smoothed N) (VQ-VAE EMA update)."""
        g = self.ema_decay
        self.ema_cluster_size.mul_(g).add_(counts, alpha=1.0 - g)
        self.ema_embed_sum.mul_(g).add_(sums, alpha=1.0 - g)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
        self.codebook.weight.copy_(self.ema_embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart(self, flat: Tensor) -> None:
        """Replace codes whose running usage fell below the threshold by random latents of this batch."""
        dead = self.usage_ema < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new_rows = flat[pick].to(self.codebook.weight.dtype)
        if ddp.world_size() > 1:  # rank 0's choice everywhere, so replicas stay identical
            dist.broadcast(new_rows, src=0)
        self.codebook.weight[dead] = new_rows
        self.usage_ema[dead] = self.dead_code_threshold
        if self.ema:
            self.ema_cluster_size[dead] = self.dead_code_threshold
            self.ema_embed_sum[dead] = new_rows * self.dead_code_threshold

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(b, h, w, G) int64 → codebook rows in group order, (b, D, h, w)."""
        check_indices(indices, self.groups)
        return from_channels_last_groups(self.codebook(indices))
