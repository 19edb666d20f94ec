"""DDP on CPU: 2 gloo processes (torch.multiprocessing spawn, torchrun-style env vars) against one process at
the same global batch, for GSQ and for VQ-EMA (whose codebook statistics are all-reduced inside the quantizer).

Tolerance: max |Δparam| < 2e-5 after 3 fp32 steps (AdamW lr 1e-3, eps 1e-4). The only expected difference is
float summation order (two half-batch gradient means averaged by all-reduce vs one full-batch mean); Adam's
normalisation amplifies that rounding for parameters whose gradient is ~0, so the test uses eps 1e-4 instead
of 1e-8 (with 1e-8 a near-zero-gradient bias moved 4e-3 apart while everything else agreed to 1e-6). No discriminator here: BatchNorm
statistics in a PatchGAN would legitimately differ per rank.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gsqbench.checkpoints import load_train_state
from gsqbench.config import expand_runs, suite_from_dict
from gsqbench.runner import open_dataset
from gsqbench.train import train_run


pytestmark = pytest.mark.usefixtures("one_thread")


SUBJECTS = [
    {"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}},
    {"name": "vq-ema", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16, "ema": True}},
]
TOL = 2e-5  # measured worst case 6.3e-6 (GSQ, a decoder norm bias); a wrong rank slice or a missing
# all-reduce of the VQ-EMA statistics gives differences of order 1e-3 and more


def _runs():
    raw = {
        "suite": "ddp",
        "shared": {"model": {"preset": "tiny-f8", "latent_dim": 8},
                   "data": {"train": {"kind": "synthetic", "size": 16, "limit": 8}},
                   "train": {"steps": 3, "batch_size": 4, "precision": "fp32", "lr": 1e-3, "eps": 1e-4, "ema_decay": 0.9,
                             "checkpoint_every": 100}},
        "subjects": SUBJECTS, "seeds": [1],
    }
    return expand_runs(suite_from_dict(raw))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_root: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for run in _runs():
            train_run(run, os.path.join(out_root, run.run_id), open_dataset(run.shared.data.train), device="cpu",
                      progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    for run in _runs():
        single_dir = tmp_path / "single" / run.run_id
        train_run(run, single_dir, open_dataset(run.shared.data.train), device="cpu", progress=False)
        ddp = load_train_state(tmp_path / "ddp" / run.run_id / "checkpoint" / "train_state.pt")
        one = load_train_state(single_dir / "checkpoint" / "train_state.pt")
        assert ddp["step"] == one["step"] == 3 and ddp["data_position"] == one["data_position"] == 3
        for part in ("model", "ema"):
            diffs = {k: (ddp[part][k].double() - one[part][k].double()).abs().max().item()
                     for k in one[part] if one[part][k].is_floating_point()}
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] < TOL, f"{run.subject} {part}.{worst}: {diffs[worst]:.3g}"
        # sanity: these are trained states (EMA lags the weights), and a wrong rank slice would be caught
        assert any((one["model"][k] - one["ema"][k]).abs().max() > 100 * TOL for k in one["model"]
                   if one["model"][k].is_floating_point())


def _gan_run():
    raw = {
        "suite": "ddp-unused",
        "shared": {"model": {"preset": "tiny-f8", "latent_dim": 8},
                   "data": {"train": {"kind": "synthetic", "size": 16, "limit": 4}},
                   "train": {"steps": 2, "batch_size": 2, "precision": "fp32", "ema_decay": 0.0},
                   "gan": {"discriminator": "patchgan", "options": {"num_filters": 8, "num_layers": 2}}},
        "subjects": [{"name": "vq-ema", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16, "ema": True}}],
        "seeds": [0],
    }
    return expand_runs(suite_from_dict(raw))[0]


def test_find_unused_parameters_only_for_modules_that_need_it(monkeypatch):
    """One process launched as torchrun launches it (gloo, world size 1, so DDP is on): the built-ins need no
    unused-parameter search (VQ-EMA's codebook does not require grad; PatchGAN uses every parameter); a module
    with a parameter the loss never reaches gets it, and DDP without it stops at the second step (so the dry
    check is what keeps such a plugin trainable). The dry step leaves the RNG and the EMA buffers untouched."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gsqbench import distributed as ddp
    from gsqbench.train import _generator_probe, _wrap_ddp, build_trainer

    env = {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = _gan_run()
    data = open_dataset(run.shared.data.train)
    cpu = torch.device("cpu")
    assert ddp.init_from_env("cpu", timeout_s=60)
    try:
        tr = build_trainer(run, data, cpu)
        assert isinstance(tr.ddp_model, DDP) and isinstance(tr.ddp_disc, DDP)
        assert not tr.ddp_model.find_unused_parameters and not tr.ddp_disc.find_unused_parameters
        assert build_trainer(run, data, cpu, find_unused=True).ddp_model.find_unused_parameters

        rng, buffers = torch.get_rng_state(), {k: v.clone() for k, v in tr.model.named_buffers()}
        model = tr.model
        model.eval_only_scale = torch.nn.Parameter(torch.ones(1))  # e.g. a plugin's parameter used only in eval
        probe = _generator_probe(run, cpu)
        assert ddp.has_unused_parameters(model, probe, "test")
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())

        def two_steps(wrapped):
            for _ in range(2):
                x = torch.rand(2, 3, 16, 16) * 2 - 1
                x_hat, qout = wrapped(x)
                ((x_hat - x).square().mean() + sum(qout.losses.values())).backward()

        two_steps(_wrap_ddp(model, cpu, probe, None, "generator"))  # detected: the search is on, both steps run
        with pytest.raises(RuntimeError):
            two_steps(_wrap_ddp(model, cpu, probe, False, "generator"))
    finally:
        ddp.shutdown()
