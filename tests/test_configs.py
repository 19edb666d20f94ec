"""Every shipped suite (configs/**/*.yaml) loads, validates (quantizer kwargs, backbone, eval settings) and expands;
the demo and the paper quantizer comparison really compare at equal bits per token."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from gsqbench.config import expand_runs, load_suite
from gsqbench.registry import build_quantizer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names and len([p for p in CONFIGS if p.parent.name == "paper"]) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_loads_and_validates(path):
    suite = load_suite(path)
    runs = expand_runs(suite)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    # runs that differ only in their quantizer share one fairness hash
    by_shared = {}
    for r in runs:
        by_shared.setdefault(repr(r.shared), set()).add(r.fairness_hash)
    assert all(len(h) == 1 for h in by_shared.values())


def _bits(qspec: dict) -> float:
    q = build_quantizer(qspec)
    return q.groups * math.log2(q.codebook_size)  # contracts: bits per token = G·log2 V


@pytest.mark.parametrize("name, bits", [("demo.yaml", 12), ("paper/vae_f8_quantizers.yaml", 13)])
def test_comparisons_are_at_equal_bits_per_token(name, bits):
    suite = load_suite(Path(__file__).resolve().parents[1] / "configs" / name)
    assert {s.quantizer["name"] for s in suite.subjects} == {"gsq", "vq", "lfq", "fsq"}
    assert [_bits(s.quantizer) for s in suite.subjects] == [bits] * 4


def test_paper_recipe_c_values():
    suite = load_suite(Path(__file__).resolve().parents[1] / "configs" / "paper" / "gsq_gan_f16_d16_g8_v256k.yaml")
    t, g, loss = suite.shared.train, suite.shared.gan, suite.shared.loss
    assert (t.steps, t.batch_size, t.lr, t.betas, t.weight_decay, t.grad_clip, t.ema_decay, t.precision) == \
        (50000, 512, 2e-4, (0.9, 0.99), 0.05, 2.0, 0.999, "bf16")
    assert (g.discriminator, g.g_loss, g.d_loss, loss.perceptual_weight, loss.adversarial_weight) == \
        ("dino", "ns", "hinge", 1.0, 0.1)
    q = suite.subjects[0].quantizer
    assert (q["dim"], q["groups"], q["codebook_size"]) == (16, 8, 262144)


def test_demo_counts_enough_tokens_for_every_subjects_usage():
    """Every demo subject's codebook usage is measurable: ≥ 5·V tokens per group over the eval set (5 photos ×
    crops_per_image, (S/f)² tokens each, f from the preset's number of stages)."""
    from gsqbench.data import SAMPLE_PHOTOS_EVAL
    from gsqbench.models.autoencoder import PRESETS

    suite = load_suite(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    ev = suite.shared.data.eval
    f = 2 ** (len(PRESETS[suite.shared.model.preset].channel_multipliers) - 1)
    tokens_per_group = len(SAMPLE_PHOTOS_EVAL) * ev.crops_per_image * (ev.size // f) ** 2
    for s in suite.subjects:
        assert tokens_per_group >= 5 * build_quantizer(s.quantizer).codebook_size, s.name
