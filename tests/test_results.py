"""Results store: the metrics.csv / run.json layout of docs/contracts.md, exact round trips, no torch, concurrency.

Expected values are the inputs themselves, read back with the csv/json/numpy standard readers (not our readers),
and the column list is written out here from the contract.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gsqbench.errors import UserError
from gsqbench.metrics.base import MetricValue
from gsqbench.results import (
    load_results, provenance, read_code_counts, read_per_image, run_dir_for, sample_ids, write_code_counts,
    write_per_image, write_run, write_samples,
)

CONTRACT_COLUMNS = ["suite", "run", "subject", "seed", "metric", "value", "stderr", "ci_low", "ci_high", "direction",
                    "n", "unavailable", "fairness_hash", "card_hash", "device", "not_comparable"]
FIXTURES = Path(__file__).parent / "fixtures" / "results" / "tree"
REPO = Path(__file__).resolve().parent.parent


def _info(run_id: str = "gsq-s0", suite: str = "demo", subject: str = "gsq") -> dict:
    return {"run_id": run_id, "suite": suite, "subject": subject, "seed": 3, "grid": {"quantizer.dim": 8},
            "spec": {"quantizer": {"name": subject}}, "fairness_hash": "f" * 64, "card": {"mode": "gsqbench"},
            "card_hash": "c" * 64, "provenance": {"device": "cpu", "git_sha": "abc"}}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_write_run_layout_and_exact_values(tmp_path):
    psnr = 23.456789012345678
    metrics = [MetricValue("psnr", psnr, 0.1234, 23.2, 23.7, "higher", 50),
               MetricValue.missing("rfid@inception", "no weights; fix: gsqbench weights download inception-fid", "lower"),
               {"name": "params", "value": 1234567, "direction": "none"}]
    run_dir = write_run(tmp_path / "demo" / "gsq-s0", _info(), metrics)
    with (run_dir / "metrics.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header == CONTRACT_COLUMNS
    rows = {r["metric"]: r for r in _read_csv(run_dir / "metrics.csv")}
    assert set(rows) == {"psnr", "rfid@inception", "params"}
    assert float(rows["psnr"]["value"]) == psnr  # bit-exact round trip
    assert (rows["psnr"]["stderr"], rows["psnr"]["n"], rows["psnr"]["direction"]) == ("0.1234", "50", "higher")
    assert rows["psnr"]["suite"] == "demo" and rows["psnr"]["run"] == "gsq-s0" and rows["psnr"]["seed"] == "3"
    assert rows["psnr"]["fairness_hash"] == "f" * 64 and rows["psnr"]["device"] == "cpu"
    assert math.isnan(float(rows["rfid@inception"]["value"]))
    assert "gsqbench weights download inception-fid" in rows["rfid@inception"]["unavailable"]
    assert float(rows["params"]["value"]) == 1234567
    info = json.loads((run_dir / "run.json").read_text())
    assert info["card_hash"] == "c" * 64 and info["grid"] == {"quantizer.dim": 8} and info["status"] == "done"


def test_load_results_reads_every_row_of_the_fixture_tree():
    files = sorted(FIXTURES.rglob("metrics.csv"))
    expected = [r for f in files for r in _read_csv(f)]
    df = load_results(FIXTURES)
    assert len(df) == len(expected) and len(files) == 8
    assert set(CONTRACT_COLUMNS) <= set(df.columns)
    got = df.set_index(["run", "metric"])["value"]
    for r in expected:
        want = float(r["value"])
        assert (math.isnan(got[(r["run"], r["metric"])]) and math.isnan(want)) or got[(r["run"], r["metric"])] == want


def test_per_image_and_code_counts_round_trip(tmp_path):
    ids = ["b", "a", "c"]
    write_per_image(tmp_path, {"image_id": ids, "psnr": [20.5, 21.25, float("nan")], "lpips@alex": [0.1, 0.2, 0.3]})
    rows = _read_csv(tmp_path / "per_image.csv")
    assert [r["image_id"] for r in rows] == ids and float(rows[1]["psnr"]) == 21.25
    assert list(read_per_image(tmp_path).columns) == ["image_id", "psnr", "lpips@alex"]
    counts = np.arange(12, dtype=np.int64).reshape(3, 4) * 1_000_000_007
    write_code_counts(tmp_path, counts)
    with np.load(tmp_path / "codes.npz", allow_pickle=False) as data:  # oracle: numpy itself, no pickle allowed
        np.testing.assert_array_equal(data["counts"], counts)
    np.testing.assert_array_equal(read_code_counts(tmp_path), counts)
    with pytest.raises(UserError, match="integer"):
        write_code_counts(tmp_path, np.ones((2, 3), dtype=np.float32))


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(UserError, match="no metrics.csv"):
        load_results(tmp_path)
    bad = tmp_path / "s" / "r"
    bad.mkdir(parents=True)
    (bad / "metrics.csv").write_text("metric,value\npsnr,twenty\n")
    with pytest.raises(UserError, match=r"metrics\.csv.*'value'.*'twenty'"):
        load_results(tmp_path)
    with pytest.raises(UserError, match="direction 'up'"):
        write_run(tmp_path / "x", _info(), [MetricValue("psnr", 1.0, direction="up")])  # type: ignore[arg-type]
    with pytest.raises(UserError, match="run_id"):
        write_run(tmp_path / "x", {"suite": "s", "subject": "g"}, [])
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "codes.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="codes.npz"):
        read_code_counts(tmp_path / "y")


def test_run_dir_names_cannot_escape_the_root(tmp_path):
    d = run_dir_for(tmp_path, "../../etc", "../passwd")
    assert tmp_path.resolve() in d.parents


def test_provenance_without_importing_torch():
    code = ("import sys, json; from gsqbench.results import provenance; p = provenance(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(json.dumps(p))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    prov = json.loads(out.stdout)
    git_sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert prov["git_sha"] == git_sha and isinstance(prov["git_dirty"], bool)
    assert prov["versions"]["numpy"] == np.__version__
    assert {"torch", "lpips", "torch-fidelity", "scikit-image"} <= set(prov["versions"])
    assert prov["device"] == "cpu" and prov["precision"] == "fp32" and prov["date"].endswith("+00:00")
    assert provenance(device="cuda (H200)", precision="bf16", world_size=8)["world_size"] == 8


def _writer(root: str, worker: int, n_runs: int) -> None:
    for i in range(n_runs):
        run_id = f"w{worker}-r{i:02d}"
        info = _info(run_id=run_id, subject=f"q{worker}")
        metrics = [MetricValue("psnr", worker * 1000 + i + 0.5, direction="higher"), MetricValue("ssim", 0.5)]
        write_run(run_dir_for(root, "shared-suite", run_id), info, metrics)


def test_two_processes_writing_one_root_lose_nothing(tmp_path):
    n_runs = 30
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n_runs)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    df = load_results(tmp_path)
    assert len(df) == 2 * n_runs * 2
    psnr = df[df["metric"] == "psnr"].set_index("run")["value"]
    for w in range(2):
        for i in range(n_runs):
            assert psnr[f"w{w}-r{i:02d}"] == w * 1000 + i + 0.5
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written temp files left behind


def test_samples_are_written_losslessly(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(2, 3, 5, 7), dtype=np.uint8)
    recon = rng.integers(0, 256, size=(2, 3, 5, 7), dtype=np.uint8)
    write_samples(tmp_path, ["id_b", "id_a"], real, recon)
    for i, image_id in enumerate(["id_b", "id_a"]):
        got = np.asarray(Image.open(tmp_path / "samples" / "recon" / f"{image_id}.png"))  # (H, W, 3)
        np.testing.assert_array_equal(got, recon[i].transpose(1, 2, 0))
    assert sample_ids(tmp_path) == ["id_a", "id_b"]
    with pytest.raises(UserError, match="uint8"):
        write_samples(tmp_path, ["x"], real[:1].astype(np.float32), recon[:1])
