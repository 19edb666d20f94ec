"""Outputs that are never silently wrong (issue 15).

- Fault injection: a write failing with ENOSPC or EIO in the middle of a checkpoint, results or report write leaves
  the previous file byte-identical, gives one line, exits 1; a later run resumes and completes.
- Written files follow the umask (atomic writes used to leave 0600).
- `eval` writes only into folders it created: a unique default folder per checkpoint path; an existing run folder
  only with --force, and then no stale (foreign) sample PNG survives.
- Logs to a file: each distinct warning once with a count, one line per 10 % of a loop.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from gsqbench.cli import main

SUITE = {"suite": "t", "shared": {
    "model": {"preset": "tiny-f8", "latent_dim": 8},
    "data": {"train": {"kind": "synthetic", "size": 16, "limit": 8}, "eval": {"kind": "synthetic", "size": 16, "limit": 4}},
    "train": {"steps": 6, "batch_size": 2, "precision": "fp32", "checkpoint_every": 2, "log_every": 2},
    "eval": {"batch_size": 4, "samples": 2, "metrics": ["pixel", "codebook"]}},
    "subjects": [{"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}}]}
EVAL = ["--data", "synthetic", "--resolution", "16", "--n", "4", "--metrics", "pixel", "--device", "cpu",
        "--no-progress"]


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fail_writes(monkeypatch: pytest.MonkeyPatch, pattern: str, code: int, nth: int = 1) -> None:
    """os.replace raises OSError(code) on the nth rename onto a path matching `pattern` (the temp file is complete
    by then: the worst moment, right before the previous file would be replaced)."""
    real = os.replace
    seen = [0]

    def replace(src, dst, *args, **kwargs):
        if re.search(pattern, str(dst)):
            seen[0] += 1
            if seen[0] == nth:
                raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    return path


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_a_rerun_resumes(tmp_path, suite_file, capsys,
                                                                                    monkeypatch, one_thread):
    from gsqbench.checkpoints import load_train_state

    run_dir = tmp_path / "r" / "t" / "gsq-s0"
    argv = ["run", str(suite_file), "--results", str(tmp_path / "r"), "--no-progress"]
    _fail_writes(monkeypatch, r"train_state\.pt$", errno.ENOSPC, nth=2)  # the step-4 checkpoint
    assert main(argv) == 1
    err = _one_error_line(capsys)
    assert err == (f"gsqbench: error: could not write {run_dir / 'checkpoint' / 'train_state.pt'}: No space left on "
                   "device; the previous file (if any) is unchanged")
    assert load_train_state(run_dir / "checkpoint" / "train_state.pt")["step"] == 2  # the step-2 one, intact
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / ".gsqbench.lock").exists()
    assert not (run_dir / "metrics.csv").exists()

    monkeypatch.undo()
    assert main(argv) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["resumed_from"] == 2 and info["train_steps"] == 6 and (run_dir / "metrics.csv").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (checkpoint, samples, train log) made by the real runner."""
    import torch

    from gsqbench.config import suite_from_dict
    from gsqbench.runner import run_suite

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("trained")
        raw = json.loads(json.dumps(SUITE))
        raw["shared"]["train"]["steps"] = 2
        run_suite(suite_from_dict(raw), root, progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "t" / "gsq-s0"


def test_io_error_while_writing_results_keeps_the_previous_results(tmp_path, trained, capsys, monkeypatch,
                                                                    one_thread):
    out = tmp_path / "ev"
    ckpt = str(trained / "checkpoint")
    assert main(["eval", ckpt, "--out", str(out), "--samples", "2", *EVAL]) == 0
    capsys.readouterr()
    before = _hashes(out)
    assert len(list((out / "samples" / "real").glob("*.png"))) == 2

    _fail_writes(monkeypatch, r"metrics\.csv$", errno.EIO)
    assert main(["eval", ckpt, "--out", str(out), "--samples", "1", *EVAL]) == 1
    assert _one_error_line(capsys) == (f"gsqbench: error: could not write {out / 'metrics.csv'}: Input/output error; "
                                       "the previous file (if any) is unchanged")
    assert _hashes(out) == before  # metrics.csv, run.json, samples: all as the first evaluation left them

    monkeypatch.undo()
    assert main(["eval", ckpt, "--out", str(out), "--samples", "1", *EVAL]) == 0
    assert len(list((out / "samples" / "real").glob("*.png"))) == 1  # the other PNG was stale: removed


def _fake_results(root: Path) -> Path:
    from gsqbench.metrics.base import MetricValue
    from gsqbench.results import write_run, write_samples

    run = root / "demo" / "vq-s0"
    write_run(run, {"run_id": "vq-s0", "suite": "demo", "subject": "vq", "seed": 0, "fairness_hash": "f" * 64,
                    "card_hash": "c" * 64, "card": {}},
              [MetricValue("psnr", 20.0, direction="higher", n=2)], per_image={"image_id": ["a", "b"], "psnr": [1, 2]})
    write_samples(run, ["a", "b"], np.zeros((2, 3, 8, 8), np.uint8), np.ones((2, 3, 8, 8), np.uint8))
    return root


def test_disk_full_while_writing_the_report_keeps_the_previous_page(tmp_path, capsys, monkeypatch):
    results, rep = _fake_results(tmp_path / "results"), tmp_path / "rep"
    argv = ["report", str(results), "-o", str(rep), "--no-plots"]
    assert main(argv) == 0
    capsys.readouterr()
    before = (rep / "index.html").read_bytes()
    _fail_writes(monkeypatch, r"index\.html$", errno.ENOSPC)
    assert main([*argv, "--title", "another title"]) == 1
    assert "could not write" in _one_error_line(capsys)
    assert (rep / "index.html").read_bytes() == before and not list(rep.rglob("*.tmp"))
    monkeypatch.undo()
    assert main([*argv, "--title", "another title"]) == 0 and b"another title" in (rep / "index.html").read_bytes()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    results = _fake_results(tmp_path / "results")
    old = os.umask(umask)
    try:
        assert main(["report", str(results), "-o", str(tmp_path / "rep"), "--no-plots"]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "rep").rglob("*") if p.is_file()]
    assert files and {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(mode)}


def test_eval_default_folders_are_unique_and_force_never_mixes_in_stale_files(tmp_path, trained, capsys,
                                                                               monkeypatch, one_thread):
    for name in ("a", "b"):  # two checkpoints that share a basename
        shutil.copytree(trained / "checkpoint", tmp_path / name / "checkpoint")
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        assert main(["eval", f"{name}/checkpoint", *EVAL]) == 0
    folders = sorted((tmp_path / "results" / "eval").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"checkpoint-[0-9a-f]{8}", f.name) for f in folders)
    assert {json.loads((f / "run.json").read_text())["spec"]["checkpoint"] for f in folders} == \
        {"a/checkpoint", "b/checkpoint"}
    # the same checkpoint evaluated again reuses (and replaces) its own folder
    assert main(["eval", "a/checkpoint", *EVAL]) == 0
    assert len(list((tmp_path / "results" / "eval").iterdir())) == 2

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for kind in ("real", "recon"):
        (run_dir / "samples" / kind / "foreign.png").write_bytes(b"not from this evaluation")
    kept = {p: p.read_bytes() for p in [run_dir / "train_log.csv", *(run_dir / "checkpoint").iterdir()]}
    capsys.readouterr()
    assert main(["eval", "a/checkpoint", "--out", "run", *EVAL]) == 2
    assert "did not create" in _one_error_line(capsys)
    assert main(["eval", "a/checkpoint", "--out", "run", "--force", *EVAL]) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["spec"]["checkpoint"] == "a/checkpoint"
    samples = {p.name for p in (run_dir / "samples" / "real").glob("*.png")}
    assert "foreign.png" not in samples and len(samples) == 4  # --n 4 images, default --samples 8
    assert not list((run_dir / "samples" / "recon").glob("foreign.png"))
    assert all(p.read_bytes() == data for p, data in kept.items())  # training files untouched


# ----------------------------------------------------------------------------------------------- logs
def test_cli_logging_says_each_warning_once_with_a_count(monkeypatch):
    from gsqbench.progress import CliLogging, Progress

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a plain `gsqbench` process
    stream = io.StringIO()  # not a terminal
    logs = CliLogging(0, stream).start()
    try:
        lib = logging.getLogger("gsqbench.metrics.common")
        for _ in range(4):
            lib.warning("metric unavailable: weight file 'alexnet' is not installed")
        lib.warning("another warning")
        lib.info("not shown at the default level")
        bar = Progress(50, "vq-s0 train", unit="steps")
        for _ in range(50):
            bar.update(1)
        bar.close()
    finally:
        logs.finish()
    lines = stream.getvalue().splitlines()
    assert lines.count("WARNING gsqbench.metrics.common: metric unavailable: weight file 'alexnet' is not installed") == 1
    assert "WARNING gsqbench.metrics.common: another warning" in lines
    assert not any("not shown" in line for line in lines)
    tenths = [line for line in lines if line.startswith("vq-s0 train: ")]
    assert [re.search(r"(\d+) %", line).group(1) for line in tenths] == [str(10 * i) for i in range(1, 11)]
    assert tenths[0].startswith("vq-s0 train: 5/50 steps (10 %) after ")
    assert lines[-1] == ("(the warning above was given 4 times) gsqbench.metrics.common: metric unavailable: weight "
                         "file 'alexnet' is not installed")
