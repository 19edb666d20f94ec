"""Kill -9 mid-training, restart, and end with exactly the weights of an uninterrupted run; no corrupt or temp files.

The interrupted run is a real `python -m gsqbench train` subprocess killed with SIGKILL as soon as its first
checkpoint exists; the reference is the same run trained without interruption. Deterministic CPU settings
(fp32, same thread count) make torch.equal the right comparison. The GAN path (PatchGAN + DiffAugment + LeCAM)
is on so that discriminator, its optimiser, the RNG and the data position must all be restored.

Runs on the session's `--device` (tests/conftest.py; benchmarks/gpu.py passes cuda). On CUDA the run is made
deterministic (`train.deterministic`: deterministic algorithms, cuDNN benchmark off, and CUBLAS_WORKSPACE_CONFIG
for cuBLAS), so torch.equal stays the right comparison: a resume that restores everything replays the same kernels
on the same inputs; the CUDA RNG state is part of the checkpoint. It is longer there (a GPU finishes 4 tiny steps
before the kill could land).
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gsqbench.checkpoints import load_tokenizer, load_train_state
from gsqbench.config import expand_runs, load_suite
from gsqbench.runner import open_dataset
from gsqbench.train import train_run


pytestmark = pytest.mark.usefixtures("one_thread")


STEPS = 4
STEPS_CUDA = 12  # on a GPU a tiny step takes milliseconds: leave the kill time to land before the run ends
RAW = {
    "suite": "resume",
    "shared": {
        "model": {"preset": "tiny-f8", "latent_dim": 8},
        "data": {"train": {"kind": "synthetic", "size": 16, "limit": 6}},
        "train": {"steps": STEPS, "batch_size": 2, "precision": "fp32", "checkpoint_every": 1, "log_every": 1,
                  "ema_decay": 0.9, "lr": 1e-3},
        "gan": {"discriminator": "patchgan", "start_step": 1, "lecam_weight": 0.01,
                "options": {"num_filters": 8, "num_layers": 2}},
    },
    "subjects": [{"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}}],
    "seeds": [3],
}


def _raw(device: torch.device) -> dict:
    if device.type == "cpu":
        return RAW
    raw = {**RAW, "shared": {**RAW["shared"], "train": {**RAW["shared"]["train"], "deterministic": True,
                                                        "steps": STEPS_CUDA}}}
    return raw


def _train_cmd(suite: Path, results: Path, device: torch.device) -> list[str]:
    return [sys.executable, "-m", "gsqbench", "train", str(suite), "--results", str(results), "--device",
            str(device), "--no-progress"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # same thread count as the in-process reference (bitwise comparison)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA only; no effect on CPU)
    return env


def _kill_after_first_checkpoint(cmd: list[str], state: Path, timeout_s: float = 120.0) -> int:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not state.exists():
            assert proc.poll() is None, f"trainer exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert proc.poll() is None, "run finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, device):
    raw = _raw(device)
    steps = raw["shared"]["train"]["steps"]
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "killed" / "resume" / "gsq-s3"
    state = run_dir / "checkpoint" / "train_state.pt"
    cmd = _train_cmd(suite_path, tmp_path / "killed", device)

    assert _kill_after_first_checkpoint(cmd, state) == -signal.SIGKILL
    step_at_kill = load_train_state(state)["step"]
    assert 0 < step_at_kill < steps
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from step {step_at_kill}" in done.stdout

    run = expand_runs(load_suite(suite_path))[0]
    ref_dir = tmp_path / "reference"
    train_run(run, ref_dir, open_dataset(run.shared.data.train), device=str(device), progress=False)

    resumed, reference = load_train_state(state), load_train_state(ref_dir / "checkpoint" / "train_state.pt")
    assert resumed["step"] == reference["step"] == steps
    assert resumed["data_position"] == reference["data_position"]
    for part in ("model", "ema", "disc"):
        assert resumed[part].keys() == reference[part].keys()
        for key in resumed[part]:
            assert torch.equal(resumed[part][key], reference[part][key]), f"{part}.{key} differs after resume"

    # nothing corrupt, nothing half-written: every file loads, no temp files remain
    leftovers = [p.name for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    tok, meta = load_tokenizer(run_dir / "checkpoint")
    ref_tok, _ = load_tokenizer(ref_dir / "checkpoint")
    assert meta["weights"] == "ema" and meta["step"] == steps
    for (k, a), (_, b) in zip(tok.state_dict().items(), ref_tok.state_dict().items()):
        assert torch.equal(a, b), k
    with open(run_dir / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, steps + 1))
