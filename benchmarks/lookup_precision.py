"""Lookup-precision study: how often the official lookup formulas pick the true nearest code (issue 12).

For `bf16` (the official lookup under bf16 autocast, gsq-compat) and `fp32-expanded` (the official formula
‖x‖² + ‖c‖² − 2⟨x, c⟩ in fp32), each compared with `exact` (the true nearest code, gsqbench's default;
spec gsq-reference.md §2.3 and its 2026-11-30 correction):
- agreement: fraction of tokens whose code is the exact nearest code;
- codes used: distinct codes picked over all tokens (and the exact lookup's count);
- mean angle: mean angle between a normalised latent and its picked code, in degrees (and the exact lookup's),
  computed in float64 as 2·asin(‖x̂ − ĉ‖ / 2).
Cases, d ∈ {1, 2, 4, 8, 16} × V ∈ {4,096, 16,384, 65,536, 262,144}:
1. random unit latents against a random spherical codebook (GSQ's init, spec §2.2);
2. d = 2 only: the latents of tiny GSQ tokenizers trained with the harness's own trainer (configs/demo.yaml's
   backbone with D = 16, G = 8, d = 2, one model per V, `exact` lookup, no perceptual/GAN terms) on the bundled
   sample photos, against their trained codebooks; latents from the eval photos and training crops.
No paper reports this; it says how much of the usage drop at small d (spec §7.7) the lookup alone can cause.

    python benchmarks/lookup_precision.py [--rows 8192] [--steps 150] [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml

import _common as C

from gsqbench.io import atomic_write_json
from gsqbench.lookup import nearest_code
from gsqbench.quantizer import normalise, to_channels_last_groups

DIMS = (1, 2, 4, 8, 16)
SIZES = (4_096, 16_384, 65_536, 262_144)
MODES = ("bf16", "fp32-expanded")


def angles_deg(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Angle between matching rows of x and c in degrees, float64, without the cancellation of acos near 1."""
    xn, cn = F.normalize(x.double(), dim=1), F.normalize(c.double(), dim=1)
    return torch.rad2deg(2.0 * torch.asin(((xn - cn).norm(dim=1) / 2.0).clamp(max=1.0)))


def compare(x: torch.Tensor, codebook: torch.Tensor) -> dict[str, Any]:
    """Every lookup mode on the same normalised rows and codebook; the exact lookup is the reference."""
    exact = nearest_code(x, codebook, precision="exact")
    out: dict[str, Any] = {"tokens": x.shape[0], "exact_codes_used": int(exact.unique().numel()),
                           "exact_mean_angle_deg": float(angles_deg(x, codebook[exact]).mean())}
    for mode in MODES:
        got = nearest_code(x, codebook, precision=mode)  # type: ignore[arg-type]
        out[mode] = {"agreement": float((got == exact).double().mean()), "codes_used": int(got.unique().numel()),
                     "mean_angle_deg": float(angles_deg(x, codebook[got]).mean())}
    return out


def random_case(d: int, v: int, rows: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 1000 * d + v)
    x = F.normalize(torch.randn(rows, d, generator=g), dim=1)
    codebook = F.normalize(torch.randn(v, d, generator=g), dim=1)
    return {"latents": "random unit", "d": d, "V": v, **compare(x, codebook)}


# ------------------------------------------------------------------------------------ trained checkpoints


def trained_run(v: int, steps: int):
    """The demo suite's backbone with a D = 16, G = 8 (d = 2) GSQ subject of V codes; reconstruction loss only."""
    from gsqbench.config import expand_runs, suite_from_dict

    raw = yaml.safe_load((C.REPO / "configs" / "demo.yaml").read_text())
    raw["suite"] = "lookup-precision-study"
    raw["shared"]["model"]["latent_dim"] = 16
    raw["shared"]["train"].update(steps=steps, checkpoint_every=max(steps, 1), log_every=max(steps, 1))
    raw["shared"]["loss"].update(perceptual_weight=0.0, adversarial_weight=0.0)
    raw["shared"]["gan"] = {"discriminator": "none"}
    raw["subjects"] = [{"name": "gsq-d2", "quantizer": {"name": "gsq", "dim": 16, "codebook_size": v, "groups": 8}}]
    return expand_runs(suite_from_dict(raw))[0]


def trained_case(v: int, steps: int, latent_batches: int) -> dict[str, Any]:
    from gsqbench.data import build_dataset
    from gsqbench.train import build_trainer, train_step

    run = trained_run(v, steps)
    device = torch.device("cpu")
    tr = build_trainer(run, build_dataset(run.shared.data.train, split="train"), device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(tr)
    train_s = time.perf_counter() - t0
    model = (tr.ema.model if tr.ema is not None else tr.model).eval()
    q = model.quantizer
    eval_data = build_dataset(run.shared.data.eval, split="eval")
    images = [eval_data[i][1] for i in range(len(eval_data))]
    batches = [torch.stack(images[i:i + 8]).float() / 127.5 - 1.0 for i in range(0, len(images), 8)]
    batches += [tr.stream.next(device) for _ in range(latent_batches)]
    rows = []
    with torch.no_grad():
        for x in batches:
            z = model.encoder(x)
            groups = to_channels_last_groups(z.float(), q.groups)
            rows.append(normalise(groups.reshape(-1, groups.shape[-1]), q.norm))
    x = torch.cat(rows)
    codebook = normalise(q.codebook.weight.detach().float(), q.norm)
    return {"latents": f"trained d=2 ({steps} steps)", "d": 2, "V": v, "train_s": train_s, **compare(x, codebook)}


# ----------------------------------------------------------------------------------------------- report


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'latents':<24} {'d':>2} {'V':>7} {'tokens':>6} | {'bf16 agree':>10} {'fp32-exp agree':>14} | "
            f"{'codes used exact / bf16 / fp32-exp':>34} | {'mean angle deg exact / bf16 / fp32-exp':>40}")
    lines = [head, "-" * len(head)]
    for r in results:
        b, f = r["bf16"], r["fp32-expanded"]
        used = f"{r['exact_codes_used']} / {b['codes_used']} / {f['codes_used']}"
        ang = f"{r['exact_mean_angle_deg']:.4g} / {b['mean_angle_deg']:.4g} / {f['mean_angle_deg']:.4g}"
        lines.append(f"{r['latents']:<24} {r['d']:>2} {r['V']:>7} {r['tokens']:>6} | {100 * b['agreement']:>9.1f}% "
                     f"{100 * f['agreement']:>13.1f}% | {used:>34} | {ang:>40}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192, help="random unit latents per (d, V) (default 8192)")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each d = 2 model (default 150)")
    parser.add_argument("--latent-batches", type=int, default=16,
                        help="training-crop batches of 8 encoded for the trained-latent rows (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: d = 2, V = 4,096, few rows and steps")
    args = parser.parse_args(argv)
    C.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims, sizes = ((2,), (4_096,)) if args.quick else (DIMS, SIZES)
    rows, steps, batches = (256, 1, 1) if args.quick else (args.rows, args.steps, args.latent_batches)
    t0 = time.perf_counter()
    results = []
    for d in dims:
        for v in sizes:
            C.log.info("random unit latents d=%d V=%d ...", d, v)
            results.append(random_case(d, v, rows))
    for v in sizes:
        C.log.info("training a d=2 model with V=%d (%d steps) ...", v, steps)
        results.append(trained_case(v, steps, batches))
    machine = C.machine_info(torch.device("cpu"))
    print(f"# machine: {machine}")
    print(table(results))
    print(f"# total {time.perf_counter() - t0:.0f} s")
    if args.json:
        atomic_write_json(args.json, {"script": "lookup_precision", "machine": machine, "results": results,
                                      "modes": list(MODES), "reference": "exact"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
