"""Registry behaviour, config validation errors (one line, naming the field), and discovery by path
without ever shadowing the PyPI `tokenizers` package."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from gsqbench import registry
from gsqbench.errors import UserError
from gsqbench.registry import QUANTIZERS, Registry, build_quantizer, discover_quantizers

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(cfg: dict) -> str:
    with pytest.raises(UserError) as info:
        build_quantizer(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_quantizer_did_you_mean() -> None:
    assert _one_line_error({"name": "gqs"}) == "unknown quantizer 'gqs'; did you mean 'gsq'?"


@pytest.mark.parametrize(
    "cfg,needles",
    [
        ({"name": "gsq", "dim": 16, "codebook_size": 8, "groups": 3}, ["groups: 3 does not divide dim 16", "[1, 2, 4, 8, 16]"]),
        ({"name": "vq", "dim": 10, "codebook_size": 8, "groups": 4}, ["groups: 4 does not divide dim 10"]),
        ({"name": "fsq", "levels": [8, 5, 5], "dim": 4}, ["levels:", "do not match dim 4"]),
        ({"name": "gsq", "dim": 16, "codebook_size": 8.5}, ["codebook_size", "expected an integer", "8.5"]),
        ({"name": "gsq", "dim": "16", "codebook_size": 8}, ["dim", "expected an integer"]),
        ({"name": "gsq", "dim": 16, "codebook_size": True}, ["codebook_size", "expected an integer"]),
        ({"name": "gsq", "dim": 16, "codebok_size": 8}, ["unknown option 'codebok_size'", "did you mean 'codebook_size'", "valid: dim"]),
        ({"name": "gsq", "codebook_size": 8}, ["missing required option 'dim'"]),
        ({"name": "gsq", "dim": 4, "codebook_size": 8, "norm": "l3"}, ["norm", "'l2'", "'clip'"]),
        ({"name": "gsq", "dim": 4, "codebook_size": 8, "norm": "clip"}, ["norm: 'clip'", "d = dim/groups = 1"]),
        ({"name": "lfq", "codebook_size": 1000}, ["codebook_size", "power of two", "1024"]),
        ({"name": "lfq", "dim": 5, "codebook_size": 64}, ["dim: 5 does not match codebook_size 64"]),
        ({"name": "fsq", "levels": [8, 2, 5]}, ["levels", "contains 2", "LFQ"]),
        ({"name": "fsq", "levels": [8, 5.5]}, ["levels", "integer"]),
        ({"name": "fsq", "codebook_size": 1000}, ["codebook_size", "no FSQ level preset"]),
        ({"name": "fsq", "levels": [5, 5], "commitment_weight": 0.25}, ["commitment_weight", "no auxiliary loss"]),
        ({"name": "vq", "dim": 4, "codebook_size": 8, "ema": "yes"}, ["ema", "true or false"]),
    ],
)
def test_bad_configs_name_the_field(cfg: dict, needles: list[str]) -> None:
    msg = _one_line_error(cfg)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert msg.startswith(f"quantizer '{cfg['name']}': ")


def test_config_must_have_a_name() -> None:
    assert "missing 'name'" in _one_line_error({"dim": 4})
    with pytest.raises(UserError):
        build_quantizer(["gsq"])  # type: ignore[arg-type]


def test_generic_registry_register_get_build() -> None:
    reg: Registry = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        """An alpha widget."""

        def __init__(self, size: int, mode: Literal["a", "b"] = "a", scale: float = 1.0, tags: list[int] | None = None):
            self.size, self.mode, self.scale, self.tags = size, mode, scale, tags

    assert reg.names() == ["alpha"] and "alpha" in reg
    assert reg.build("alpha", {"size": 3, "scale": 2, "tags": [1, 2]}).scale == 2
    reg.register("alpha")(Alpha)  # same object again: fine (idempotent discovery)
    with pytest.raises(UserError, match="defined twice"):
        reg.register("alpha")(type("Other", (), {}))
    with pytest.raises(UserError, match="unknown widget 'alpah'; did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(UserError, match="mode: expected one of 'a', 'b'"):
        reg.build("alpha", {"size": 3, "mode": "c"})
    with pytest.raises(UserError, match="tags: expected a list whose items are: an integer"):
        reg.build("alpha", {"size": 3, "tags": [1, "x"]})
    with pytest.raises(UserError, match="scale: expected a number"):
        reg.build("alpha", {"size": 3, "scale": "big"})


def test_discovery_is_idempotent_and_uses_private_module_names() -> None:
    first = discover_quantizers().names()
    classes = {n: QUANTIZERS.get(n) for n in first}
    second = discover_quantizers().names()
    assert first == second and all(QUANTIZERS.get(n) is classes[n] for n in first)
    for family in ("gsq", "vq", "lfq", "fsq"):
        module = QUANTIZERS.get(family).__module__
        assert module == f"_gsqbench_tokenizers.{family}"
        assert Path(sys.modules[module].__file__) == REPO / "tokenizers" / f"{family}.py"
    assert not (REPO / "tokenizers" / "__init__.py").exists()


def test_tokenizers_folder_never_shadows_the_pypi_package(tmp_path: Path) -> None:
    # a PyPI-shaped `tokenizers` (regular package) placed LAST on sys.path must still win over our
    # folder (a namespace-package candidate when the repo root is the working directory), and our
    # discovery must never import any module called `tokenizers`
    site = tmp_path / "site"
    (site / "tokenizers").mkdir(parents=True)
    (site / "tokenizers" / "__init__.py").write_text("FROM_PYPI = True\n")
    code = textwrap.dedent(
        f"""
        import sys, importlib.util
        from gsqbench.registry import discover_quantizers
        names = discover_quantizers().names()
        assert {{'gsq', 'vq', 'lfq', 'fsq'}} <= set(names), names
        assert 'tokenizers' not in sys.modules, 'discovery imported a module named tokenizers'
        sys.path.append({str(site)!r})
        spec = importlib.util.find_spec('tokenizers')
        assert spec.origin == {str(site / 'tokenizers' / '__init__.py')!r}, spec
        import tokenizers
        assert tokenizers.FROM_PYPI
        print('ok')
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_entry_point_plugins_are_discovered(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "epq_dist-0.1.dist-info").mkdir(parents=True)
    (site / "epq_dist-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: epq-dist\nVersion: 0.1\n")
    (site / "epq_dist-0.1.dist-info" / "entry_points.txt").write_text("[gsqbench.tokenizers]\nepq = epq_module\n")
    (site / "epq_module.py").write_text(textwrap.dedent(
        '''
        from torch import nn
        from gsqbench.registry import register_quantizer

        @register_quantizer("epq")
        class EntryPointQuantizer(nn.Module):
            """A quantizer that arrived through an entry point."""
        '''
    ))
    code = "from gsqbench.registry import discover_quantizers; print(discover_quantizers().names())"
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "'epq'" in res.stdout and "'gsq'" in res.stdout


def test_list_command_prints_every_quantizer_with_its_description(capsys: pytest.CaptureFixture) -> None:
    from gsqbench.cli import main

    assert main(["list", "quantizers"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in discover_quantizers().names():
        first = (QUANTIZERS.get(name).__doc__ or "").strip().splitlines()[0]
        assert any(line.split()[0] == name and line.endswith(first) for line in out), name


def test_list_other_kinds_never_crash(capsys: pytest.CaptureFixture) -> None:
    from gsqbench.cli import main

    for kind in ("presets", "weights", "configs"):
        assert main(["list", kind]) == 0
        assert capsys.readouterr().out.strip()


def test_plugin_dir_must_exist(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from gsqbench.cli import main

    assert main(["--plugins", str(tmp_path / "nope"), "list", "quantizers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gsqbench: error: --plugins:") and "nope" in err and "\n" not in err


def test_registry_module_never_imports_tokenizers_by_name() -> None:
    for path in [*(REPO / "gsqbench").rglob("*.py"), *(REPO / "tokenizers").glob("*.py")]:
        text = path.read_text()
        assert "import tokenizers" not in text and "from tokenizers" not in text, path
    assert registry.TOKENIZERS_DIR == REPO / "tokenizers"
