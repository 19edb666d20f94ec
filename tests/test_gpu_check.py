"""benchmarks/gpu.py, the GPU readiness check (issue 18), cannot rot: its `--device cpu --tiny` run executes every
step at toy sizes here (the CUDA-marked tests as a CPU dry run, gloo for NCCL, Dynamo's eager backend for
Inductor) and must pass, and its early one-line failures are what they say.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("gpu")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_tiny_run_passes_every_step(tmp_path):
    out = tmp_path / "gpu-tiny.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "== summary" in proc.stdout and "# all checks passed" in proc.stdout
    report = json.loads(out.read_text())
    lines = report["summary"]
    assert not [x for x in lines if x["status"] == "FAIL"]
    by_step = {label: [x for x in lines if x["step"] == label] for label in
               ("1 correct", "2 train", "3 eval", "4 lookup", "5 torchrun")}
    for label, mine in by_step.items():  # each step ran (none skipped for the time budget) and measured
        assert mine and all(x["what"] != "all" for x in mine), label
    # the CUDA-only tests ran (dry run), not skipped; the contract and exact-lookup tests passed
    cases = report["pytest_cases"]
    cuda = [c for c in cases if c["file"].endswith("test_cuda.py")]
    assert len(cuda) == 3 and all(c["outcome"] == "passed" for c in cuda)
    assert any(c["file"].endswith("test_quantizers_contract.py") and c["outcome"] == "passed" for c in cases)
    assert any(c["file"].endswith("test_exact_lookup.py") and c["outcome"] == "passed" for c in cases)
    # training rows: both discriminators eager, and the compiled harness step
    timed = {(r["case"], r["impl"]) for r in report["train_rows"] if "median_s" in r}
    for disc in ("patchgan", "dino"):
        assert ("compile off", f"harness G+D step, {disc}") in timed
    assert ("compile eager", "harness G+D step, patchgan") in timed
    assert report["eval_rows"][0]["impl"] == "evaluate() whole pass" and report["lookup_rows"]
    # torchrun: the train run ended cleanly without DDP's unused-parameter warning; the benchmark compared both
    assert [x["status"] for x in by_step["5 torchrun"]] == ["PASS", "PASS", "INFO"]
    assert report["ddp_find_unused"]["decision"] == {"generator": False, "discriminator": False}
    assert report["ddp_find_unused"]["warned"] == {"chosen": False, "forced on": True}


def test_missing_package_fails_early_with_one_line(monkeypatch, capsys):
    gpu = _gpu_module()
    monkeypatch.setattr(gpu, "NEEDS", {"gsqbench_no_such_module": "no-such-wheel", **gpu.NEEDS})
    assert gpu.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-wheel" in err and "--no-deps" in err


def test_cuda_asked_for_without_cuda_fails_with_one_line(monkeypatch, capsys):
    gpu = _gpu_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch.cuda.is_available() is False" in err


def test_a_child_past_its_limit_is_killed_with_its_group(tmp_path):
    gpu = _gpu_module()
    # the child starts a grandchild (as torchrun starts its worker); the whole group must go
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print('started', flush=True); time.sleep(60)")
    child = gpu.Child("sleeper", [sys.executable, "-c", code], tmp_path, timeout_s=3)
    t0 = time.monotonic()
    rc, out, _ = child.wait()
    assert rc == 124 and "started" in out and time.monotonic() - t0 < 20
    for _ in range(50):  # no process is left in its group (the orphaned grandchild is reaped by init)
        try:
            os.killpg(child.proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the timed-out child's group is still there")
