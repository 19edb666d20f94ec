"""A hostile user's catalogue (issue 15), run through the real CLI in subprocesses: bad config, bad paths, bad
checkpoints, damaged results, locked folders.

Every row asserts the documented exit code, exactly one `error:` line matching its pattern (none for the rows
that must succeed), no traceback, and that the results already present are byte-identical afterwards. Rows that
must succeed (a report over damaged or train-only results, names with HTML and `../`) check what the page shows.

The rows run 3 at a time in one module fixture (`outcomes`); most fail before torch is imported, which is part of
what this catalogue checks (bad input is cheap to report).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]

SUITE = """\
suite: t
shared:
  model: {preset: tiny-f8, latent_dim: 8}
  data:
    train: {kind: synthetic, size: 16, limit: 4}
    eval: {kind: synthetic, size: 16, limit: 4}
  train: {steps: 2, batch_size: 2, precision: fp32, lr: 1.0e-3}
subjects:
  - name: gsq
    quantizer: {name: gsq, dim: 8, codebook_size: 16, groups: 2}
"""


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    pattern: str = ""  # the one error line must match (re.search); "" = no error line expected
    code: int = 2
    setup: Optional[Callable[[Path], None]] = None
    check: Optional[Callable[[Path, str], None]] = None  # further assertions on the workspace and stderr


# ----------------------------------------------------------------------------------------------- inputs
def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def suite_file(text: str, name: str = "suite.yaml") -> Callable[[Path], None]:
    return lambda ws: write(ws / name, text)


class _System:  # pickles as a reference to posix.system; never called here (torch.save only pickles it)
    def __reduce__(self):
        return (os.system, ("echo payload ran > payload_ran",))


def evil_torch_file(path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": _System()}, path)


def truncate(path: Path, keep: int) -> None:
    """Cut a file short (`keep` < 0: drop that many bytes from the end), as a full disk or a killed copy would."""
    data = path.read_bytes()
    assert abs(keep) < len(data)
    path.write_bytes(data[:keep])


def image_folder(ws: Path) -> None:
    """imgs/: three small JPEGs (48x40, 44x36, 40x30: only the last is below --min-size 32) and a truncated one."""
    import io

    from PIL import Image

    for i, size in enumerate(((48, 40), (44, 36), (40, 30))):
        buf = io.BytesIO()
        Image.new("RGB", size, (40 * i, 90, 160)).save(buf, "JPEG")
        write(ws / "imgs" / f"{i}.jpg", buf.getvalue())
    write(ws / "imgs" / "broken.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])


def stderr_has(*needles: str) -> Callable[[Path, str], None]:
    def check(ws: Path, err: str) -> None:
        for n in needles:
            assert n in err, f"{n!r} not in stderr:\n{err}"
    return check


def live_lock(folder: Path) -> None:
    """A lock held by a live process on this host: this test process (so it is not stale)."""
    from gsqbench.locks import LOCK_NAME, Holder

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(Holder.me("a test holding the folder").to_json())


def mismatched_checkpoint(ws: Path) -> None:
    """Our checkpoint layout whose weights come from a model with another latent dim (hash updated to match)."""
    from gsqbench.io import sha256_file

    shutil.copytree(ws / "ckpt", ws / "wrong")
    shutil.copy(ws / "ckpt_d16" / "model.safetensors", ws / "wrong" / "model.safetensors")
    meta = json.loads((ws / "wrong" / "model.json").read_text())
    meta["weights_sha256"] = sha256_file(ws / "wrong" / "model.safetensors")
    (ws / "wrong" / "model.json").write_text(json.dumps(meta))


def hostile_names_results(ws: Path) -> None:
    src = ws / "results" / "demo" / "vq-s0"
    dst = ws / "hostile" / "x" / "y"
    shutil.copytree(src, dst)
    info = json.loads((dst / "run.json").read_text())
    info.update(suite="<script>alert(1)</script>", run_id="../../evil", subject="<b>bold</b>")
    (dst / "run.json").write_text(json.dumps(info))
    text = (dst / "metrics.csv").read_text().replace("demo,vq-s0,vq,", "<script>alert(1)</script>,../../evil,<b>bold</b>,")
    (dst / "metrics.csv").write_text(text)


# ----------------------------------------------------------------------------------------------- page checks
def page_shows(*needles: str, absent: tuple[str, ...] = ()) -> Callable[[Path, str], None]:
    def check(ws: Path, err: str) -> None:
        page = (ws / "rep" / "index.html").read_text(encoding="utf-8")
        for n in needles:
            assert n in page, f"{n!r} not on the page"
        for n in absent:
            assert n not in page, f"{n!r} on the page"
    return check


def nothing_outside_report(ws: Path, err: str) -> None:
    page_shows("&lt;script&gt;alert(1)&lt;/script&gt;", absent=("<script>alert(1)",))(ws, err)
    strays = [*ws.parent.glob("*evil*"), *(p for p in ws.rglob("*evil*") if ws / "rep" not in p.parents)]
    assert not strays, strays
    assert all(ws / "rep" in p.parents or p == ws / "rep" for p in (ws / "rep").rglob("*"))


def payload_never_ran(ws: Path, err: str) -> None:
    assert not (ws / "payload_ran").exists() and "weights_only" not in err


R = "results/demo/vq-s0"
EVAL_IMGS = ["eval", "ckpt", "--data", "image-folder:imgs", "--resolution", "16", "--metrics", "pixel", "--out", "ev",
             "--no-progress"]
CASES: list[Case] = [
    # --- suite files (no torch needed)
    Case("unknown key", lambda ws: ["run", "suite.yaml"], r"unknown config key 'shared\.train\.lrr'; did you mean 'lr'",
         setup=suite_file(SUITE.replace("lr: 1.0e-3", "lrr: 1.0e-3"))),
    Case("wrong type", lambda ws: ["run", "suite.yaml"],
         r"config key 'shared\.train\.steps': 'ten' is not valid; expected int",
         setup=suite_file(SUITE.replace("steps: 2", "steps: ten"))),
    Case("subject sets a shared field", lambda ws: ["run", "suite.yaml"],
         r"subjects may only differ in quantizer; 'train\.lr' is shared",
         setup=suite_file(SUITE + "    train: {lr: 0.1}\n")),
    Case("duplicate YAML key", lambda ws: ["run", "suite.yaml"],
         r"suite file 'suite\.yaml', line 8, column 3: duplicate key 'train' \(first given at line 7\): "
         r"'train: \{steps: 2, batch_size",
         setup=suite_file(SUITE.replace("  train: {steps: 2", "  train: {steps: 3}\n  train: {steps: 2"))),
    Case("malformed YAML", lambda ws: ["run", "suite.yaml"],
         r"suite file 'suite\.yaml', line 7, column \d+: .+: 'train: \{steps: 2: 3\}'",
         setup=suite_file(SUITE.replace("  train: {steps: 2, batch_size: 2, precision: fp32, lr: 1.0e-3}",
                                        "  train: {steps: 2: 3}"))),
    Case("suite not UTF-8", lambda ws: ["run", "suite.yaml"],
         r"suite file 'suite\.yaml' is not UTF-8 text \(byte 0xe9 at line 2\)",
         setup=suite_file(b"suite: t\n# caf\xe9 latin-1\n")),
    Case("suite missing", lambda ws: ["run", "demoo"],
         r"suite file 'demoo' does not exist and is not the name of a shipped config; did you mean 'demo'"),
    Case("suite is a directory", lambda ws: ["run", "results"], r"suite file 'results' is a directory; expected a file"),
    Case("suite empty", lambda ws: ["run", "suite.yaml"], r"suite file 'suite\.yaml': expected a mapping .*an empty file",
         setup=suite_file("")),
    Case("--set without =", lambda ws: ["run", "suite.yaml", "--set", "train.steps"], r"--set 'train\.steps': expected key=value",
         setup=suite_file(SUITE)),
    Case("seeds repeated", lambda ws: ["run", "suite.yaml"], r"config key 'seeds': \[0, 0\] must be a non-empty list of distinct",
         setup=suite_file(SUITE + "seeds: [0, 0]\n")),
    Case("steps 0", lambda ws: ["run", "suite.yaml", "--set", "train.steps=0"], r"'shared\.train\.steps': 0 is not valid; expected >= 1",
         setup=suite_file(SUITE)),
    Case("--results is a file", lambda ws: ["run", "suite.yaml", "--results", "suite.yaml"],
         r"--results 'suite\.yaml' is a file, not a directory", setup=suite_file(SUITE)),
    Case("--report is a file", lambda ws: ["run", "suite.yaml", "--report", "suite.yaml"],
         r"--report 'suite\.yaml' is a file, not a directory", setup=suite_file(SUITE)),
    Case("--threads 0", lambda ws: ["run", "suite.yaml", "--threads", "0"], r"--threads 0: expected a positive integer",
         setup=suite_file(SUITE)),
    Case("unknown option (argparse)", lambda ws: ["run", "suite.yaml", "--stepz", "3"], r"unrecognized arguments: --stepz 3"),
    # --- checks against the registries and data (torch)
    Case("D % G != 0", lambda ws: ["run", "suite.yaml"], r"quantizer 'gsq': groups: 3 does not divide dim 8",
         setup=suite_file(SUITE.replace("groups: 2", "groups: 3"))),
    Case("unknown quantizer", lambda ws: ["run", "suite.yaml"], r"unknown quantizer 'gqs'; did you mean 'gsq'",
         setup=suite_file(SUITE.replace("{name: gsq,", "{name: gqs,"))),
    Case("unknown quantizer option", lambda ws: ["run", "suite.yaml"],
         r"quantizer 'gsq': unknown option 'groupz'; did you mean 'groups'", setup=suite_file(SUITE.replace("groups:", "groupz:"))),
    Case("--only unknown subject", lambda ws: ["run", "suite.yaml", "--only", "gqs"],
         r"--only 'gqs': no such subject; did you mean 'gsq'", setup=suite_file(SUITE)),
    Case("missing data folder", lambda ws: ["run", "suite.yaml"], r"shared\.data\.train\.path: directory 'nope' does not exist",
         setup=suite_file(SUITE.replace("train: {kind: synthetic, size: 16, limit: 4}",
                                        "train: {kind: image-folder, path: nope, size: 16}"))),
    Case("empty data folder", lambda ws: ["run", "suite.yaml"], r"shared\.data\.train\.path: no image files .* under 'imgs'",
         setup=lambda ws: (suite_file(SUITE.replace("train: {kind: synthetic, size: 16, limit: 4}",
                                                    "train: {kind: image-folder, path: imgs, size: 16}"))(ws),
                           (ws / "imgs").mkdir())),
    Case("shipped config by name from another folder", lambda ws: ["train", "demo", "--run", "nope-s0"],
         r"--run 'nope-s0': no such run in suite 'demo'"),
    Case("run folder locked by a live process", lambda ws: ["run", "suite.yaml"],
         r"results/t/gsq-s0 is being written by pid \d+ on host .+, started .+ \(a test holding the folder\)",
         setup=lambda ws: (suite_file(SUITE)(ws), live_lock(ws / "results" / "t" / "gsq-s0"))),
    # --- eval
    Case("eval: checkpoint missing", lambda ws: ["eval", "nope"], r"checkpoint 'nope' does not exist"),
    Case("eval: --out is a file", lambda ws: ["eval", "ckpt", "--out", "ckpt/model.json"],
         r"--out 'ckpt/model\.json' is a file, not a directory"),
    Case("eval: --out is a suite's run folder", lambda ws: ["eval", "ckpt", "--out", R],
         r"--out \S+vq-s0: refusing to write into a folder that `gsqbench eval` did not create \(it holds results of "
         r"run 'vq-s0' of suite 'demo'\); .*--force"),
    Case("eval: --out is someone's folder", lambda ws: ["eval", "ckpt", "--out", "mine"],
         r"refusing to write into a folder .* \(it holds 1 entry: notes\.txt\)", setup=lambda ws: write(ws / "mine/notes.txt", "x")),
    Case("eval: --out locked by a live process", lambda ws: ["eval", "ckpt", "--out", "ev", "--data", "synthetic",
                                                           "--resolution", "16", "--n", "2", "--metrics", "pixel"],
         r"ev is being written by pid \d+", setup=lambda ws: live_lock(ws / "ev")),
    Case("eval: --ssim-border outside gsq-compat", lambda ws: ["eval", "ckpt", "--out", "ev", "--ssim-border",
                                                             "reflect-full"],
         r"eval\.ssim_border: 'reflect-full' is only valid with mode gsq-compat; the gsqbench protocol pins SSIM"),
    Case("eval: --data folder missing", lambda ws: ["eval", "ckpt", "--data", "image-folder:nope"],
         r"--data image-folder 'nope' does not exist"),
    Case("eval: pickle payload in a release", lambda ws: ["eval", "evil", "--out", "ev"],
         r"refusing to load evil/checkpoint\.pt: it contains executable pickle content \(posix\.system\); only tensor "
         r"checkpoints are accepted$", setup=lambda ws: evil_torch_file(ws / "evil" / "checkpoint.pt"), check=payload_never_ran),
    Case("eval: wrong architecture", lambda ws: ["eval", "wrong", "--out", "ev"],
         r"wrong/model\.safetensors: weights do not fit the model architecture \(.*shape mismatches",
         setup=mismatched_checkpoint),
    Case("eval: truncated weights", lambda ws: ["eval", "ckpt", "--out", "ev"],
         r"ckpt/model\.safetensors: sha256 differs from model\.json",
         setup=lambda ws: truncate(ws / "ckpt" / "model.safetensors", 100)),
    # --- corrupt and small images (README "Corrupt and small images")
    Case("eval: truncated JPEG under --strict-data", lambda ws: [*EVAL_IMGS, "--strict-data"],
         r"data\.path: cannot decode image '\S*imgs/broken\.jpg' \(.+\); remove or replace the file",
         setup=image_folder),
    Case("eval: truncated JPEG is skipped with a count", lambda ws: EVAL_IMGS, code=0, setup=image_folder,
         check=stderr_has("skipped 1 image(s) that could not be read (first: broken.jpg")),
    Case("eval: --min-size refuses a small image", lambda ws: [*EVAL_IMGS, "--min-size", "32"],
         r"--min-size 32: image 'imgs/2\.jpg' is 40x30, its shorter side is below 32; remove it", setup=image_folder),
    Case("data check: an unreadable file is exit 1", lambda ws: ["data", "check", "imgs", "--no-progress"], code=1,
         setup=image_folder, check=lambda ws, err: None),
    # --- import
    Case("import: pickle payload (same message)", lambda ws: ["import", "evil.pt", "--out", "imp"],
         r"refusing to load evil\.pt: it contains executable pickle content \(posix\.system\); only tensor checkpoints "
         r"are accepted$", setup=lambda ws: evil_torch_file(ws / "evil.pt"), check=payload_never_ran),
    Case("import-official: --out is a file", lambda ws: ["import-official", "ckpt", "--out", "ckpt/model.json"],
         r"--out 'ckpt/model\.json' is a file, not a directory"),
    Case("import: release file missing", lambda ws: ["import", "nope.pt", "--out", "imp"], r"release file 'nope\.pt' does not exist"),
    Case("weights import: file missing", lambda ws: ["weights", "import", "nofile.pth"], r"file nofile\.pth does not exist"),
    Case("--plugins is a file", lambda ws: ["--plugins", "ckpt/model.json", "list", "quantizers"], r"--plugins: .* is not a directory"),
    # --- reports and regress over damaged results
    Case("report: folder missing", lambda ws: ["report", "nope", "-o", "rep"], r"results path 'nope' does not exist"),
    Case("report: -o is a file", lambda ws: ["report", "results", "-o", "ckpt/model.json"],
         r"report folder -o 'ckpt/model\.json' is a file, not a directory"),
    Case("report: truncated metrics.csv is an unreadable row", lambda ws: ["report", "damaged", "-o", "rep", "--no-plots"],
         code=0, setup=lambda ws: (shutil.copytree(ws / R, ws / "damaged/demo/vq-s0"),
                                   truncate(ws / "damaged/demo/vq-s0/metrics.csv", -40)),
         check=page_shows("unreadable run", "damaged/demo/vq-s0/metrics.csv: line", "fields (file truncated or corrupt)")),
    Case("report: train-only runs are listed", lambda ws: ["report", "results", "train-only", "-o", "rep", "--no-plots"],
         code=0, check=page_shows("Runs not in the comparison tables (1)", "lfq-s0", "not evaluated",
                                  "trained 20 steps, checkpoint exported")),
    Case("report: HTML and ../ in names", lambda ws: ["report", "hostile", "-o", "rep", "--no-plots"], code=0,
         setup=hostile_names_results, check=nothing_outside_report),
    Case("regress: truncated metrics.csv", lambda ws: ["regress", "damaged", "--baseline", "base.csv"],
         r"damaged/demo/vq-s0/metrics\.csv: line \d+ has \d+ of 16 fields",
         setup=lambda ws: (shutil.copytree(ws / R, ws / "damaged/demo/vq-s0"), write(ws / "base.csv", "metric,value,run\n"),
                           truncate(ws / "damaged/demo/vq-s0/metrics.csv", -40))),
    Case("regress: baseline not UTF-8", lambda ws: ["regress", "results", "--baseline", "base.csv"],
         r"baseline 'base\.csv': not a readable CSV", setup=lambda ws: write(ws / "base.csv", b"metric,value,run\n\xff\xfe,1,a\n")),
]


# ----------------------------------------------------------------------------------------------- workspace
def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Existing results and checkpoints every case starts from (written by the real writers)."""
    import numpy as np
    import torch

    from gsqbench.checkpoints import save_tokenizer
    from gsqbench.metrics.base import MetricValue
    from gsqbench.models.tokenizer import build_tokenizer
    from gsqbench.results import write_run, write_samples, write_train_log

    root = tmp_path_factory.mktemp("bad-inputs-base")
    torch.manual_seed(0)
    for name, dim in (("ckpt", 8), ("ckpt_d16", 16)):
        spec = {"preset": "tiny-f8", "latent_dim": dim}
        q = {"name": "vq", "dim": dim, "codebook_size": 16}
        save_tokenizer(root / name, build_tokenizer(spec, q), spec, q, {"step": 20, "weights": "ema"})
    run = root / R
    info = {"run_id": "vq-s0", "suite": "demo", "subject": "vq", "seed": 0, "fairness_hash": "f" * 64,
            "card_hash": "c" * 64, "card": {"n": 2}, "spec": {"quantizer": {"name": "vq"}}}
    metrics = [MetricValue("psnr", 21.5, stderr=0.2, direction="higher", n=2),
               MetricValue("ssim", 0.61, direction="higher", n=2),
               MetricValue("rfid@inception", float("nan"), direction="lower", unavailable="weights not installed")]
    ids = ["img-0", "img-1"]
    write_run(run, info, metrics, per_image={"image_id": ids, "psnr": [21.0, 22.0]},
              code_counts=np.ones((1, 16), dtype=np.int64))
    write_samples(run, ids, np.zeros((2, 3, 8, 8), np.uint8), np.full((2, 3, 8, 8), 9, np.uint8))
    write_train_log(run, [{"step": 20, "loss": 0.5}])
    trained = root / "train-only" / "demo" / "lfq-s0"
    shutil.copytree(root / "ckpt", trained / "checkpoint")
    write_train_log(trained, [{"step": 10, "loss": 0.9}, {"step": 20, "loss": 0.5}])
    return root


def _run_case(case: Case, base: Path, tmp: Path) -> dict:
    ws = tmp / re.sub(r"\W+", "_", case.name)
    shutil.copytree(base, ws)
    if case.setup:
        case.setup(ws)
    before = _tree_hashes(ws / "results")
    env = {**os.environ, "PYTHONPATH": str(REPO), "GSQBENCH_HOME": str(tmp / "home"), "COLUMNS": "200"}
    env.pop("GSQBENCH_PLUGINS", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gsqbench", *case.argv(ws)], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=120)
    return {"ws": ws, "rc": proc.returncode, "err": proc.stderr, "out": proc.stdout, "s": time.perf_counter() - t0,
            "unchanged": before == _tree_hashes(ws / "results")}


@pytest.fixture(scope="module")
def outcomes(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.name: pool.submit(_run_case, c, base, tmp) for c in CASES}
        return {name: f.result() for name, f in futures.items()}


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, dict]) -> None:
    res = outcomes[case.name]
    err = res["err"]
    assert "Traceback" not in err and "Traceback" not in res["out"], err
    assert res["rc"] == case.code, f"exit {res['rc']} (expected {case.code}); stderr:\n{err}"
    errors = [line for line in err.splitlines() if re.search(r"\berror:", line)]
    if case.pattern:
        assert len(errors) == 1, f"expected exactly one error line, got:\n{err}"
        assert re.search(case.pattern, errors[0]), f"{errors[0]!r} does not match {case.pattern!r}"
    else:
        assert not errors, err
    assert res["unchanged"], "the results present before were changed"
    if case.check:
        case.check(res["ws"], err)
