"""Quantizer speed and memory: forward+backward time and extra peak memory, side by side with references.

1. GSQ's lookup (Wang et al. 2024, spec gsq-reference.md §2.3) at the paper's F16 setting (d = 2, G = 8,
   V = 262,144; 256, 2,048 and 16,384 latent positions), the paper's F8 (d = 8, G = 1, V = 8,192) and the demo's
   (configs/demo.yaml): our registered `gsq` module (forward + backward) with `lookup_precision` `exact` (the
   default: true nearest code) and `fp32-expanded` (the official formula in fp32), and the bare `nearest_code`
   search, against (a) the straightforward full-distance-matrix lookup written out below (the official
   compute_dist: N×V floats per matrix), run only where it fits in memory, and (b) vector-quantize-pytorch's
   `VectorQuantize(use_cosine_sim=True)` with the same d, V and G heads sharing one codebook. The `exact` module
   row takes an SGD step on the codebook after every step, as training does, so its d = 2 angular index is
   rebuilt every time; the "fixed codebook" row is evaluation, where the index is built once and cached. These
   three module rows are timed round-robin, so their ratios survive load changes on a shared machine.
2. Every registered quantizer at equal bits per token on the same latent grid (the demo's 12-bit subjects, and
   16 bits), compared with GSQ.
Also prints the machine's fp32 matmul throughput and the arithmetic lower bound it implies for each lookup
(2·N·V·d FLOP of dot products in the forward search).

    python benchmarks/quantizers.py [--device cuda] [--repeats 3] [--json out.json] [--only f16,f8,demo,registry]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import yaml

import _common as C
from _common import Row

from gsqbench.quantizer import from_channels_last_groups, nearest_code, straight_through, to_channels_last_groups
from gsqbench.registry import QUANTIZERS, build_quantizer, discover_quantizers

SECTIONS = ("f16", "f8", "demo", "registry")


@dataclass(frozen=True)
class LookupCase:
    """One GSQ lookup shape: latent (b, G·d, h, w) searched against V codes of dimension d."""

    label: str
    d: int
    groups: int
    codebook_size: int
    batch: int
    hw: int

    @property
    def positions(self) -> int:
        return self.batch * self.hw * self.hw

    @property
    def rows(self) -> int:  # group vectors searched: N = positions · G
        return self.positions * self.groups

    @property
    def name(self) -> str:
        return f"{self.label} d={self.d} G={self.groups} V={self.codebook_size}, {self.positions} pos"

    def dot_flop(self) -> float:
        return 2.0 * self.rows * self.codebook_size * self.d


def demo_gsq_case() -> LookupCase:
    """The demo's GSQ subject on the demo's latent grid (eval batch, image size / f of the demo's preset)."""
    from gsqbench.models.autoencoder import PRESETS

    spec = yaml.safe_load((C.REPO / "configs" / "demo.yaml").read_text())
    q = next(s["quantizer"] for s in spec["subjects"] if s["quantizer"]["name"] == "gsq")
    f = 2 ** (len(PRESETS[spec["shared"]["model"]["preset"]].channel_multipliers) - 1)
    side = spec["shared"]["data"]["eval"]["size"] // f
    return LookupCase("demo", q["dim"] // q["groups"], q["groups"], q["codebook_size"],
                      spec["shared"]["eval"]["batch_size"], side)


def lookup_cases(sections: set[str]) -> list[LookupCase]:
    cases = []
    if "f16" in sections:
        cases += [LookupCase("F16", 2, 8, 262_144, 1, 16), LookupCase("F16", 2, 8, 262_144, 8, 16),
                  LookupCase("F16", 2, 8, 262_144, 64, 16)]
    if "f8" in sections:
        cases += [LookupCase("F8", 8, 1, 8_192, 1, 32), LookupCase("F8", 8, 1, 8_192, 4, 32)]
    if "demo" in sections:
        cases.append(demo_gsq_case())
    return cases


# ------------------------------------------------------------------------------------------- implementations


def _backward(z_q: torch.Tensor, aux: torch.Tensor) -> None:
    """A decoder stand-in: a scalar depending on every output element, so the whole backward runs."""
    (z_q.float().square().mean() + aux).backward()


def straightforward_step(z: torch.Tensor, weight: torch.Tensor, groups: int, beta: float = 0.25) -> None:
    """GSQ forward+backward with the full N×V expanded-distance matrix (the official compute_dist + argmin)."""
    z_hat = F.normalize(to_channels_last_groups(z, groups), dim=-1)  # (b, h, w, G, d)
    flat = z_hat.reshape(-1, z_hat.shape[-1])
    with torch.no_grad():
        c = F.normalize(weight, dim=-1)
        dist = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(c**2, dim=1) - 2 * torch.matmul(flat, c.t())
        idx = torch.argmin(dist, dim=-1)
        del dist
    q = F.embedding(idx, weight).view_as(z_hat)
    loss = F.mse_loss(q, z_hat.detach()) + beta * F.mse_loss(q.detach(), z_hat)
    _backward(from_channels_last_groups(straight_through(z_hat, q)), loss)


def make_inputs(case: LookupCase, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(case.batch, case.groups * case.d, case.hw, case.hw, generator=g).to(device)
    w = F.normalize(torch.randn(case.codebook_size, case.d, generator=g), dim=1).to(device)
    return z, w


def ours_module(case: LookupCase, device: torch.device, precision: str, train: bool = True) -> Callable[[], None]:
    """Our `gsq` module, forward + backward. train: an SGD step on the codebook after each step (lr 1e-3), so
    the codebook differs at every lookup as in training; otherwise fixed (evaluation-like)."""
    q = build_quantizer({"name": "gsq", "dim": case.groups * case.d, "codebook_size": case.codebook_size,
                         "groups": case.groups, "lookup_precision": precision}).to(device).train()
    z, w = make_inputs(case, device)
    with torch.no_grad():
        q.codebook.weight.copy_(w)
    z.requires_grad_(True)

    def step() -> None:
        out = q(z)
        _backward(out.z_q, sum(out.losses.values()))
        if train:
            with torch.no_grad():
                q.codebook.weight.sub_(1e-3 * q.codebook.weight.grad)
        q.zero_grad(set_to_none=True)
        z.grad = None
    return step


def ours_search(case: LookupCase, device: torch.device, precision: str) -> Callable[[], None]:
    z, w = make_inputs(case, device)
    flat = F.normalize(to_channels_last_groups(z, case.groups), dim=-1).reshape(-1, case.d)
    return lambda: nearest_code(flat, F.normalize(w, dim=-1), precision=precision)  # type: ignore[arg-type]


def straightforward(case: LookupCase, device: torch.device) -> Callable[[], None]:
    z, w = make_inputs(case, device)
    z.requires_grad_(True)
    weight = torch.nn.Parameter(w)

    def step() -> None:
        straightforward_step(z, weight, case.groups)
        z.grad = weight.grad = None
    return step


def vq_pytorch(case: LookupCase, device: torch.device) -> Callable[[], None]:
    from vector_quantize_pytorch import VectorQuantize

    # G heads of d channels sharing ONE codebook = GSQ's grouping; dim = G·d so there is no projection
    vq = VectorQuantize(dim=case.groups * case.d, codebook_size=case.codebook_size, codebook_dim=case.d,
                        heads=case.groups, separate_codebook_per_head=False, use_cosine_sim=True,
                        accept_image_fmap=True, commitment_weight=0.25).to(device).train()
    z, _ = make_inputs(case, device)
    z.requires_grad_(True)

    def step() -> None:
        quantized, _, loss = vq(z)
        _backward(quantized, loss.sum())
        vq.zero_grad(set_to_none=True)
        z.grad = None
    return step


EXACT_TRAIN = "gsq fwd+bwd exact (train step)"
EXACT_EVAL = "gsq fwd+bwd exact (fixed codebook)"
EXPANDED = "gsq fwd+bwd fp32-expanded"

# straightforward: 3 live N×V fp32 matrices; vector-quantize-pytorch: distances, its EMA one-hot and temporaries
_MATRICES = {"straightforward": 3, "vq-pytorch": 5}


def fits(case: LookupCase, impl: str, device: torch.device) -> tuple[bool, float]:
    need = _MATRICES[impl] * case.rows * case.codebook_size * 4
    return need < 0.8 * C.available_memory_bytes(device), need / 2**30


def module_impl(mode: str) -> str:
    return EXPANDED if mode == "fp32-expanded" else f"gsq fwd+bwd {mode}"


def bench_lookup(case: LookupCase, device: torch.device, repeats: int, *,
                 modes: tuple[str, ...] = ("exact", "fp32-expanded"), vq: bool = True) -> list[Row]:
    """The straightforward full matrix (reference, where it fits), our module in each lookup `mode` (`exact` as
    a training step and with a fixed codebook) timed round-robin, the bare searches, and vector-quantize-pytorch
    (`vq`)."""
    rows = []
    ok, gb = fits(case, "straightforward", device)
    if ok:
        rows.append(C.run_row(case.name, "straightforward full matrix", straightforward(case, device), device,
                              repeats, reference=True))
    else:
        rows.append(C.skipped(case.name, "straightforward full matrix", f"needs ~{gb:.0f} GB, does not fit",
                              reference=True))
    impls: list[tuple[str, Callable[[], None]]] = []
    for mode in modes:
        if mode == "exact":
            impls += [(EXACT_TRAIN, ours_module(case, device, "exact")),
                      (EXACT_EVAL, ours_module(case, device, "exact", train=False))]
        else:
            impls.append((module_impl(mode), ours_module(case, device, mode)))
    # round-robin, so that a load change on a shared machine hits the module rows alike and their ratios hold
    group = C.run_interleaved(case.name, impls, device, repeats)
    for row in group:
        row.reference = False  # the case's reference is the straightforward lookup
    rows += group
    for mode in modes:  # the bare search; the CPU fp32 searches are most of their module row: not repeated if slow
        if mode == "exact" or device.type != "cpu" or case.rows <= 1 << 14:
            rows.append(C.run_row(case.name, f"search only, {mode}", ours_search(case, device, mode), device,
                                  repeats))
    if not vq:
        return rows
    ok, gb = fits(case, "vq-pytorch", device)
    if ok:
        rows.append(C.run_row(case.name, "vector-quantize-pytorch cosine", vq_pytorch(case, device), device,
                              repeats, warmup=0 if case.rows * case.codebook_size > 1 << 28 else 1))
    else:
        rows.append(C.skipped(case.name, "vector-quantize-pytorch cosine", f"needs ~{gb:.0f} GB, does not fit"))
    return rows


# ------------------------------------------------------------------------------------ registry, equal bits


def registry_configs(bits: int) -> list[tuple[str, dict[str, Any]]]:
    """A config per registered quantizer at `bits` bits per token: the demo's subjects for 12 bits, else the
    canonical codebook_size = 2**bits (GSQ in 2 groups of 2**(bits/2) where that is whole)."""
    discover_quantizers()
    if bits == 12:
        spec = yaml.safe_load((C.REPO / "configs" / "demo.yaml").read_text())
        demo = {s["quantizer"]["name"]: dict(s["quantizer"]) for s in spec["subjects"]}
    else:
        demo = {}
    out = []
    for name in QUANTIZERS.names():
        if name in demo:
            out.append((name, demo[name]))
        elif name == "gsq" and bits % 2 == 0:
            out.append((name, {"name": name, "dim": 8, "codebook_size": 2 ** (bits // 2), "groups": 2}))
        elif name in ("gsq", "vq"):
            out.append((name, {"name": name, "dim": 8, "codebook_size": 2**bits}))
        else:
            out.append((name, {"name": name, "codebook_size": 2**bits}))
    return out


def registry_rows(bits: int, device: torch.device, repeats: int, batch: int = 8, hw: int = 8) -> list[Row]:
    case = f"registry {bits} bits/token, {batch * hw * hw} pos"
    rows = []
    for name, cfg in registry_configs(bits):
        try:
            q = build_quantizer(cfg).to(device).train()
        except ValueError as exc:  # UserError: this family has no config at this size
            rows.append(C.skipped(case, name, str(exc)[:90]))
            continue
        z = torch.randn(batch, q.dim, hw, hw, generator=torch.Generator().manual_seed(0)).to(device)
        z.requires_grad_(True)

        def step(q=q, z=z) -> None:
            out = q(z)
            _backward(out.z_q, sum(out.losses.values()) if out.losses else z.new_zeros(()))
            q.zero_grad(set_to_none=True)
            z.grad = None
        bpt = q.groups * math.log2(q.codebook_size)
        rows.append(C.run_row(case, f"{name} {_short(cfg)}", step, device, repeats, reference=name == "gsq",
                              bits_per_token=bpt))
    return rows


def _short(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items() if k != "name").replace(" ", "")


# ----------------------------------------------------------------------------------------------- report


def bounds_table(cases: list[LookupCase], gflops: float) -> list[dict[str, Any]]:
    return [{"case": c.name, "rows": c.rows, "dot_gflop": c.dot_flop() / 1e9,
             "lower_bound_s": c.dot_flop() / (gflops * 1e9)} for c in cases]


def goals(rows: list[Row]) -> list[str]:
    """The acceptance goals (issue 12 for `exact`, the earlier ones for the search), on the rows that ran."""
    by = {(r.case, r.impl): r for r in rows if not r.skipped}
    out = []
    f16 = {n: LookupCase("F16", 2, 8, 262_144, n // 256, 16).name for n in (256, 2048, 16384)}
    ours_s, ref_s = by.get((f16[256], EXACT_TRAIN)), by.get((f16[256], "straightforward full matrix"))
    if ours_s and ref_s:
        sp, mf = ref_s.median / ours_s.median, (ours_s.peak_mb or 0) / max(ref_s.peak_mb or 1e-9, 1e-9)
        out.append(f"F16 256 pos: exact {sp:.1f}x faster than straightforward (goal >= 3x), memory {mf:.4f} of it "
                   f"(goal <= 0.125): {'MET' if sp >= 3 and mf <= 0.125 else 'NOT MET'}")
    vq = by.get((f16[256], "vector-quantize-pytorch cosine"))
    if ours_s and vq:
        sp = vq.median / ours_s.median
        out.append(f"F16 256 pos: exact {sp:.1f}x faster than vector-quantize-pytorch (goal >= 5x): "
                   f"{'MET' if sp >= 5 else 'NOT MET'}")
    for n, limit in ((2048, 0.3), (16384, 2.0)):
        row = by.get((f16[n], EXACT_TRAIN))
        if row:
            ok = row.median <= limit and (row.peak_mb or 0) <= 1024
            out.append(f"F16 {n} pos: exact fwd+bwd {row.median:.3f} s (goal <= {limit} s), extra peak "
                       f"{row.peak_mb:.0f} MB (goal <= 1024 MB): {'MET' if ok else 'NOT MET'}")
    f8 = LookupCase("F8", 8, 1, 8_192, 4, 32).name
    ex, fp = by.get((f8, EXACT_TRAIN)), by.get((f8, EXPANDED))
    if ex and fp:
        ratio = ex.median / fp.median
        out.append(f"F8 4096 pos: exact fwd+bwd {ex.median:.3f} s = {ratio:.2f}x fp32-expanded {fp.median:.3f} s "
                   f"(goal <= 1.5x): {'MET' if ratio <= 1.5 else 'NOT MET'}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, repeats=3)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(sections - set(SECTIONS))}; valid: {SECTIONS}")
    C.setup_logging()
    C.apply_threads(args)
    device = torch.device(args.device)
    machine = C.machine_info(device)
    gflops = C.matmul_gflops(device)
    cases = lookup_cases(sections)
    rows: list[Row] = []
    for case in cases:
        rows += bench_lookup(case, device, args.repeats)
    if "registry" in sections:
        rows += registry_rows(12, device, args.repeats) + registry_rows(16, device, args.repeats)
    bounds = bounds_table(cases, gflops)
    print(f"# machine: {machine}")
    print(f"# fp32 matmul throughput: {gflops:.1f} GFLOP/s (1024^3 mm); lower bound = 2*N*V*d / throughput")
    for b in bounds:
        print(f"#   {b['case']:<40} N={b['rows']:>6}  {b['dot_gflop']:8.2f} GFLOP  >= {b['lower_bound_s']:.3f} s")
    print(C.format_table(rows))
    for line in goals(rows):
        print("# goal: " + line)
    C.write_json(args.json, "quantizers", machine, rows, {"matmul_gflops": gflops, "lower_bounds": bounds,
                                                          "goals": goals(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
