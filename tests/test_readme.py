"""The README is executable: every command block is run here, or is marked GPU-only / online-only.

Blocks are tagged with an HTML comment `<!-- readme-test: KIND -->` right above the fence:
`run` (executed below, in order, in a scratch directory), `make` (checked against the Makefile; `make demo`
itself is the CI demo), `gpu-only`, `online-only`. The only edits made to a command before it runs are the
substitutions in `_scratch` (stand-ins for a downloaded release, ImageNet, a weight file and the demo baseline),
fewer training steps and one evaluation crop per photo. The "add a variant" walkthrough therefore runs exactly as
a user would type it.

Fewer training steps change the fairness hash, so the committed `baselines/demo.csv` cannot match the
test's demo run; its stand-in is made from that run with `regress --update` just before the README's `regress` line.
That line then checks what the README promises of the real baseline: the demo rows `ok`, the variant's `new`, exit 0.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KINDS = {"run", "make", "gpu-only", "online-only"}
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<kind>[\w-]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
FAST = ["--set", "train.steps=4", "--set", "gan.start_step=2", "--set", "train.checkpoint_every=2",
        "--set", "data.eval.crops_per_image=1"]


def readme_blocks() -> list[tuple[str | None, str, str]]:
    return [(m["kind"], m["lang"], m["body"]) for m in BLOCK.finditer(README.read_text())]


def commands(body: str) -> list[str]:
    """Shell lines of a block, with `\\` continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", body)
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_every_command_block_is_tagged():
    for kind, lang, body in readme_blocks():
        if lang not in ("python", "text", "yaml"):  # every shell (or unlabelled) block is a command block
            assert kind in KINDS, f"untagged README command block:\n{body}"


def test_make_block_matches_the_makefile():
    blocks = [body for kind, _, body in readme_blocks() if kind == "make"]
    assert blocks and {c.split()[1] for c in commands(blocks[0])} == {"demo", "test"}
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "configs/demo.yaml" in demo and "reports/demo" in demo
    assert re.search(r"^test:.*\n\t.*pytest", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _import_official_test_helpers():
    spec = importlib.util.spec_from_file_location("_official_helpers", ROOT / "tests" / "test_import_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scratch(tmp: Path) -> dict[str, str]:
    """Stand-ins named by the README: a small official-layout release, an image folder, a weight file."""
    helpers = _import_official_test_helpers()
    kwargs = helpers.official_kwargs("f16", 16, 256, 8, hidden=32)
    state = helpers.random_state(helpers.official_shapes("f16", 16, 256, 8, hidden=32))
    release = helpers.write_release(tmp / "release" / "GSQ-F16-D16-G8-V256k", state, kwargs)
    images = tmp / "imagenet" / "val" / "n01440764"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    weight = tmp / "downloads" / "weights-inception-2015-12-05-6726825d.pth"
    weight.parent.mkdir()
    weight.write_bytes(b"stand-in weight file " * 100)
    for name in ("configs", "baselines", "tests", "tokenizers"):
        (tmp / name).symlink_to(ROOT / name)
    return {
        "~/GSQ-F16-D16-G8-V256k": str(release),
        "/data/imagenet/val": str(tmp / "imagenet" / "val"),
        "--resolution 256": "--resolution 64",
        "~/Downloads/weights-inception-2015-12-05-6726825d.pth": str(weight),
    }


def _subcommand(args: list[str]) -> str | None:
    """The gsqbench subcommand of an argument list, skipping global options (`--plugins DIR`, `-v`)."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] == "--plugins" else 1
    return args[i] if i < len(args) else None


def _argv(line: str, subs: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    for old, new in subs.items():
        line = line.replace(old, new)
    words = shlex.split(line)
    env = {}
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == ".venv/bin/gsqbench":
        words = [sys.executable, "-m", "gsqbench", *words[1:]]
        if _subcommand(words[3:]) in ("run", "train"):
            words += FAST + ["--no-progress"]
    elif words[0] == ".venv/bin/python":
        words = [sys.executable, *words[1:]]
    else:
        raise AssertionError(f"README command not understood by this test: {line}")
    return env, words


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """Runs every `run` block in order: quick runs, official import + eval, weights, the variant walkthrough."""
    subs = _scratch(tmp_path)
    blocks = readme_blocks()
    variant = next(body for kind, lang, body in blocks if lang == "python" and "register_quantizer" in body)
    plugin_file = re.search(r"e\.g\. `(my_plugins/[\w]+\.py)`", README.read_text()).group(1)
    (tmp_path / plugin_file).parent.mkdir()
    (tmp_path / plugin_file).write_text(variant)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GSQBENCH_")}
    base_env.update(GSQBENCH_HOME=str(tmp_path / "home"), TORCH_HOME=str(tmp_path / "torch"),
                    OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    manifest = {"inception-fid": {"filename": Path(subs["~/Downloads/weights-inception-2015-12-05-6726825d.pth"]).name,
                                  "sha256": __import__("hashlib").sha256(
                                      Path(subs["~/Downloads/weights-inception-2015-12-05-6726825d.pth"]).read_bytes()
                                  ).hexdigest()}}
    outputs = []
    for kind, _, body in blocks:
        if kind != "run":
            continue
        weights_block = "weights import" in body
        for line in commands(body):
            env, argv = _argv(line, subs)
            run_env = {**base_env, **env}
            if weights_block:  # a private home and a manifest naming the stand-in file: never the shared one
                run_env.update(GSQBENCH_HOME=str(tmp_path / "weights-home"),
                               GSQBENCH_WEIGHTS_MANIFEST=__import__("json").dumps(manifest))
            if "baselines/demo.csv" in argv:  # the stand-in baseline of the fast demo run (module docstring)
                fast = tmp_path / "fast-baseline" / "demo.csv"
                made = subprocess.run([sys.executable, "-m", "gsqbench", "regress", "results/demo", "--baseline",
                                       str(fast), "--update"], cwd=tmp_path, env=run_env, capture_output=True,
                                      text=True, timeout=120)
                assert made.returncode == 0, made.stderr
                argv[argv.index("baselines/demo.csv")] = str(fast)
            proc = subprocess.run(argv, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{line}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            outputs.append((line, proc.stdout + proc.stderr))

    by_cmd = {line: out for line, out in outputs}
    regress_out = next(out for line, out in by_cmd.items() if " regress " in line)
    assert re.search(r"gsq-half\S*\s.*\bnew\b", regress_out), regress_out
    assert re.search(r"demo\s+gsq-s0\s+psnr\s.*\bok\b", regress_out) and "regress: passed" in regress_out, regress_out
    compare_out = next(out for line, out in by_cmd.items() if " compare " in line)
    assert "reference gsq" in compare_out, compare_out
    assert re.search(r"gsq-half\s+psnr\s.*(better|worse|no detectable difference)", compare_out), compare_out
    assert re.search(r"gsq-half\s+usage_pooled\s.*no interval", compare_out), compare_out  # one seed: said so
    assert (tmp_path / "reports" / "variant" / "compare.csv").is_file()
    listed = next(out for line, out in by_cmd.items() if "list quantizers" in line)
    assert "gsq-half-commit" in listed
    contract = next(out for line, out in by_cmd.items() if "test_quantizers_contract" in line)
    assert re.search(r"\b[1-9]\d* passed", contract) and "failed" not in contract, contract  # the variant's own tests
    assert (tmp_path / "reports" / "all" / "index.html").is_file()
    assert (tmp_path / "checkpoints" / "gsq-f16-d16-g8" / "model.safetensors").is_file()
