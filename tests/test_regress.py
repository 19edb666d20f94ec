"""`gsqbench regress`: exit codes and statuses against a baseline written here with the csv module.

Expected statuses follow from the task's default tolerances, restated here (psnr 0.05 dB absolute, lpips 0.002
absolute, rfid 2 % relative, images/s informational), not from our tolerance table. The gate is strict: regressed,
missing and incomparable rows fail (exit 1) unless allowed; `new` and `not_comparable` are informational.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gsqbench.cli import main
from gsqbench.metrics.base import MetricValue
from gsqbench.regress import parse_tolerance, tolerance_for
from gsqbench.results import write_run

COLUMNS = ["suite", "run", "subject", "seed", "metric", "value", "stderr", "ci_low", "ci_high", "direction", "n",
           "unavailable", "fairness_hash", "card_hash", "device"]
BASE = {"psnr": (24.0, "higher"), "lpips@alex": (0.100, "lower"), "rfid@inception": (10.0, "lower"),
        "encode_images_per_s": (400.0, "higher")}
FAIR, CARD = "f" * 64, "c" * 64


def _write_results(root: Path, values: dict[str, float], *, card_hash: str = CARD, spec: dict | None = None,
                   runs: tuple[str, ...] = ("gsq-s0",)) -> Path:
    for run in runs:
        info = {"run_id": run, "suite": "demo", "subject": run.split("-")[0], "seed": 0, "spec": spec or {},
                "fairness_hash": FAIR, "card_hash": card_hash, "card": {}, "provenance": {"device": "cpu"}}
        write_run(root / "demo" / run, info,
                          [MetricValue(k, v, direction=BASE[k][1]) for k, v in values.items()])
    return root


def _write_baseline(path: Path, runs: tuple[str, ...] = ("gsq-s0",), metrics: dict = BASE) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for run in runs:
            for name, (value, direction) in metrics.items():
                w.writerow({"suite": "demo", "run": run, "subject": run.split("-")[0], "seed": "0", "metric": name,
                            "value": value, "direction": direction, "fairness_hash": FAIR, "card_hash": CARD,
                            "device": "cpu"})
    return path


def _statuses(out_dir: Path) -> dict[tuple[str, str], dict]:
    data = json.loads((out_dir / "regress.json").read_text())
    return {(r["run"], r["metric"]): r for r in data["rows"]}


def _regress(tmp_path: Path, results: Path, baseline: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    code = main(["regress", str(results), "--baseline", str(baseline), "-o", str(out), *extra])
    return code, _statuses(out)


def test_identical_results_exit_0_all_ok(tmp_path, capsys):
    results = _write_results(tmp_path / "res", {k: v for k, (v, _) in BASE.items()})
    code, rows = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv"))
    assert code == 0
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert "ok 4" in capsys.readouterr().out


@pytest.mark.parametrize("metric,value,status,code", [
    ("psnr", 24.0 - 0.06, "regressed", 1),        # 0.06 dB worse > 0.05
    ("psnr", 24.0 - 0.04, "ok", 0),               # within 0.05
    ("psnr", 24.0 + 0.06, "improved", 0),
    ("lpips@alex", 0.100 + 0.0025, "regressed", 1),  # lower is better; 0.0025 > 0.002
    ("lpips@alex", 0.100 - 0.0025, "improved", 0),
    ("rfid@inception", 10.0 * 1.025, "regressed", 1),  # 2.5 % > 2 % relative
    ("rfid@inception", 10.0 * 1.015, "ok", 0),
    ("encode_images_per_s", 100.0, "ok", 0),      # informational: never regresses
])
def test_direction_aware_tolerances(tmp_path, metric, value, status, code):
    values = {k: v for k, (v, _) in BASE.items()} | {metric: value}
    results = _write_results(tmp_path / "res", values)
    got_code, rows = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv"))
    assert (rows[("gsq-s0", metric)]["status"], got_code) == (status, code)


def _fail_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("FAIL ")]


def test_card_hash_change_is_incomparable_fails_with_one_line_and_allow_passes(tmp_path, capsys):
    results = _write_results(tmp_path / "res", {k: v - 5 for k, (v, _) in BASE.items()}, card_hash="d" * 64)
    baseline = _write_baseline(tmp_path / "base.csv")
    capsys.readouterr()
    code, rows = _regress(tmp_path, results, baseline)
    assert code == 1
    assert {r["status"] for r in rows.values()} == {"incomparable"}
    assert "card hash (protocol) differs" in rows[("gsq-s0", "psnr")]["reason"]
    (line,) = _fail_lines(capsys.readouterr().out)  # one reason: one line, naming the run, its metrics and why
    assert line.startswith("FAIL incomparable: demo/gsq-s0 [") and "psnr" in line and "lpips@alex" in line
    assert "card hash (protocol) differs: cccccccccccc (baseline) vs dddddddddddd" in line and "--allow incomparable" in line
    html = (tmp_path / "out" / "regress.html").read_text()
    assert "incomparable" in html and "card hash (protocol) differs" in html
    assert _regress(tmp_path, results, baseline, "--allow", "incomparable")[0] == 0
    assert _regress(tmp_path, results, baseline, "--allow", "missing")[0] == 1  # allowing something else is not enough


def test_missing_rows_fail_with_one_line_new_rows_do_not(tmp_path, capsys):
    results = _write_results(tmp_path / "res", {k: v for k, (v, _) in BASE.items()}, runs=("gsq-s0", "fsq-s0"))
    baseline = _write_baseline(tmp_path / "base.csv", runs=("gsq-s0", "vq-s0"))
    capsys.readouterr()
    code, rows = _regress(tmp_path, results, baseline)
    assert code == 1
    assert rows[("fsq-s0", "psnr")]["status"] == "new" and rows[("vq-s0", "psnr")]["status"] == "missing"
    assert rows[("gsq-s0", "psnr")]["status"] == "ok"
    out = capsys.readouterr().out
    (line,) = _fail_lines(out)
    assert line.startswith("FAIL missing: demo/vq-s0 [") and "not in the results" in line and "--allow missing" in line
    assert all(m in line for m in BASE)
    assert "fsq-s0" not in line and "regress: FAILED" in out
    code, _ = _regress(tmp_path, results, baseline, "--allow", "missing")
    assert code == 0 and "regress: passed (allowed: missing)" in capsys.readouterr().out
    # only new rows (a new variant beside an unchanged baseline): informational, passes
    only_new = _write_baseline(tmp_path / "base2.csv", runs=("gsq-s0",))
    assert _regress(tmp_path, results, only_new)[0] == 0


def test_metric_now_unavailable_is_missing_and_bad_allow_is_a_user_error(tmp_path, capsys):
    results = tmp_path / "res"
    info = {"run_id": "gsq-s0", "suite": "demo", "subject": "gsq", "seed": 0, "fairness_hash": FAIR, "card_hash": CARD,
            "card": {}, "provenance": {"device": "cpu"}}
    metrics = [MetricValue(k, v, direction=d) for k, (v, d) in BASE.items() if k != "psnr"]
    metrics.append(MetricValue.missing("psnr", "weights gone; fix: gsqbench weights download x", "higher"))
    write_run(results / "demo" / "gsq-s0", info, metrics)
    capsys.readouterr()
    code, rows = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv"))
    assert code == 1 and rows[("gsq-s0", "psnr")]["status"] == "missing"
    assert "now unavailable: weights gone" in _fail_lines(capsys.readouterr().out)[0]
    assert main(["regress", str(results), "--baseline", str(tmp_path / "base.csv"), "--allow", "regressed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gsqbench: error: --allow 'regressed'") and err.count("\n") == 1


def _write_diverged_run(root: Path, run: str = "gsq-s0") -> None:
    """A diverged run as training leaves it: run.json status diverged + divergence, metrics.csv with train_* only."""
    d = root / "demo" / run
    d.mkdir(parents=True)
    info = {"run_id": run, "suite": "demo", "subject": run.split("-")[0], "seed": 0, "status": "diverged",
            "divergence": {"step": 120, "term": "loss_rec", "value": "inf"}, "fairness_hash": FAIR,
            "card_hash": CARD, "card": {}, "spec": {}, "grid": {}, "provenance": {"device": "cpu"}}
    (d / "run.json").write_text(json.dumps(info))
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerow({"suite": "demo", "run": run, "subject": info["subject"], "seed": "0", "metric": "train_time_s",
                    "value": "12.5", "direction": "lower", "fairness_hash": FAIR, "card_hash": CARD, "device": "cpu"})


def test_every_baseline_row_of_a_diverged_run_regresses(tmp_path, capsys):
    results = tmp_path / "res"
    _write_diverged_run(results)
    capsys.readouterr()
    code, rows = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv"), "--allow", "missing")
    assert code == 1
    for metric in BASE:
        assert rows[("gsq-s0", metric)]["status"] == "regressed"
        assert rows[("gsq-s0", metric)]["reason"] == "run diverged at step 120 (loss_rec = inf)"
    (line,) = _fail_lines(capsys.readouterr().out)
    assert line.startswith("FAIL regressed: demo/gsq-s0 [") and "diverged at step 120 (loss_rec = inf)" in line
    assert "--update never accepts a diverged run" in line
    # --update keeps the diverged run's baseline rows (a diverged run is never a baseline)
    baseline = _write_baseline(tmp_path / "base2.csv")

    def rows_of(path: Path) -> dict:
        with path.open(newline="") as f:
            return {(r["run"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}

    before = rows_of(baseline)
    assert main(["regress", str(results), "--baseline", str(baseline), "--update", "--allow", "missing"]) == 1
    assert rows_of(baseline) == before and ("gsq-s0", "train_time_s") not in before


def test_not_comparable_values_are_shown_never_gated(tmp_path):
    reason = "≤ 7.8 %: 320 tokens for V = 4,096"
    results = tmp_path / "res"
    info = {"run_id": "gsq-s0", "suite": "demo", "subject": "gsq", "seed": 0, "fairness_hash": FAIR, "card_hash": CARD,
            "card": {}, "provenance": {"device": "cpu"}}
    metrics = [MetricValue(k, v, direction=d) for k, (v, d) in BASE.items()]
    metrics.append(MetricValue("usage_pooled", 0.01, direction="higher", not_comparable=reason))  # far below 0.5
    write_run(results / "demo" / "gsq-s0", info, metrics)
    base = dict(BASE) | {"usage_pooled": (0.5, "higher")}
    code, rows = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv", metrics=base))
    assert code == 0
    assert rows[("gsq-s0", "usage_pooled")]["status"] == "not_comparable"
    assert rows[("gsq-s0", "usage_pooled")]["reason"] == reason


def test_noise_aware_needs_the_change_to_exceed_tolerance_and_the_combined_interval(tmp_path):
    # psnr 0.1 dB worse (> 0.05 tolerance); standard errors 0.2 on both sides: the 95 % band of the difference is
    # 1.96·sqrt(0.2² + 0.2²) = 0.554 dB, restated here. 1 dB worse exceeds both; lpips has no stderr: tolerance only.
    def results_with(psnr: float, root: Path) -> Path:
        info = {"run_id": "gsq-s0", "suite": "demo", "subject": "gsq", "seed": 0, "fairness_hash": FAIR,
                "card_hash": CARD, "card": {}, "provenance": {"device": "cpu"}}
        metrics = [MetricValue("psnr", psnr, stderr=0.2, direction="higher"),
                   MetricValue("lpips@alex", 0.103, direction="lower")]
        write_run(root / "demo" / "gsq-s0", info, metrics)
        return root

    baseline = tmp_path / "base.csv"
    with baseline.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerow({"suite": "demo", "run": "gsq-s0", "subject": "gsq", "seed": "0", "metric": "psnr", "value": 24.0,
                    "stderr": 0.2, "direction": "higher", "fairness_hash": FAIR, "card_hash": CARD, "device": "cpu"})
        w.writerow({"suite": "demo", "run": "gsq-s0", "subject": "gsq", "seed": "0", "metric": "lpips@alex",
                    "value": 0.1, "direction": "lower", "fairness_hash": FAIR, "card_hash": CARD, "device": "cpu"})
    small = results_with(23.9, tmp_path / "small")
    code, rows = _regress(tmp_path, small, baseline, "--tolerance", "lpips=0.01")
    assert code == 1 and rows[("gsq-s0", "psnr")]["status"] == "regressed"
    code, rows = _regress(tmp_path, small, baseline, "--noise-aware", "--tolerance", "lpips=0.01")
    assert code == 0 and rows[("gsq-s0", "psnr")]["status"] == "ok"
    assert "within noise" in rows[("gsq-s0", "psnr")]["reason"]
    code, rows = _regress(tmp_path, small, baseline, "--noise-aware")  # lpips 0.003 worse, no interval
    assert code == 1 and rows[("gsq-s0", "lpips@alex")]["status"] == "regressed"
    assert "no interval: tolerance only" in rows[("gsq-s0", "lpips@alex")]["reason"]
    big = results_with(23.0, tmp_path / "big")
    code, rows = _regress(tmp_path, big, baseline, "--noise-aware", "--tolerance", "lpips=0.01")
    assert code == 1 and rows[("gsq-s0", "psnr")]["status"] == "regressed"


def test_update_accepts_the_current_rows(tmp_path):
    results = _write_results(tmp_path / "res", {k: v + 1 for k, (v, _) in BASE.items()}, runs=("gsq-s0", "fsq-s0"))
    baseline = _write_baseline(tmp_path / "base.csv", runs=("gsq-s0", "vq-s0"))
    assert main(["regress", str(results), "--baseline", str(baseline), "--update"]) == 0
    with baseline.open(newline="") as f:
        rows = {(r["run"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(rows[("gsq-s0", "lpips@alex")]["value"]) == 1.1  # worsened value accepted
    assert ("fsq-s0", "psnr") in rows and ("vq-s0", "psnr") in rows  # new added, other baseline rows kept
    code, statuses = _regress(tmp_path, results, baseline, "--allow", "missing")  # vq-s0 stays in the baseline
    assert code == 0 and statuses[("gsq-s0", "lpips@alex")]["status"] == "ok"
    fresh = tmp_path / "new" / "baseline.csv"  # --update creates an absent baseline
    assert main(["regress", str(results), "--baseline", str(fresh), "--update"]) == 0 and fresh.is_file()


def test_update_drops_metrics_a_present_run_no_longer_produces(tmp_path):
    """A metric the code no longer reports (e.g. code_agreement for exact-lookup runs) leaves the baseline on
    --update for the runs that were rerun; otherwise every later check would fail with it `missing`."""
    base = dict(BASE) | {"code_agreement": (1.0, "higher")}
    baseline = _write_baseline(tmp_path / "base.csv", runs=("gsq-s0", "vq-s0"), metrics=base)
    results = _write_results(tmp_path / "res", {k: v for k, (v, _) in BASE.items()}, runs=("gsq-s0",))
    assert main(["regress", str(results), "--baseline", str(baseline), "--update"]) == 0
    with baseline.open(newline="") as f:
        rows = {(r["run"], r["metric"]) for r in csv.DictReader(f)}
    assert ("gsq-s0", "code_agreement") not in rows and ("gsq-s0", "psnr") in rows
    assert ("vq-s0", "code_agreement") in rows  # a run not in these results keeps all its rows
    code, statuses = _regress(tmp_path, results, baseline, "--allow", "missing")
    assert code == 0 and ("gsq-s0", "code_agreement") not in statuses


def test_tolerance_overrides_cli_beats_suite_beats_default(tmp_path):
    values = {k: v for k, (v, _) in BASE.items()} | {"psnr": 23.8}  # 0.2 dB worse
    spec = {"regress": {"tolerances": {"psnr": 0.3}}}
    results = _write_results(tmp_path / "res", values, spec=spec)
    baseline = _write_baseline(tmp_path / "base.csv")
    code, rows = _regress(tmp_path, results, baseline)
    assert code == 0 and rows[("gsq-s0", "psnr")]["tolerance"] == "0.3"
    code, rows = _regress(tmp_path, results, baseline, "--tolerance", "psnr=0.1")
    assert code == 1 and rows[("gsq-s0", "psnr")]["status"] == "regressed"
    code, rows = _regress(tmp_path, results, baseline, "--tolerance", "psnr=1%")  # 1 % of 24 = 0.24 dB
    assert code == 0


def test_flat_suite_regress_block_is_read(tmp_path):
    values = {k: v for k, (v, _) in BASE.items()} | {"psnr": 23.8}
    results = _write_results(tmp_path / "res", values, spec={"regress": {"psnr": 0.3}})  # config.Suite.regress form
    code, rows = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv"))
    assert code == 0 and rows[("gsq-s0", "psnr")]["tolerance"] == "0.3"
    bad = _write_results(tmp_path / "bad", values, spec={"regress": {"psnr": "lots"}})
    assert main(["regress", str(bad), "--baseline", str(tmp_path / "base.csv")]) == 2


def test_tolerance_lookup_and_parsing():
    assert parse_tolerance("2%", "x").relative and parse_tolerance("2%", "x").value == pytest.approx(0.02)
    assert tolerance_for("lpips@vgg", {"lpips": parse_tolerance(0.01, "x")}).value == 0.01
    assert tolerance_for("usage_group_min").value == 0.01  # family default 'usage'


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    results = _write_results(tmp_path / "res", {"psnr": 24.0})
    assert main(["regress", str(results), "--baseline", str(tmp_path / "absent.csv")]) == 2
    assert "--update" in capsys.readouterr().err
    baseline = _write_baseline(tmp_path / "base.csv")
    assert main(["regress", str(results), "--baseline", str(baseline), "--tolerance", "psnr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gsqbench: error: --tolerance psnr") and err.count("\n") == 1
    (tmp_path / "broken.csv").write_text("metric,value\npsnr,1\n")
    assert main(["regress", str(results), "--baseline", str(tmp_path / "broken.csv")]) == 2
    assert "run or subject" in capsys.readouterr().err


def test_other_suites_in_the_baseline_are_not_missing(tmp_path):
    results = _write_results(tmp_path / "res", {k: v for k, (v, _) in BASE.items()})
    baseline = _write_baseline(tmp_path / "base.csv")
    with baseline.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=COLUMNS).writerow({"suite": "other", "run": "x", "subject": "x",
                                                         "metric": "psnr", "value": 1.0, "direction": "higher"})
    code, rows = _regress(tmp_path, results, baseline)
    assert code == 0 and ("x", "psnr") not in rows and len(rows) == len(BASE)


def test_report_index_links_the_regression_page(tmp_path):
    from gsqbench.report import render_report

    results = _write_results(tmp_path / "res", {k: v for k, (v, _) in BASE.items()} | {"psnr": 20.0})
    code, _ = _regress(tmp_path, results, _write_baseline(tmp_path / "base.csv"))
    assert code == 1
    index = render_report([results], tmp_path / "out", with_plots=False).read_text()
    assert 'href="regress.html"' in index and "regressed 1" in index
