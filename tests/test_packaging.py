"""The installable wheel (issue 11): built from the source tree, installed with --no-deps into a scratch target, it
lists the four built-in quantizers, which ship inside it as gsqbench/_builtin_tokenizers; a Hugging Face-style
`tokenizers` package installed beside it is never scanned or shadowed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_installs_without_the_repo_and_lists_the_builtin_quantizers(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so no build/ or egg-info is left in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("gsqbench", "tokenizers", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(wheels), str(src)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("gsqbench-*.whl")
    target = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                      str(target), str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    assert sorted(p.name for p in (target / "gsqbench" / "_builtin_tokenizers").glob("*.py")) == \
        ["fsq.py", "gsq.py", "lfq.py", "vq.py"]
    # a `tokenizers` package beside it (as the Hugging Face one would be) must be neither imported nor scanned
    (target / "tokenizers").mkdir()
    (target / "tokenizers" / "__init__.py").write_text("raise SystemExit('the tokenizers package was imported')\n")
    (target / "tokenizers" / "trap.py").write_text("raise SystemExit('site-packages/tokenizers was scanned')\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("GSQBENCH_PLUGINS", None)
    where = _run([sys.executable, "-c", "import gsqbench; print(gsqbench.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr  # not the checkout
    listed = _run([sys.executable, "-m", "gsqbench", "list", "quantizers"], cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert names == ["fsq", "gsq", "lfq", "vq"], listed.stdout
    # the shipped suites travel too, and the names `list configs` prints are what `run`/`train` accept
    configs = _run([sys.executable, "-m", "gsqbench", "list", "configs"], cwd=tmp_path, env=env)
    shipped = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                     for p in (REPO / "configs").rglob("*.yaml"))
    assert [line.split()[0] for line in configs.stdout.splitlines()] == shipped, configs.stdout + configs.stderr
    loaded = _run([sys.executable, "-c", "from gsqbench.config import load_suite, resolve_suite_path; "
                   "print(resolve_suite_path('demo')); print(load_suite('paper/vae_f8_quantizers').suite)"],
                  cwd=tmp_path, env=env)
    assert loaded.returncode == 0 and loaded.stdout.splitlines()[0] == str(target / "gsqbench" / "_configs" /
                                                                          "demo.yaml"), loaded.stdout + loaded.stderr


def test_pyproject_lists_every_package_of_the_source_tree() -> None:
    """The wheel's explicit package list must not fall behind the source tree (a new subpackage would be lost)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "gsqbench").rglob("__init__.py")}
    assert on_disk | {"gsqbench._builtin_tokenizers", "gsqbench._configs"} == listed
