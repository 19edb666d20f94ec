"""gsqbench.stats and `gsqbench compare`: intervals against oracles computed here without the implementation (numpy's
own index bootstrap on another seed, the closed-form bootstrap standard error, scipy's Welch test), verdicts on
constructed results whose true differences are known, and the command's gate and one-line errors.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from constructed_results import write_run  # noqa: E402

from gsqbench.cli import main  # noqa: E402
from gsqbench.report.data import group_runs, runs_from_frame  # noqa: E402
from gsqbench.results import load_results  # noqa: E402
from gsqbench.stats import GroupStats, bootstrap_means, percentile_interval, verdict  # noqa: E402


def _stats(root: Path) -> GroupStats:
    (groups,) = group_runs(runs_from_frame(load_results(root))).values()
    (group,) = groups
    return GroupStats(group.runs)


def _unit(stats: GroupStats, subject: str):
    (u,) = stats.unit(subject)
    return u


def test_paired_bootstrap_matches_an_independent_bootstrap_and_covers_the_true_difference():
    rng = np.random.default_rng(123)
    n, delta = 500, 0.3
    difficulty = rng.normal(25.0, 4.0, n)  # shared by both subjects: cancels in the paired difference
    a = difficulty + delta + rng.normal(0.0, 0.5, n)
    b = difficulty + rng.normal(0.0, 0.5, n)
    reps = bootstrap_means(np.stack([a, b], axis=1))
    lo, hi = percentile_interval(reps[:, 0] - reps[:, 1])
    # oracle: a plain index bootstrap of the per-image differences, own generator and seed
    d = a - b
    idx = np.random.default_rng(999).integers(0, n, size=(4000, n))
    o_lo, o_hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    se = d.std() / math.sqrt(n)  # closed form: the bootstrap standard error of a mean is the plug-in sd / √n
    assert abs(lo - o_lo) < 0.2 * se and abs(hi - o_hi) < 0.2 * se
    assert (hi - lo) == pytest.approx(2 * 1.959964 * se, rel=0.1)
    assert lo < delta < hi
    assert np.std(reps[:, 0]) > 5 * np.std(reps[:, 0] - reps[:, 1])  # unpaired spread: the pairing matters


def test_bootstrap_memory_is_chunked_without_changing_the_interval():
    x = np.random.default_rng(5).normal(size=(300, 2))
    one_row_at_a_time = bootstrap_means(x, max_chunk_elements=300)  # 300 counts held at once: one replicate
    all_at_once = bootstrap_means(x, max_chunk_elements=1 << 30)
    assert one_row_at_a_time.shape == all_at_once.shape == (2000, 2)
    se = x.std(axis=0) / math.sqrt(300)
    assert np.allclose(one_row_at_a_time.std(axis=0), se, rtol=0.1)
    assert np.allclose(all_at_once.std(axis=0), se, rtol=0.1)


def test_seed_spread_interval_is_welchs_t(tmp_path):
    """Per-image values = seed effect + one pattern shared by every run: the paired image part of the difference is
    zero, so the interval must be Welch's t over the per-seed means (oracle: scipy.stats.ttest_ind)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    pattern = rng.normal(0.0, 2.0, 30)
    effects = {"a": 0.5 + rng.normal(0.0, 0.3, 4), "b": rng.normal(0.0, 0.1, 3)}
    usage = {"a": 0.6 + rng.normal(0.0, 0.02, 4), "b": 0.5 + rng.normal(0.0, 0.05, 3)}
    for subject in effects:
        for seed, (e, u) in enumerate(zip(effects[subject], usage[subject])):
            write_run(tmp_path, subject, seed, per_image={"psnr": 24.0 + e + pattern}, set_level={"usage_pooled": u})
    stats = _stats(tmp_path)
    a, b = _unit(stats, "a"), _unit(stats, "b")
    for metric, va, vb in (("psnr", 24.0 + effects["a"] + pattern.mean(), 24.0 + effects["b"] + pattern.mean()),
                           ("usage_pooled", usage["a"], usage["b"])):
        oracle = scipy_stats.ttest_ind(va, vb, equal_var=False)
        ci = oracle.confidence_interval(0.95)
        d = stats.difference(a, b, metric)
        assert d.value == pytest.approx(va.mean() - vb.mean(), abs=1e-9)
        assert (d.ci_low, d.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-6, abs=1e-9), metric
        assert d.p_value == pytest.approx(oracle.pvalue, rel=1e-6), metric
    # one unit's interval with several seeds: mean ± t_{S−1}·s/√S for a set-level metric
    e = stats.cell(a, "usage_pooled").estimate
    half = scipy_stats.t.ppf(0.975, 3) * usage["a"].std(ddof=1) / 2
    assert (e.ci_low, e.ci_high) == pytest.approx((usage["a"].mean() - half, usage["a"].mean() + half), rel=1e-9)
    assert (e.n_seeds, e.seed_std) == (4, pytest.approx(usage["a"].std(ddof=1)))


def test_identical_subjects_show_no_detectable_difference(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for seed in range(3):
        psnr = rng.normal(24.0, 2.0, 25)
        usage = 0.5 + 0.01 * seed
        for subject in ("gsq", "twin"):
            write_run(tmp_path, subject, seed, per_image={"psnr": psnr}, set_level={"usage_pooled": usage})
    assert main(["compare", str(tmp_path), "--reference", "gsq"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("twin")]
    assert len(rows) == 2 and all(ln.endswith("no detectable difference") for ln in rows), out
    one_seed = tmp_path / "one"
    psnr = rng.normal(24.0, 2.0, 25)
    for subject in ("gsq", "twin"):
        write_run(one_seed, subject, 0, per_image={"psnr": psnr})
    stats = _stats(one_seed)
    d = stats.difference(_unit(stats, "twin"), _unit(stats, "gsq"), "psnr")
    assert (d.value, d.ci_low, d.ci_high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert verdict(d, "higher") == "no detectable difference"


def _three_seed_suite(root: Path) -> dict[str, float]:
    """gsq (reference) and three variants over 3 seeds and 40 shared images; true PSNR differences returned."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(25.0, 3.0, 40)
    truth = {"gsq": 0.0, "better": 0.8, "same": 0.0, "worse": -0.6}
    usage = {"gsq": 0.5, "better": 0.7, "same": 0.5, "worse": 0.4}
    for seed in range(3):
        for subject, delta in truth.items():
            psnr = difficulty + delta + rng.normal(0.0, 0.1) + rng.normal(0.0, 0.3, 40)
            write_run(root, subject, seed, per_image={"psnr": psnr},
                      set_level={"usage_pooled": usage[subject] + rng.normal(0.0, 0.02), "tokens_counted": 320.0,
                                 "encode_images_per_s": 100.0 + rng.normal(0.0, 10.0)})
    return truth


def test_compare_on_a_three_seed_suite_prints_verdicts_covers_the_truth_and_gates(tmp_path, capsys):
    truth = _three_seed_suite(tmp_path / "res")
    out_dir = tmp_path / "report"
    assert main(["compare", str(tmp_path / "res"), "--reference", "gsq", "-o", str(out_dir)]) == 0
    out = capsys.readouterr().out
    print(out)  # the table (shown with pytest -s)
    lines = {tuple(ln.split()[:2]): ln for ln in out.splitlines() if ln.split()[:1] in (["better"], ["same"], ["worse"])}
    assert lines[("better", "psnr")].endswith(" better") and lines[("worse", "psnr")].endswith(" worse")
    assert lines[("same", "psnr")].endswith("no detectable difference")
    assert lines[("better", "usage_pooled")].endswith(" better")
    assert not any("encode_images_per_s" in ln for ln in out.splitlines())  # cost figures are never compared
    with (out_dir / "compare.csv").open(newline="") as f:
        rows = {(r["subject"], r["metric"]): r for r in csv.DictReader(f)}
    for subject in ("better", "same", "worse"):
        r = rows[(subject, "psnr")]
        assert float(r["ci_low"]) <= truth[subject] <= float(r["ci_high"]), r
        assert r["seeds"] == "3" and r["reference_seeds"] == "3"
    html = (out_dir / "compare.html").read_text()
    assert "95 % interval" in html and "no detectable difference" in html
    # the gate: worse by 0.6 dB fails at margin 0, passes at a 1 dB margin; it never fails on a better subject
    assert main(["compare", str(tmp_path / "res"), "--reference", "gsq", "--fail-if-worse", "psnr"]) == 1
    fails = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL worse psnr: worse than gsq by")
    assert main(["compare", str(tmp_path / "res"), "--reference", "gsq", "--fail-if-worse", "psnr=1"]) == 0
    assert main(["compare", str(tmp_path / "res"), "--reference", "worse", "--fail-if-worse", "psnr"]) == 0


def test_results_api_aggregates_seeds(tmp_path):
    from gsqbench.stats import aggregate

    _three_seed_suite(tmp_path)
    df = aggregate(tmp_path)
    row = df[(df["subject"] == "better") & (df["metric"] == "usage_pooled")].iloc[0]
    values = []
    for seed in range(3):
        with (tmp_path / "demo" / f"better-s{seed}" / "metrics.csv").open(newline="") as f:
            values += [float(r["value"]) for r in csv.DictReader(f) if r["metric"] == "usage_pooled"]
    assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(np.mean(values))
    assert row["seed_std"] == pytest.approx(np.std(values, ddof=1)) and row["mark"] == "best"
    assert row["ci_low"] < row["mean"] < row["ci_high"]


def test_compare_bad_input_is_one_line_exit_2(tmp_path, capsys):
    _three_seed_suite(tmp_path / "res")
    write_run(tmp_path / "one", "gsq", 0, per_image={"psnr": [24.0, 25.0, 23.0]}, set_level={"usage_pooled": 0.5})
    write_run(tmp_path / "one", "x", 0, per_image={"psnr": [24.5, 25.0, 23.0]}, set_level={"usage_pooled": 0.6})
    write_run(tmp_path / "other", "gsq-half", 0, per_image={"psnr": [1.0, 2.0]}, fairness="9" * 64)
    res = str(tmp_path / "res")
    cases = [
        ([res, "--reference", "gqs"], "--reference 'gqs': no such subject in these results; did you mean 'gsq'?"),
        ([res, "--reference", "gsq", "--metric", "psrn"], "metric 'psrn': not a comparable metric"),
        ([res, "--reference", "gsq", "--metric", "encode_images_per_s"], "is a cost figure"),
        ([res, str(tmp_path / "other"), "--reference", "gsq"], "results mix 2 comparison groups"),
        ([str(tmp_path / "one"), "--reference", "gsq", "--fail-if-worse", "usage_pooled"],
         "--fail-if-worse usage_pooled: cannot decide for x: no interval"),
        ([res, "--reference", "gsq", "--fail-if-worse", "psnr=lots"], "--fail-if-worse psnr"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["compare", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gsqbench: error: ") and message in err and err.count("\n") == 1, (argv, err)


def test_differing_image_ids_are_never_paired(tmp_path, capsys):
    write_run(tmp_path, "gsq", 0, per_image={"psnr": [24.0, 25.0, 23.0]})
    write_run(tmp_path, "odd", 0, per_image={"psnr": [26.0, 27.0, 25.0]}, ids=["a", "b", "c"])
    stats = _stats(tmp_path)
    d = stats.difference(_unit(stats, "odd"), _unit(stats, "gsq"), "psnr")
    assert not d.has_interval and "other image ids" in d.note
    assert main(["compare", str(tmp_path), "--reference", "gsq"]) == 0
    out = capsys.readouterr().out
    assert "no interval (odd was evaluated on other image ids" in out and "note: runs evaluated on different" in out


def test_a_diverged_variant_is_shown_as_such_and_fails_the_gate(tmp_path, capsys):
    for seed in range(2):
        write_run(tmp_path, "gsq", seed, per_image={"psnr": [24.0 + seed, 25.0, 23.0]})
        write_run(tmp_path, "boom", seed, divergence={"step": 40, "term": "loss_commit"})
    assert main(["compare", str(tmp_path), "--reference", "gsq", "--fail-if-worse", "psnr"]) == 1
    out = capsys.readouterr().out
    assert "diverged (2 of 2 seeds diverged: seed 0 diverged at step 40 (loss_commit)" in out
    assert any(ln.startswith("FAIL boom psnr: 2 of 2 seeds diverged") for ln in out.splitlines()), out
    write_run(tmp_path, "flaky", 0, per_image={"psnr": [24.5, 25.0, 23.0]})  # better on the seed that finished
    write_run(tmp_path, "flaky", 1, divergence={"step": 7, "term": "loss_rec"})
    assert main(["compare", str(tmp_path), "--reference", "gsq", "--fail-if-worse", "psnr"]) == 1
    out = capsys.readouterr().out
    assert "FAIL flaky psnr: 1 of 2 seeds diverged: seed 1 diverged at step 7 (loss_rec)" in out
    assert "note: flaky: 1 of 2 seeds diverged" in out


def test_crops_of_one_photo_are_resampled_together(tmp_path):
    """16 crops of 6 photos are 6 samples, not 96: the per-run standard error is the standard error of the 6 photo
    means (closed form), and a paired difference that varies by photo gets the interval of a bootstrap over photos
    (oracle: a plain photo-index bootstrap written here). The naive per-crop interval would be ~4x narrower."""
    from gsqbench.metrics.base import mean_with_interval

    rng = np.random.default_rng(11)
    photos, crops = 6, 16
    ids = [f"p{k}" if j == 0 else f"p{k}#crop{j}" for j in range(crops) for k in range(photos)]
    photo = np.repeat(rng.normal(0.0, 3.0, photos)[None, :], crops, axis=0).ravel()  # crop-major like MultiCrop
    delta = np.repeat(rng.normal(0.3, 1.0, photos)[None, :], crops, axis=0).ravel()
    b = 24.0 + photo + rng.normal(0.0, 0.1, photos * crops)
    a = b + delta
    photo_means = a.reshape(crops, photos).mean(axis=0)
    mv = mean_with_interval(a, "psnr", "higher", ids=ids)
    assert mv.value == pytest.approx(a.mean(), rel=1e-12) and mv.n == photos * crops
    assert mv.stderr == pytest.approx(photo_means.std(ddof=1) / math.sqrt(photos), rel=1e-9)
    naive = mean_with_interval(a, "psnr", "higher")
    assert mv.stderr > 3 * naive.stderr and mv.ci_high - mv.ci_low > 3 * (naive.ci_high - naive.ci_low)
    for subject, values in (("a", a), ("b", b)):
        write_run(tmp_path, subject, 0, per_image={"psnr": values}, ids=ids)
    stats = _stats(tmp_path)
    d = stats.difference(_unit(stats, "a"), _unit(stats, "b"), "psnr")
    d_photo = (a - b).reshape(crops, photos).mean(axis=0)
    idx = np.random.default_rng(999).integers(0, photos, size=(4000, photos))
    o_lo, o_hi = np.percentile(d_photo[idx].mean(axis=1), [2.5, 97.5])
    assert d.value == pytest.approx(delta.mean(), abs=1e-9)
    assert (d.ci_high - d.ci_low) == pytest.approx(o_hi - o_lo, rel=0.15)
    assert "6 photos (96 crops" in stats.cell(_unit(stats, "a"), "psnr").estimate.method


def test_codebook_size_bound_figures_are_not_compared_across_codebook_sizes(tmp_path, capsys):
    """Perplexity ≤ V, entropy ≤ log2 V, dead codes ≤ V: between a V = 2 × 64 and a V = 4,096 subject they are
    'not comparable' in compare, never marked, and a gate on them refuses to decide; usage (a fraction) and equal-V
    subjects are still compared."""
    import json

    rng = np.random.default_rng(4)
    shapes = {"gsq": (64, 2), "fsq": (4096, 1), "twin": (4096, 1)}
    for seed in range(3):
        for subject, (v, g) in shapes.items():
            run = write_run(tmp_path, subject, seed, per_image={"psnr": rng.normal(24.0, 1.0, 20)},
                            set_level={"ppl_pooled": {"gsq": 15.0, "fsq": 130.0, "twin": 60.0}[subject] + seed,
                                       "usage_pooled": 0.3 + 0.01 * seed + (0.4 if subject == "gsq" else 0)})
            info = json.loads((run / "run.json").read_text())
            info["card"] = {"codebook": {"codebook_V": v, "codebook_G": g}}
            (run / "run.json").write_text(json.dumps(info))
    stats = _stats(tmp_path)
    marks, note = stats.marks("ppl_pooled")
    assert marks == {} and "codebook sizes differ (2 × 64, 4,096 codes)" in note
    assert stats.marks("usage_pooled")[0]  # a fraction: ranked across V
    assert main(["compare", str(tmp_path), "--reference", "gsq"]) == 0
    out = capsys.readouterr().out
    fsq_ppl = next(ln for ln in out.splitlines() if ln.startswith("fsq") and " ppl_pooled " in ln)
    assert "not comparable (codebook sizes differ" in fsq_ppl
    assert main(["compare", str(tmp_path), "--reference", "fsq"]) == 0  # same V: compared
    twin_ppl = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("twin") and " ppl_pooled " in ln)
    assert "worse" in twin_ppl
    assert main(["compare", str(tmp_path), "--reference", "gsq", "--fail-if-worse", "ppl_pooled"]) == 2
    assert "cannot decide for fsq: not comparable" in capsys.readouterr().err
