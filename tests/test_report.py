"""HTML reports rendered from the committed fixture results (2 suites, 4 subjects): no torch, self-contained,
escaped, split by fairness hash, best values marked by direction, paper rows never ranked.

Expected best values are picked here from the fixture's metrics.csv with the csv module and the metric direction.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "results"))
import build_fixtures  # noqa: E402

from gsqbench.report import render_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class Tables(HTMLParser):
    """Collects every <table> as {"cls", "rows": [[{"text", "cls", "title"}]]} and every src/href attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.links: list[str] = []
        self._stack: list[dict] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[key] for key in ("src", "href") if a.get(key)]
        if tag == "table":
            self._stack.append({"cls": a.get("class", ""), "rows": []})
        elif tag == "tr" and self._stack:
            self._stack[-1]["rows"].append([])
        elif tag in ("td", "th") and self._stack:
            self._cell = {"text": "", "cls": a.get("class") or "", "title": a.get("title") or ""}
            self._stack[-1]["rows"][-1].append(self._cell)

    def handle_endtag(self, tag):
        if tag == "table" and self._stack:
            self.tables.append(self._stack.pop())
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def parse(path: Path) -> Tables:
    p = Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def summary_tables(path: Path) -> list[dict]:
    return [t for t in parse(path).tables if "summary" in t["cls"]]


def _rows_by_subject(table: dict) -> tuple[list[str], dict[str, list[dict]]]:
    header = [c["text"].strip() for c in table["rows"][0]]
    return header, {r[0]["text"].strip(): r for r in table["rows"][1:]}


@pytest.fixture(scope="module")
def fixture_results(tmp_path_factory) -> Path:
    return build_fixtures.materialize(tmp_path_factory.mktemp("fx") / "results")


@pytest.fixture(scope="module")
def report(fixture_results, tmp_path_factory) -> Path:
    """The full report (with plots), rendered through the CLI in a fresh interpreter that must not import torch."""
    out = tmp_path_factory.mktemp("rep") / "report"
    code = ("import sys; from gsqbench.cli import main; "
            f"rc = main(['report', {str(fixture_results)!r}, '-o', {str(out)!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return out


def test_report_renders_self_contained_without_torch(report):
    assert {"index.html", "style.css", "suite-demo.html", "suite-scaling.html"} <= set(os.listdir(report))
    for page in report.glob("*.html"):
        for link in parse(page).links:
            assert not link.startswith(("http:", "https:", "//", "/", "file:")), (page.name, link)
            target = link.split("#")[0]
            if target:
                assert (report / target).is_file(), (page.name, link)
        assert "<script" not in page.read_text()  # no JS needed
    index = parse(report / "index.html")
    assert "suite-demo.html" in index.links and "suite-scaling.html" in index.links
    # figures: training curves, rate–distortion, code usage; the dim × vocabulary grid gets a scaling plot
    demo_pngs = {p.name for p in (report / "assets" / "demo" / "g0").glob("*.png")}
    assert {"train_curves.png", "rate_distortion.png", "code_usage.png"} <= demo_pngs
    assert (report / "assets" / "scaling" / "g0" / "scaling_dim_vocab.png").is_file()


def test_summary_marks_best_by_direction_and_explains_na(report, fixture_results):
    rows = [r for f in sorted((fixture_results / "demo").rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    (table,) = summary_tables(report / "suite-demo.html")
    header, by_subject = _rows_by_subject(table)
    assert sorted(by_subject) == ["fsq", "gsq", "lfq", "vq"]
    for metric, column in (("psnr", "PSNR (dB)"), ("lpips@alex", "LPIPS (alex)"), ("ssim", "SSIM")):
        vals = {r["subject"]: float(r["value"]) for r in rows if r["metric"] == metric}
        direction = next(r["direction"] for r in rows if r["metric"] == metric)
        best = (min if direction == "lower" else max)(vals, key=vals.get)
        col = header.index(column)
        marked = [s for s, cells in by_subject.items() if "best" in cells[col]["cls"]]
        assert marked == [best], (metric, marked, best)
    rfid = header.index("rFID")
    reason = next(r["unavailable"] for r in rows if r["metric"] == "rfid@inception")
    for cells in by_subject.values():
        assert cells[rfid]["text"].startswith("n/a") and cells[rfid]["title"] == reason
        assert "best" not in cells[rfid]["cls"]
    html = (report / "suite-demo.html").read_text()
    assert "gsqbench weights download inception-fid" in html  # the footnote carries the fix command


def test_paper_reference_rows_are_labelled_and_never_ranked(report):
    html = (report / "suite-demo.html").read_text()
    paper_part = html[html.index('id="paper"'):]
    assert "paper, ImageNet 256²" in paper_part and "34.61" in paper_part  # §7.7 16×4 PSNR
    assert "99.98%" in paper_part and "0.50" in paper_part  # §7.7 16×4 usage, 8×2 rFID: no precision lost
    assert "best" not in paper_part and "★" not in paper_part
    paper_tables = [t for t in parse(report / "suite-demo.html").tables if "paper-table" in t["cls"]]
    assert paper_tables and all("best" not in c["cls"] for t in paper_tables for r in t["rows"] for c in r)


def _set_fairness(run_dir: Path, value: str) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    info["fairness_hash"] = value
    (run_dir / "run.json").write_text(json.dumps(info))
    lines = list(csv.DictReader((run_dir / "metrics.csv").open()))
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows([{**r, "fairness_hash": value} for r in lines])


def test_mixed_fairness_hashes_render_as_separate_tables(fixture_results, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(fixture_results / "demo", results / "demo")
    for run in ("vq-s0", "lfq-s0"):
        _set_fairness(results / "demo" / run, "9" * 64)
    render_report([results], tmp_path / "out", with_plots=False)
    page = tmp_path / "out" / "suite-demo.html"
    tables = summary_tables(page)
    assert len(tables) == 2
    subjects = sorted(sorted(_rows_by_subject(t)[1]) for t in tables)
    assert subjects == [["fsq", "gsq"], ["lfq", "vq"]]
    text = page.read_text()
    fh = build_fixtures.DEMO_FAIRNESS
    assert f"fairness hashes differ: 99999999… vs {fh[:8]}…; rows are not comparable" in text \
        or f"fairness hashes differ: {fh[:8]}… vs 99999999…; rows are not comparable" in text
    assert "rows are not comparable" in (tmp_path / "out" / "index.html").read_text()


def test_hostile_names_are_escaped_and_stay_inside_the_output(fixture_results, tmp_path):
    import shutil

    evil_subject = "<script>alert(1)</script>"
    evil_id = '"><img src=x onerror=alert(2)>'
    results = tmp_path / "results"
    src = fixture_results / "demo" / "gsq-s0"
    run = results / "evil" / "x"  # the directory names are harmless; the names inside the files are not
    shutil.copytree(src, run)
    info = json.loads((run / "run.json").read_text())
    info.update(subject=evil_subject, run_id="../../../escaped", suite="../../outside<b>")
    (run / "run.json").write_text(json.dumps(info))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "subject": evil_subject, "run": "../../../escaped", "suite": "../../outside<b>"} for r in rows])
    for kind in ("real", "recon"):
        shutil.copy(run / "samples" / kind / "val_00000.png", run / "samples" / kind / f"{evil_id}.png")
    with (run / "per_image.csv").open("a") as f:
        f.write(f'"{evil_id.replace(chr(34), chr(34) * 2)}",1.0,0.1,0.99\n')
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "deep" / "out"
    render_report([results], out, with_plots=False, k_samples=4, worst_k=10)
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if out.resolve() not in p.resolve().parents and p.resolve() != out.resolve()
               and p.resolve() not in out.resolve().parents]
    assert not outside, outside
    pages = list(out.glob("*.html"))
    assert len(pages) == 2
    for page in pages:
        html = page.read_text()
        assert evil_subject not in html and "<img src=x" not in html and "<b>" not in html
    suite_html = next(p for p in pages if p.name != "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in suite_html
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in suite_html  # the image id, escaped


def test_card_hash_split_names_the_differing_card_fields(fixture_results, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(fixture_results / "demo", results / "demo")
    run = results / "demo" / "vq-s0"
    info = json.loads((run / "run.json").read_text())
    info["card"]["ssim"]["sigma"] = 2.0
    info["card_hash"] = "e" * 64
    (run / "run.json").write_text(json.dumps(info))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "card_hash": "e" * 64} for r in rows])
    render_report(results, tmp_path / "out", with_plots=False)
    page = tmp_path / "out" / "suite-demo.html"
    assert len(summary_tables(page)) == 2
    assert "protocol card hashes differ" in page.read_text() and "card fields that differ: ssim.sigma" in page.read_text()


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from gsqbench.cli import main

    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gsqbench: error: results path") and "nope" in err and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- statistics
sys.path.insert(0, str(Path(__file__).parent))
from constructed_results import write_run  # noqa: E402


def _cells(page: Path) -> tuple[list[str], dict[str, list[dict]]]:
    """Summary header and rows keyed by subject (the first word of the row label: a divergence note follows it)."""
    (table,) = summary_tables(page)
    header, rows = _rows_by_subject(table)
    return header, {label.split()[0]: cells for label, cells in rows.items()}


def _mark(cell: dict) -> str:
    return "★" if "★" in cell["text"] else "☆" if "☆" in cell["text"] else ""


def test_marks_stars_only_significant_winners_and_ties_leaders_within_noise(tmp_path):
    """Constructed: 60 images shared by every subject. PSNR: `close` is 0.02 dB below `lead`, each with its own
    per-image noise sd 1 (paired |z| < 2: within noise), `far` 3 dB lower. LPIPS: `lead` lower by 0.03 with noise sd 0.002. The z values
    of those constructions are checked here with numpy before the page is read."""
    rng = np.random.default_rng(11)
    difficulty = rng.normal(25.0, 3.0, 60)
    psnr = {"lead": difficulty + rng.normal(0, 1, 60), "close": difficulty - 0.02 + rng.normal(0, 1, 60),
            "far": difficulty - 3 + rng.normal(0, 1, 60)}
    base_lp = rng.uniform(0.1, 0.2, 60)
    lpips = {"lead": base_lp - 0.03 + rng.normal(0, 0.002, 60), "close": base_lp + rng.normal(0, 0.002, 60),
             "far": base_lp + 0.02 + rng.normal(0, 0.002, 60)}
    z = {k: (psnr["lead"] - psnr[k]).mean() / ((psnr["lead"] - psnr[k]).std(ddof=1) / np.sqrt(60)) for k in ("close", "far")}
    assert abs(z["close"]) < 2 and z["far"] > 10
    speed = {"lead": 900.0, "close": 400.0, "far": 100.0}
    for g, subject in enumerate(("lead", "close", "far")):
        write_run(tmp_path / "res", subject, 0, grid={"quantizer.groups": 2 ** g},
                  per_image={"psnr": psnr[subject], "lpips@alex": lpips[subject]},
                  set_level={"usage_pooled": 0.5 + 0.1 * g, "encode_images_per_s": speed[subject], "tokens_counted": 320.0})
    write_run(tmp_path / "res", "boom", 0, grid={"quantizer.groups": 8},
              divergence={"step": 120, "term": "loss_rec", "value": "inf"})
    render_report([tmp_path / "res"], tmp_path / "out", with_plots=False)
    page = tmp_path / "out" / "suite-demo.html"
    header, rows = _cells(page)
    assert header[:3] == ["subject", "groups", "seeds"] and "tokens counted" in header
    assert [c["text"].strip() for c in rows["lead"][1:3]] == ["1", "1"]
    psnr_col, lpips_col = header.index("PSNR (dB)"), header.index("LPIPS (alex)")
    assert {s: _mark(r[psnr_col]) for s, r in rows.items() if s != "boom"} == {"lead": "☆", "close": "☆", "far": ""}
    assert {s: _mark(r[lpips_col]) for s, r in rows.items() if s != "boom"} == {"lead": "★", "close": "", "far": ""}
    speed_col, usage_col = header.index("images/s (encode)"), header.index("usage")
    assert not any(_mark(r[speed_col]) or _mark(r[usage_col]) for r in rows.values())  # cost; set-level 1 seed
    assert "± 0." in rows["lead"][psnr_col]["text"] and "±" not in rows["lead"][usage_col]["text"]
    boom = rows["boom"]
    assert "diverged at step 120 (loss_rec)" in boom[0]["text"] and not any(_mark(c) for c in boom)
    html = page.read_text()
    assert '<tr class="diverged">' in html
    legend = " ".join(unescape(re.sub(r"<[^>]+>", "", html)).split())  # the words a reader sees
    assert "± is one standard error of that mean, not a confidence interval" in legend
    assert "★ marks a value significantly better than every other row of its column" in legend
    assert "☆ marks the tied leaders" in legend and "Holm-corrected" in legend and "95 % interval" in legend
    assert "usage: not ranked: no interval (a set-level metric needs ≥ 2 seeds per subject)" in legend


def test_seeds_aggregate_into_one_row_with_per_seed_rows_one_click_away(tmp_path):
    """3 seeds each. usage: `lead` ≈ 0.9 (sd 0.01) clearly above `other` ≈ 0.5; `capped` is higher still but not
    comparable (too few tokens for its V): never marked, footnoted. `flaky` has the best PSNR but one diverged seed."""
    rng = np.random.default_rng(5)
    difficulty = rng.normal(25.0, 3.0, 20)
    capped = "≤ 7.8 %: 320 tokens for V = 4,096"
    for seed in range(3):
        for subject, usage, dpsnr in (("lead", 0.9, 0.0), ("other", 0.5, -1.0), ("capped", 0.99, -1.0),
                                      ("flaky", 0.5, 5.0)):
            kwargs = {"divergence": {"step": 40, "term": "loss_commit"}} if (subject, seed) == ("flaky", 2) else {}
            write_run(tmp_path / "res", subject, seed, per_image={"psnr": difficulty + dpsnr + rng.normal(0, 0.2, 20)},
                      set_level={"usage_pooled": usage + rng.normal(0, 0.01)},
                      not_comparable={"usage_pooled": capped} if subject == "capped" else None, **kwargs)
    render_report([tmp_path / "res"], tmp_path / "out", with_plots=True)
    page = tmp_path / "out" / "suite-demo.html"
    header, rows = _cells(page)
    assert sorted(rows) == ["capped", "flaky", "lead", "other"]  # one row per subject, not per seed
    seeds, usage_col, psnr_col = header.index("seeds"), header.index("usage"), header.index("PSNR (dB)")
    assert rows["lead"][seeds]["text"].strip() == "3" and rows["flaky"][seeds]["text"].strip() == "2 (+1 diverged)"
    assert _mark(rows["lead"][usage_col]) == "★" and _mark(rows["capped"][usage_col]) == ""
    assert "not comparable: " + capped in rows["capped"][usage_col]["title"]
    assert "sd " in rows["lead"][usage_col]["text"]  # the spread across seeds is shown
    assert _mark(rows["flaky"][psnr_col]) == "" and "1 of 3 seeds diverged" in rows["flaky"][0]["text"]
    html = page.read_text()
    assert f"not comparable: {capped}" in html  # the footnote
    assert "diverged runs are not plotted: flaky" in html
    per_seed = next(t for t in parse(page).tables if "per-seed" in t["cls"])
    assert len(per_seed["rows"]) == 1 + 12
    assert any("diverged at step 40 (loss_commit)" in c["text"] for r in per_seed["rows"] for c in r)
    with (tmp_path / "out" / "suite-demo-summary.csv").open(newline="") as f:
        agg = {(r["subject"], r["metric"]): r for r in csv.DictReader(f)}
    lead = agg[("lead", "usage_pooled")]
    assert (lead["n_seeds"], lead["mark"]) == ("3", "best") and float(lead["seed_std"]) > 0
    assert agg[("capped", "usage_pooled")]["not_comparable"] == capped
