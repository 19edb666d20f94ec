"""GSQ: the Grouped Spherical Quantizer (Wang et al. 2024, arXiv 2412.02632), faithful to the official
flex_gen `vq`/`gvq` classes (spec gsq-reference.md §2).

D = G·d channels split contiguously group-major; ONE codebook `nn.Embedding(V, d)` shared by all groups
(state-dict key `codebook.weight`, i.e. `quantizers.codebook.weight` once mounted as in the official
model); nearest code between normalised latent groups and normalised codebook rows; the decoder gets the
RAW codebook rows; aux loss MSE(q, sg[ẑ]) + β·MSE(sg[q], ẑ); straight-through on ẑ.
Options from the official code: `init` (spherical / uniform), `norm` (l2 / l1 / none / clip =
force_1d_clip), `tie_break` (the `gsq` class's argmin / random / softmax; training only),
`lookup_precision` (`exact`: the true nearest code, default; `fp32-expanded`: the official formula in fp32;
`bf16`: the official bf16-autocast lookup, see gsqbench/lookup), and the `vq` class's
`lambda_entropy_loss` quirk as `entropy_weight` (§2.5).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    normalise,
    resolve_norm,
    sample_code,
)
from gsqbench.registry import register_quantizer

Norm = Literal["l2", "l1", "none", "clip"]


def _scaled_distances(z: Tensor, z_sq: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """s = (‖z‖² + ‖c‖² − 2⟨z, c⟩) / T for one block of codes, (N, m): the official expanded distance."""
    dist = torch.addmm(z_sq[:, None] + (codes * codes).sum(1)[None, :], z, codes.T, beta=1.0, alpha=-2.0)
    return dist.div_(temperature)


class _DistanceSoftmaxEntropy(torch.autograd.Function):
    """mean_i H(softmax_v(s_iv)), s = dist/T, in blocks of codes in forward and backward (never N×V).

    Forward keeps a running logsumexp L_i and E_i = Σ_v p_iv s_iv; H_i = L_i − E_i. Backward uses
    ∂H_i/∂s_iv = −p_iv (s_iv − E_i) and ∂dist/∂z = 2(z − c), ∂dist/∂c = 2(c − z), block by block.
    """

    @staticmethod
    def forward(ctx, z: Tensor, codes: Tensor, temperature: float, step: int) -> Tensor:  # type: ignore[override]
        z_sq = (z * z).sum(1)
        lse = torch.full_like(z_sq, -float("inf"))
        expect = torch.zeros_like(z_sq)
        for c0 in range(0, codes.shape[0], step):
            s = _scaled_distances(z, z_sq, codes[c0:c0 + step], temperature)
            lse_b = torch.logsumexp(s, dim=1)
            exp_b = (torch.exp(s - lse_b[:, None]) * s).sum(1)
            new = torch.logaddexp(lse, lse_b)
            expect = expect * torch.exp(lse - new) + exp_b * torch.exp(lse_b - new)
            lse = new
        ctx.save_for_backward(z, codes, lse, expect)
        ctx.temperature, ctx.step = temperature, step
        return (lse - expect).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        z, codes, lse, expect = ctx.saved_tensors
        z_sq = (z * z).sum(1)
        g_z, g_c = torch.zeros_like(z), torch.zeros_like(codes)
        scale = grad / (z.shape[0] * ctx.temperature)
        for c0 in range(0, codes.shape[0], ctx.step):
            block = codes[c0:c0 + ctx.step]
            s = _scaled_distances(z, z_sq, block, ctx.temperature)
            g_dist = -torch.exp(s - lse[:, None]) * (s - expect[:, None]) * scale  # ∂loss/∂dist, (N, m)
            g_z += 2.0 * (z * g_dist.sum(1, keepdim=True) - g_dist @ block)
            g_c[c0:c0 + ctx.step] = 2.0 * (block * g_dist.sum(0)[:, None] - g_dist.T @ z)
        return g_z, g_c, None, None


def sample_entropy_of_distance(z: Tensor, codebook: Tensor, temperature: float, block_elems: int = 1 << 22) -> Tensor:
    """Mean over rows of H(softmax(dist/T)), exactly, over code blocks (official `vq` entropy quirk, §2.5).

    The official code passes the distance itself (not −distance) as the affinity; we keep that quirk.
    Memory stays ~block_elems in forward and backward, never N×V.
    """
    step = max(1, block_elems // max(z.shape[0], 1))
    return _DistanceSoftmaxEntropy.apply(z, codebook, temperature, step)


@register_quantizer("gsq")
class GroupedSphericalQuantizer(QuantizerBase):
    """GSQ (Wang et al. 2024): G groups of d = D/G channels, one shared l2-normalised codebook, raw-row output."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        groups: int = 1,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 1.0,
        init: Literal["spherical", "uniform"] = "spherical",
        norm: Norm | None = None,
        l2_norm: bool | None = None,
        tie_break: Literal["first", "random", "softmax"] = "first",
        softmax_tau: float = 1.0,
        lookup_precision: str = DEFAULT_LOOKUP,  # a LookupPrecision, checked in the body (message for "fp32")
    ) -> None:
        super().__init__()
        check_grouping(dim, codebook_size, groups)
        self.norm = resolve_norm(norm, l2_norm, "l2")
        d = dim // groups
        if self.norm == "clip" and (d != 1 or init != "uniform"):
            raise UserError(
                f"norm: 'clip' (official force_1d_clip) needs d = dim/groups = 1 and init 'uniform', "
                f"got d = {d} and init {init!r}; use norm 'l2' or 'none'"
            )
        if softmax_tau <= 0 or entropy_temperature <= 0:
            raise UserError(f"softmax_tau / entropy_temperature: must be > 0, got {softmax_tau} / {entropy_temperature}")
        self.dim, self.codebook_size, self.groups, self.code_dim = dim, codebook_size, groups, d
        self.commitment_weight = float(commitment_weight)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.init, self.tie_break, self.softmax_tau = init, tie_break, float(softmax_tau)
        self.lookup_precision = check_lookup_precision(lookup_precision)
        self.codebook = nn.Embedding(codebook_size, d)  # key `codebook.weight`, as in the official model
        init_codebook(self.codebook.weight, init)

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"dim": 8, "codebook_size": 64, "groups": 4}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, groups={self.groups}, norm={self.norm}, "
                f"init={self.init}, lookup_precision={self.lookup_precision}")

    def _lookup(self, z_hat: Tensor, codebook_hat: Tensor) -> Tensor:
        # evaluation is always deterministic first-index argmin (spec §2.3)
        if self.training and self.tie_break != "first":
            return sample_code(z_hat, codebook_hat, mode=self.tie_break, tau=self.softmax_tau,  # type: ignore[arg-type]
                               precision=self.lookup_precision)
        return nearest_code(z_hat, codebook_hat, precision=self.lookup_precision)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (b, D, h, w) → z_q (b, D, h, w) in z's dtype, indices (b, h, w, G) int64."""
        check_channels(z, self.dim)
        weight = self.codebook.weight
        z_hat, idx, q = grouped_codebook_lookup(z, weight, self.groups, self.norm, self._lookup)  # q: RAW rows
        loss = F.mse_loss(q, z_hat.detach()) + self.commitment_weight * F.mse_loss(q.detach(), z_hat)
        if self.training and self.entropy_weight > 0:
            with torch.autocast(device_type=z.device.type, enabled=False):  # distances near-tie: keep fp32
                ent = sample_entropy_of_distance(z_hat.reshape(-1, self.code_dim), normalise(weight.float(), self.norm),
                                                 self.entropy_temperature)
            loss = loss + self.entropy_weight * ent
        return grouped_output(z, z_hat, q, idx, self.codebook_size, {"quantizer": loss})

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(b, h, w, G) int64 → raw codebook rows concatenated in group order, (b, D, h, w)."""
        check_indices(indices, self.groups)
        return from_channels_last_groups(self.codebook(indices))
