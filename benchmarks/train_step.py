"""Training-loop overhead: one harness training step against a bare forward/backward/optimizer step of the same
model and batch.

The harness step is `gsqbench.train.generator_step` (autocast context, loss terms, clipping, AdamW, LR schedule,
EMA, logging floats) on a fixed batch, and `gsqbench.train.train_step` (the same plus the batch stream, i.e. data
loading and cropping). The bare step is `zero_grad → tokenizer(x) → MSE + quantizer losses → backward → AdamW`
written out here with the same model, batch and optimizer settings. The suite is configs/demo.yaml with the
perceptual and adversarial terms off by default (they need pretrained weights or add a second network; `--gan`
turns the PatchGAN step on from step 0 so its cost is shown too).

    python benchmarks/train_step.py [--device cuda] [--repeats 10] [--json out.json] [--subject gsq] [--gan]
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Optional

import torch
import torch.nn.functional as F

import _common as C
from _common import Row

from gsqbench.config import expand_runs, load_suite
from gsqbench.data import build_dataset
from gsqbench.train import build_trainer, generator_step, train_step


def load_run(subject: str, gan: bool):
    overrides = ["loss.perceptual_weight=0"]
    overrides += ["gan.start_step=0"] if gan else ["gan.discriminator=none", "loss.adversarial_weight=0"]
    suite = load_suite(C.REPO / "configs" / "demo.yaml", overrides)
    return expand_runs(suite, only=[subject])[0]


def bare_step_fn(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x_hat, qout = model(x)
        loss = F.mse_loss(x_hat, x) + sum(qout.losses.values())
        loss.backward()
        opt.step()
    return step


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, repeats=10)
    parser.add_argument("--subject", default="gsq", help="demo subject to train (default gsq)")
    parser.add_argument("--gan", action="store_true", help="include the PatchGAN discriminator step")
    args = parser.parse_args(argv)
    C.setup_logging()
    C.apply_threads(args)
    device = torch.device(args.device)
    run = load_run(args.subject, args.gan)
    t = run.shared.train
    data = build_dataset(run.shared.data.train, split="train")
    tr = build_trainer(run, data, device)
    x = tr.stream.next(device)
    case = f"demo {args.subject}, batch {t.batch_size}, {x.shape[-1]}px" + (", +GAN" if args.gan else "")

    bare_model = copy.deepcopy(tr.model).train()
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    def harness_fixed() -> None:
        generator_step(tr, x)
        if args.gan:
            from gsqbench.train import discriminator_step

            discriminator_step(tr, x)

    rows: list[Row] = C.run_interleaved(case, [
        ("bare fwd/bwd/AdamW step", bare_step_fn(bare_model, x, bare_opt)),
        ("harness step, same batch", harness_fixed),
        ("harness train_step (+ data stream)", lambda: train_step(tr)),
    ], device, args.repeats, warmup=2)
    machine = C.machine_info(device)
    overhead = rows[1].median / rows[0].median - 1
    print(f"# machine: {machine}")
    print(C.format_table(rows))
    print(f"# goal: training-step overhead over the bare step {100 * overhead:.1f} % (goal <= 10 %): "
          f"{'MET' if overhead <= 0.10 else 'NOT MET'}; with the data stream "
          f"{100 * (rows[2].median / rows[0].median - 1):.1f} %")
    C.write_json(args.json, "train_step", machine, rows, {"train_overhead": overhead})
    return 0


if __name__ == "__main__":
    sys.exit(main())
