"""A quantizer, metric or discriminator file dropped into a `--plugins` directory is listed by the CLI, runs in a
suite and passes the same contract checks as the built-in ones, with no other edit; broken plugin files give
one-line errors."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from gsqbench import registry
from gsqbench.cli import main
from gsqbench.registry import DISCRIMINATORS, METRICS, QUANTIZERS
from test_discriminators_contract import check_discriminator_contract
from test_metrics_contract import check_metric_contract
from test_quantizers_contract import check_quantizer_contract

PLUGIN = textwrap.dedent(
    '''
    """Test plugin: per-channel rounding to the integers -2..2 (G = dim groups of d = 1, V = 5)."""
    from __future__ import annotations

    import torch
    from torch import nn

    from gsqbench.quantizer import QuantizerOutput, straight_through
    from gsqbench.registry import register_quantizer


    @register_quantizer("{name}")
    class RoundingQuantizer(nn.Module):
        """Rounding plugin: clamp(round(z), -2, 2) per channel, one group per channel."""

        lookup_precision = None  # no nearest-code search

        def __init__(self, dim: int, scale: float = 1.0) -> None:
            super().__init__()
            self.dim, self.groups, self.codebook_size = dim, dim, 5
            self.scale = nn.Parameter(torch.full((dim,), float(scale)))

        @classmethod
        def example_config(cls) -> dict:
            return {{"dim": 3}}

        def forward(self, z: torch.Tensor) -> QuantizerOutput:
            x = z.float() * self.scale.view(1, -1, 1, 1)
            q = x.round().clamp(-2, 2)
            idx = (q.detach().long() + 2).permute(0, 2, 3, 1).contiguous()
            loss = ((x - q.detach()) ** 2).mean()
            return QuantizerOutput(straight_through(x, q).to(z.dtype), idx, {{"commitment": loss}}, {{}})

        def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
            return (indices - 2).float().permute(0, 3, 1, 2).contiguous()
    '''
)


def docs_example(heading: str) -> str:
    """The first ```python block after `heading` in docs/contracts.md: the worked examples there are the plugins
    these tests load, so the documentation cannot drift from what works."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "contracts.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """A plugin directory; everything it registers is removed from the global registries afterwards."""
    regs = (QUANTIZERS, METRICS, DISCRIMINATORS)
    before = [set(r.names()) for r in regs]
    yield tmp_path
    for reg, names in zip(regs, before):
        for name in set(reg.names()) - names:
            reg.unregister(name)
    if tmp_path.resolve() in registry._plugin_dirs:
        registry._plugin_dirs.remove(tmp_path.resolve())


def test_dropped_in_plugin_is_listed_and_passes_the_contract(plugin_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (plugin_dir / "rounding.py").write_text(PLUGIN.format(name="plugin_rounding"))
    (plugin_dir / "_helper.py").write_text("raise RuntimeError('private helpers are not loaded')\n")
    assert main(["--plugins", str(plugin_dir), "list", "quantizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("plugin_rounding ") and line.endswith("one group per channel.") for line in lines)
    assert any(line.startswith("gsq ") for line in lines)
    check_quantizer_contract("plugin_rounding")
    assert QUANTIZERS.get("plugin_rounding").__module__.startswith("_gsqbench_plugins.")


def test_the_contract_checker_rejects_a_broken_quantizer(plugin_dir: Path) -> None:
    # the checker must be able to fail: this plugin's indices_to_codes is off by one
    broken = PLUGIN.format(name="plugin_off_by_one").replace("(indices - 2).float()", "(indices - 1).float()")
    (plugin_dir / "off_by_one.py").write_text(broken)
    registry.add_plugin_dirs([plugin_dir])
    with pytest.raises(AssertionError):
        check_quantizer_contract("plugin_off_by_one")


@pytest.mark.parametrize(
    "source,needle",
    [
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        (PLUGIN.format(name="gsq"), "defined twice"),
    ],
    ids=["syntax", "raises", "duplicate-name"],
)
def test_broken_plugin_file_is_a_one_line_error_naming_the_file(
    plugin_dir: Path, capsys: pytest.CaptureFixture, source: str, needle: str
) -> None:
    bad = plugin_dir / "bad_plugin.py"
    bad.write_text(source)
    assert main(["--plugins", str(plugin_dir), "list", "quantizers"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gsqbench: error:")
    assert str(bad.resolve()) in err and needle in err


def test_metric_and_discriminator_plugins_are_listed_run_in_a_suite_and_pass_the_contracts(
    plugin_dir: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture, one_thread
) -> None:
    """Issue 11: a new metric and a new discriminator are one file each, with no edit anywhere else."""
    import numpy as np

    from gsqbench.config import suite_from_dict
    from gsqbench.results import load_results, read_per_image, read_run_info
    from gsqbench.runner import run_suite

    (plugin_dir / "mae.py").write_text(docs_example("## Metrics"))
    (plugin_dir / "tinyd.py").write_text(docs_example("## Discriminators"))
    assert main(["--plugins", str(plugin_dir), "list", "metrics"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("mae ") and "mae_u8 (lower)" in line for line in out.splitlines())
    assert "psnr " in out and "rfid@inception " in out
    assert main(["--plugins", str(plugin_dir), "list", "discriminators"]) == 0
    assert any(line.startswith("tinyd ") for line in capsys.readouterr().out.splitlines())
    check_metric_contract("mae")
    check_discriminator_contract("tinyd")

    raw = {"suite": "plugins",
           "shared": {"model": {"preset": "tiny-f4", "latent_dim": 4},
                      "data": {"train": {"kind": "synthetic", "size": 16, "limit": 8},
                               "eval": {"kind": "synthetic", "size": 16, "limit": 4}},
                      "train": {"steps": 3, "batch_size": 2, "precision": "fp32", "checkpoint_every": 3},
                      "gan": {"discriminator": "tinyd", "start_step": 1, "options": {"channels": 8}},
                      "eval": {"metrics": ["pixel", "extra"], "batch_size": 2, "samples": 0}},
           "subjects": [{"name": "gsq", "quantizer": {"name": "gsq", "dim": 4, "codebook_size": 16}}]}
    root = tmp_path_factory.mktemp("results")
    res = run_suite(suite_from_dict(raw), root, progress=False)
    run_dir = res.run_dirs[0]
    rows = load_results(root).set_index("metric")
    assert rows.loc["mae_u8", "direction"] == "lower" and np.isfinite(float(rows.loc["mae_u8", "value"]))
    per_image = read_per_image(run_dir)
    assert float(rows.loc["mae_u8", "value"]) == pytest.approx(per_image["mae_u8"].mean(), rel=1e-12)
    info = read_run_info(run_dir)
    assert info["card"]["mae"] == {"definition": "mean |real - fake| over H*W*3, uint8 levels"}
    assert info["train"]["discriminator"] == "tinyd"
    assert "loss_d" in (run_dir / "train_log.csv").read_text().splitlines()[0]  # the plugin D trained
