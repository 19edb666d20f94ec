"""Contract tests run over every registered metric (built-ins, `--plugins` files, GSQBENCH_PLUGINS, entry points).

A metric class declares its family, its keys with directions, the weight files it needs, its card group and its
measurability rule; `create(ctx)` builds it for one evaluation. The checks below need nothing else, so a metric file
dropped into a plugin directory is checked with no other edit (tests/test_plugins.py calls `check_metric_contract`
on one written at test time; `GSQBENCH_PLUGINS=DIR pytest tests/test_metrics_contract.py` checks a user's own).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from gsqbench.metrics.base import Facts, Metric, MetricContext, MetricValue
from gsqbench.metrics.cost import CostMeter
from gsqbench.registry import METRICS, discover_metrics

NAMES = discover_metrics().names()
DIRECTIONS = ("lower", "higher", "none")


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    """No pretrained weights installed: metrics that need them must come out unavailable, never crash."""
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)


def _tokenizer() -> torch.nn.Module:
    from gsqbench.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer({"preset": "tiny-f4", "latent_dim": 4},
                           {"name": "gsq", "dim": 4, "codebook_size": 16, "groups": 2}).eval()


def _images(tok: torch.nn.Module, n: int = 4, size: int = 16):
    """(real_u8, fake_u8, ids, z) for n images; each image runs through the model alone, so every value below is
    the same whichever batches the metric sees (conv kernels are not bitwise batch-size independent)."""
    g = torch.Generator().manual_seed(3)
    real = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    latents: list[torch.Tensor] = []
    hook = tok.quantizer.register_forward_pre_hook(lambda m, args: latents.append(args[0].detach()))
    fakes = []
    try:
        with torch.no_grad():
            for i in range(n):
                qout = tok.encode(real[i:i + 1].float() / 127.5 - 1)
                fakes.append(torch.round((tok.decode(qout.z_q).clamp(-1, 1) + 1) * 127.5).to(torch.uint8))
    finally:
        hook.remove()
    return real, torch.cat(fakes), [f"img{i:02d}" for i in range(n)], torch.cat(latents)


def _resume(metric: Metric, ctx: MetricContext) -> Metric:
    """What a killed and resumed evaluation does: save the state to bytes, load it with weights_only=True into a
    fresh instance."""
    import io

    buf = io.BytesIO()
    torch.save(metric.state_dict(), buf)
    metric.close()
    fresh = type(metric).create(ctx)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    return fresh


def _run(cls: type[Metric], tok, parts: int, resume: bool = False) -> tuple[Metric | None, list[MetricValue]]:
    """One evaluation as evaluate() drives it: per batch the quantizer runs (its hooks fire), then `update`;
    with `resume`, the metric is saved and restored into a new instance after the first batch."""
    from gsqbench.evaluate import EvalSettings

    ctx = MetricContext(device=torch.device("cpu"), settings=EvalSettings(progress=False), tokenizer=tok,
                        meter=CostMeter(torch.device("cpu")))
    metric = cls.create(ctx)
    if metric is None:
        return None, []
    real, fake, ids, z = _images(tok)
    step = len(ids) // parts
    try:
        with torch.no_grad():
            for i in range(0, len(ids), step):
                if resume and i:
                    metric = _resume(metric, ctx)
                sl = slice(i, i + step)
                metric.update(real[sl], fake[sl], ids[sl], tok.quantizer(z[sl]))
        metric.sync()
        return metric, metric.compute()
    finally:
        metric.close()


def check_metric_declarations(cls: type[Metric]) -> None:
    from gsqbench.weights import all_weights

    assert issubclass(cls, Metric), f"{cls.__name__} must subclass gsqbench.metrics.base.Metric"
    assert isinstance(cls.family, str) and cls.family, "family must be a non-empty string"
    assert cls.outputs and all(isinstance(k, str) and d in DIRECTIONS for k, d in cls.outputs.items())
    assert isinstance(cls.weights, tuple) and all(w in all_weights() for w in cls.weights), cls.weights
    assert isinstance(cls.card_group, str)
    assert (cls.__doc__ or "").strip(), "a one-line description for `gsqbench list metrics`"
    for key in cls.outputs:
        verdict = cls.comparable(key, Facts(n_images=10, tokens_per_group=100, codebook_size=16, groups=2))
        assert verdict is None or (isinstance(verdict, str) and verdict and "\n" not in verdict)


def check_metric_contract(name: str) -> None:
    """Declarations, one evaluation on a tiny tokenizer, values only under declared keys, batch independence."""
    cls = METRICS.get(name)
    check_metric_declarations(cls)
    tok = _tokenizer()
    metric, rows = _run(cls, tok, parts=1)
    if metric is None:
        return  # not applicable to this subject (create returned None)
    assert set(metric.keys) <= set(cls.outputs)
    for row in rows:
        assert isinstance(row, MetricValue) and row.name in cls.outputs, row.name
        assert row.direction == cls.outputs[row.name], row.name
        if row.unavailable:
            assert "\n" not in row.unavailable and math.isnan(row.value)
            if cls.weights:  # missing weights: the reason names the command that fixes it
                assert "gsqbench weights" in row.unavailable, row.unavailable
        else:
            assert isinstance(row.value, float) and not math.isnan(row.value), row
    json.dumps(metric.card_fields())  # the card is canonical JSON
    per_image = metric.per_image()
    assert all(len(v) == 4 for k, v in per_image.items() if not k.startswith("_"))
    if getattr(cls, "deterministic", True):  # e.g. throughput is timing, not a function of the data
        _, split_rows = _run(cls, tok, parts=2)
        whole = {r.name: r.value for r in rows if not r.unavailable}
        split = {r.name: r.value for r in split_rows if not r.unavailable}
        assert whole.keys() == split.keys()
        for key, value in whole.items():
            assert split[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        if metric.state_dict() is not None:  # resumable (docs/contracts.md): a restored state changes nothing
            resumed, resumed_rows = _run(cls, tok, parts=2, resume=True)
            assert {r.name: (r.value, r.ci_low, r.ci_high) for r in resumed_rows if not r.unavailable} == \
                {r.name: (r.value, r.ci_low, r.ci_high) for r in split_rows if not r.unavailable}
            assert resumed.per_image() == _run(cls, tok, parts=2)[0].per_image()


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str, one_thread) -> None:
    check_metric_contract(name)


def test_builtin_metrics_registered_and_keys_unique() -> None:
    assert {"psnr", "ssim", "lpips@alex", "lpips@vgg", "rfid@inception", "codebook", "code_agreement",
            "cost"} <= set(NAMES)
    keys = [k for n in NAMES for k in METRICS.get(n).outputs]
    assert len(keys) == len(set(keys)), "two metrics produce the same key"


def test_the_checker_rejects_a_metric_reporting_an_undeclared_key() -> None:
    class Liar(Metric):
        """Reports a key it did not declare."""

        family, outputs = "test", {"declared": "higher"}

        def update(self, real_u8, fake_u8, image_ids, qout=None) -> None:
            pass

        def compute(self) -> list[MetricValue]:
            return [MetricValue("undeclared", 1.0, direction="higher")]

    METRICS.register("test_liar")(Liar)
    try:
        with pytest.raises(AssertionError):
            check_metric_contract("test_liar")
    finally:
        METRICS.unregister("test_liar")
