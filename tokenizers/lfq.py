"""LFQ baseline: lookup-free quantization (MAGVIT-v2, Yu et al., arXiv 2310.05737; Open-MAGVIT2 defaults),
spec gsq-reference.md §8.4.

Each of K channels is quantised to ±1 (z > 0 → +1, else −1); index Σ_k 2^k·[z_k > 0] (channel 0 least
significant); implicit codebook {±1}^K of size 2^K; straight-through. Aux losses: commitment
MSE(z, sg[q]) (weight 0.25) and the entropy loss mean_i H(p_i) − H(mean_i p_i) (weight 0.1) with
p_i = softmax_c(2⟨z_i, c⟩/τ), τ = 0.01. Because the logits are separable, p_i(c) = Π_k σ(c_k·4z_ik/τ):
the per-sample entropy is an exact sum of binary entropies, and the batch distribution mean_i p_i is
computed exactly in blocks of codes (recomputed in a hand-written backward), so K = 18 never holds
N×2^18 at once.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gsqbench.errors import UserError
from gsqbench.quantizer import (
    QuantizerBase, QuantizerOutput, batch_usage, check_channels, check_indices, straight_through,
)
from gsqbench.registry import register_quantizer


def code_bits(start: int, stop: int, k: int, like: Tensor) -> Tensor:
    """(stop − start, K) 0/1 in `like`'s dtype/device: bit k of each code index (channel 0 least significant)."""
    codes = torch.arange(start, stop, device=like.device)
    return ((codes[:, None] >> torch.arange(k, device=like.device)) & 1).to(like.dtype)


def binary_entropy_from_logit(a: Tensor) -> Tensor:
    """H(σ(a)) in nats, stable for large |a|: p·softplus(−a) + (1−p)·softplus(a)."""
    p = torch.sigmoid(a)
    return p * F.softplus(-a) + (1.0 - p) * F.softplus(a)


def _block_probs(log_neg_sum: Tensor, log_diff: Tensor, bits: Tensor, work: Tensor) -> Tensor:
    """p_i(c) for one block of m codes, (N, m), written into the reused buffer `work`.

    log p_i(c) = Σ_k [c_k=+1]·log σ(a_ik) + [c_k=−1]·log σ(−a_ik)
               = Σ_k log σ(−a_ik) + Σ_k bit_ck·(log σ(a_ik) − log σ(−a_ik))   → one small matmul per block
    Reusing one buffer (instead of fresh N×m tensors per block) keeps the process's peak memory flat.
    """
    n, m = log_diff.shape[0], bits.shape[0]
    block = work[: n * m].view(n, m)
    torch.matmul(log_diff, bits.T, out=block)
    return block.add_(log_neg_sum[:, None]).exp_()


class _BatchMeanProbs(torch.autograd.Function):
    """avg(c) = mean_i p_i(c) over all 2^K codes, block by block in forward AND backward.

    A hand-written backward (rather than checkpointing) keeps memory at one N×m block: each block's
    probabilities are recomputed, used and freed. With P = p_i(c): ∂avg_c/∂log_neg_sum_i = P_ic/N and
    ∂avg_c/∂log_diff_ik = P_ic·bit_ck/N.
    """

    @staticmethod
    def forward(ctx, log_neg_sum: Tensor, log_diff: Tensor, step: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(log_neg_sum, log_diff)
        ctx.step = step
        k = log_diff.shape[1]
        out = log_diff.new_empty(2 ** k)
        work = log_diff.new_empty(log_diff.shape[0] * min(step, 2 ** k))
        for c0 in range(0, 2 ** k, step):
            c1 = min(2 ** k, c0 + step)
            bits = code_bits(c0, c1, k, log_diff)
            out[c0:c1] = _block_probs(log_neg_sum, log_diff, bits, work).mean(dim=0)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        log_neg_sum, log_diff = ctx.saved_tensors
        n, k = log_diff.shape
        g_sum, g_diff = torch.zeros_like(log_neg_sum), torch.zeros_like(log_diff)
        work = log_diff.new_empty(n * min(ctx.step, 2 ** k))
        for c0 in range(0, 2 ** k, ctx.step):
            c1 = min(2 ** k, c0 + ctx.step)
            bits = code_bits(c0, c1, k, log_diff)
            weighted = _block_probs(log_neg_sum, log_diff, bits, work).mul_(grad[c0:c1] / n)  # (N, m)
            g_sum += weighted.sum(dim=1)
            g_diff.addmm_(weighted, bits)
        return g_sum, g_diff, None


def batch_mean_probs(a: Tensor, block_elems: int = 1 << 22) -> Tensor:
    """mean_i Π_k σ(c_k·a_ik) for every c ∈ {±1}^K, exactly, in code blocks of ~block_elems/N each."""
    n = a.shape[0]
    log_pos, log_neg = F.logsigmoid(a), F.logsigmoid(-a)
    step = max(1, block_elems // max(n, 1))
    return _BatchMeanProbs.apply(log_neg.sum(dim=1), log_pos - log_neg, step)


def lfq_entropy_terms(z: Tensor, tau: float, block_elems: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """(mean per-sample entropy, entropy of the batch-mean distribution) for z (N, K), in nats."""
    a = 4.0 * z / tau  # softmax over c of 2⟨z, c⟩/τ factorises into per-channel σ(4 z_k / τ)
    per_sample = binary_entropy_from_logit(a).sum(dim=1).mean()
    avg = batch_mean_probs(a, block_elems)
    batch = -(avg * torch.log(avg.clamp_min(1e-30))).sum()  # 0·log 0 = 0 with a finite gradient
    return per_sample, batch


@register_quantizer("lfq")
class LookupFreeQuantizer(QuantizerBase):
    """LFQ (MAGVIT-v2): sign of each of K = log2 V channels, entropy + commitment losses (Open-MAGVIT2 weights)."""

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        groups: int = 1,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        entropy_temperature: float = 0.01,
        batch_entropy_weight: float = 1.0,
    ) -> None:
        super().__init__()
        dim = resolve_lfq_dim(dim, codebook_size)
        if groups != 1:
            raise UserError(f"groups: LFQ fuses its {dim} channels into one index per position; use groups: 1, got {groups}")
        if entropy_temperature <= 0:
            raise UserError(f"entropy_temperature: must be > 0, got {entropy_temperature}")
        self.dim, self.codebook_size, self.groups = dim, 2 ** dim, 1
        self.commitment_weight, self.entropy_weight = float(commitment_weight), float(entropy_weight)
        self.entropy_temperature, self.batch_entropy_weight = float(entropy_temperature), float(batch_entropy_weight)
        self.register_buffer("bit_weights", 2 ** torch.arange(dim, dtype=torch.long), persistent=False)

    @classmethod
    def example_config(cls) -> dict[str, Any]:
        return {"dim": 6}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, entropy_weight={self.entropy_weight}"

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (b, K, h, w) → z_q ∈ {±1} (straight-through), indices (b, h, w, 1) int64."""
        check_channels(z, self.dim)
        b, _, h, w = z.shape
        x = z.float().permute(0, 2, 3, 1)  # (b, h, w, K)
        q = torch.where(x > 0, 1.0, -1.0)
        idx = ((x > 0).long() * self.bit_weights).sum(dim=-1, keepdim=True)  # (b, h, w, 1)
        losses = {"commitment": self.commitment_weight * F.mse_loss(x, q)}
        stats = {"usage": batch_usage(idx, self.codebook_size)}
        if self.training and self.entropy_weight > 0:
            with torch.autocast(device_type=x.device.type, enabled=False):  # τ = 0.01 logits need fp32
                per_sample, batch = lfq_entropy_terms(x.reshape(-1, self.dim), self.entropy_temperature)
            losses["entropy"] = self.entropy_weight * (per_sample - self.batch_entropy_weight * batch)
            stats.update(per_sample_entropy=per_sample.detach(), batch_entropy=batch.detach())
        z_q = straight_through(x, q).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        return QuantizerOutput(z_q, idx, losses, stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(b, h, w, 1) int64 → ±1 codes (b, K, h, w)."""
        check_indices(indices, 1)
        bits = (indices >> torch.arange(self.dim, device=indices.device)) & 1  # (b, h, w, K)
        return (bits.float() * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()


def resolve_lfq_dim(dim: int | None, codebook_size: int | None) -> int:
    """K from `dim` and/or `codebook_size` (= 2**K), with one-line errors naming the field."""
    if dim is None and codebook_size is None:
        raise UserError("dim / codebook_size: LFQ needs one of them (codebook_size = 2**dim)")
    if codebook_size is not None:
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            up = 2 ** math.ceil(math.log2(max(codebook_size, 2)))
            raise UserError(f"codebook_size: LFQ needs a power of two (2**dim), got {codebook_size}; e.g. {up}")
        k = codebook_size.bit_length() - 1
        if dim is not None and dim != k:
            raise UserError(f"dim: {dim} does not match codebook_size {codebook_size} = 2**{k}; use dim: {k}")
        return k
    if dim < 1 or dim > 62:
        raise UserError(f"dim: LFQ needs 1 <= dim <= 62 (index fits int64), got {dim}")
    return dim
