"""A run whose loss or gradient norm goes non-finite stops at once with status `diverged` (step, term, value in
run.json and the train log), the other runs of the suite still run, `gsqbench run` exits 1 naming it, and rerunning
it unchanged is refused while a changed spec trains it afresh."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from gsqbench.cli import main
from gsqbench.report import render_report
from gsqbench.results import RUN_STATUSES, load_results

pytestmark = pytest.mark.usefixtures("one_thread")


def _suite(tmp_path: Path, **train) -> str:
    raw = {
        "suite": "div",
        "shared": {
            "model": {"preset": "tiny-f8", "latent_dim": 8},
            "data": {"train": {"kind": "synthetic", "size": 16, "limit": 6},
                     "eval": {"kind": "synthetic", "size": 16, "limit": 2}},
            "train": {"steps": 3, "batch_size": 2, "precision": "fp32", "checkpoint_every": 1, "log_every": 1,
                      **train},
            "eval": {"batch_size": 2, "samples": 0, "metrics": ["pixel"]},
        },
        # the first subject's commitment loss overflows fp32 at the first step; the second trains normally
        "subjects": [{"name": "bad", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16,
                                                   "commitment_weight": 1e39}},
                     {"name": "ok", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16}}],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _run(*argv: str) -> int:
    return main(["run", *argv, "--threads", "1", "--no-progress"])


def test_diverged_run_is_recorded_the_others_finish_and_run_exits_1(tmp_path, capsys):
    suite, results, baseline = _suite(tmp_path), str(tmp_path / "r"), str(tmp_path / "baseline.csv")
    fixed = ["--set", "subjects.bad.quantizer.commitment_weight=0.25"]
    assert _run(suite, "--results", str(tmp_path / "good"), *fixed) == 0  # the baseline: both runs finish
    assert main(["regress", str(tmp_path / "good"), "--baseline", baseline, "--update"]) == 0
    capsys.readouterr()
    assert _run(suite, "--results", results) == 1
    err = capsys.readouterr().err
    assert "1 run(s) diverged: bad-s0" in err and "bad-s0: diverged at step 1: loss_aux = inf" in err
    bad, ok = Path(results) / "div" / "bad-s0", Path(results) / "div" / "ok-s0"
    info = json.loads((bad / "run.json").read_text())
    assert "diverged" in RUN_STATUSES and info["status"] == "diverged"
    assert info["divergence"] == {"step": 1, "term": "loss_aux", "value": "inf"}
    assert json.loads((ok / "run.json").read_text())["status"] == "done"  # ran after the diverged one
    with open(bad / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    assert log[-1]["step"] == "1" and log[-1]["diverged"] == "loss_aux" and math.isinf(float(log[-1]["loss_aux"]))
    # metrics.csv holds the train_* rows only, so load_results finds the run and nothing looks evaluated
    df = load_results(results)
    assert sorted(df[df["run"] == "bad-s0"]["metric"]) == ["train_images_per_s", "train_time_s"]
    assert not (bad / "checkpoint" / "model.safetensors").exists()
    # the report keeps it in its suite's table, greyed and unranked; regress counts its baseline rows as regressed
    page = (render_report([results], tmp_path / "report").parent / "suite-div.html").read_text()
    assert '<tr class="diverged">' in page and "separate comparison groups" not in page
    assert main(["regress", results, "--baseline", baseline]) == 1
    assert "FAIL regressed: div/bad-s0" in capsys.readouterr().out

    # unchanged: refused (not retrained), still exit 1; the finished run is skipped
    before = (bad / "run.json").read_text()
    assert _run(suite, "--results", results) == 1
    err = capsys.readouterr().err
    assert "refused to resume bad-s0: it diverged at step 1 (loss_aux = inf) with this spec" in err
    assert (bad / "run.json").read_text() == before

    # a changed spec trains it afresh
    assert _run(suite, "--results", results, *fixed) == 0
    assert json.loads((bad / "run.json").read_text())["status"] == "done"


def test_huge_learning_rate_diverges_with_its_step(tmp_path, capsys):
    assert _run(_suite(tmp_path), "--results", str(tmp_path / "r"), "--only", "ok", "--set", "train.lr=1e6") == 1
    info = json.loads((tmp_path / "r" / "div" / "ok-s0" / "run.json").read_text())
    assert info["status"] == "diverged" and info["divergence"]["step"] >= 1
    assert info["divergence"]["term"] in ("loss_rec", "loss_aux", "loss", "grad_norm")
    assert info["divergence"]["value"] in ("nan", "inf", "-inf")
    assert "ok-s0" in capsys.readouterr().err
