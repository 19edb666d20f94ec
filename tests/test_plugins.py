"""A quantizer file dropped into a `--plugins` directory is listed by the CLI and passes the same
contract checks as the built-in ones, with no other edit; broken plugin files give one-line errors."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from gsqbench import registry
from gsqbench.cli import main
from gsqbench.registry import QUANTIZERS
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


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """A plugin directory; everything it registers is removed from the global registry afterwards."""
    before = set(QUANTIZERS.names())
    yield tmp_path
    for name in set(QUANTIZERS.names()) - before:
        QUANTIZERS.unregister(name)
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
