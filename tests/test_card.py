"""Protocol card: field groups present for the computed metrics, and a hash that ignores exactly the run-specific
fields. The oracle for the hash is hashlib over json.dumps(sort_keys, compact) of the card with the run-specific
fields removed by hand here (metrics-protocol.md §12)."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from gsqbench.card import build_card, card_hash, id_list_hash


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)


def _metrics(families=("pixel", "lpips", "fid", "codebook", "cost"), codebook=(64, 4)):
    """Real metric objects of the named families, as evaluate() builds them (no weights installed: unavailable)."""
    from gsqbench.metrics.codebook import CodebookMetric
    from gsqbench.metrics.fid import FIDMetric
    from gsqbench.metrics.lpips import LPIPSAlex, LPIPSVgg
    from gsqbench.metrics.pixel import PSNRMetric, SSIMMetric

    out = []
    if "pixel" in families:
        out += [PSNRMetric(), SSIMMetric()]
    if "lpips" in families:
        out += [LPIPSAlex(), LPIPSVgg()]
    if "fid" in families:
        out.append(FIDMetric("cpu"))
    if "codebook" in families:
        out.append(CodebookMetric(*codebook))
    return out


def _card(**over):
    kw = dict(
        mode="gsqbench", metrics=_metrics(),
        data={"dataset": "synthetic", "split": "eval", "N": 5, "image_id_list_hash": "ab", "originals_hash": "cd",
              "crop": "gsq"},
        model={"weights": "ema", "argmin": "first-index", "lookup_precision": "fp32", "checkpoint_sha256": "x1",
               "step": 10, "code_agreement": 0.9, "fairness_hash": "f1", "tokenizer_spec_hash": "t1"},
        precision={"model": "fp32", "tf32": False, "device": "cpu", "driver": None},
        runtime={"versions": {"torch": "2.x"}, "world_size": 1, "batch_size": 4, "seed": 0},
    )
    kw.update(over)
    return build_card(**kw)


def _oracle_hash(card: dict) -> str:
    view = copy.deepcopy(card)
    view.pop("card_hash")
    view.pop("runtime")
    for k in ("checkpoint_sha256", "step", "code_agreement", "fairness_hash", "tokenizer_spec_hash",
              "lookup_precision"):
        view["model"].pop(k)
    for k in ("codebook_V", "codebook_G", "tokens_counted", "tokens_per_group"):
        view["codebook"].pop(k)
    for k in ("is_std_over_splits", "fid_reference_source", "fid_reference_key"):
        view["fid"].pop(k)
    view["psnr"].pop("psnr_capped_images")
    view["precision"].pop("device")
    view["precision"].pop("driver")
    return hashlib.sha256(json.dumps(view, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_groups_and_hash_oracle():
    card = _card()
    for group in ("data", "conversion", "model", "precision", "psnr", "ssim", "lpips", "fid", "is", "codebook",
                  "runtime"):
        assert group in card, group
    assert card["card_version"] == 1 and card["mode"] == "gsqbench"
    assert card["conversion"]["uint8_rule"] == "round-half-even"
    assert card["ssim"]["ssim_data_range"] == 255 and card["ssim"]["ssim_border"] == "valid"
    assert card["lpips"]["lpips_alex_heads_sha256"] == (
        "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0")  # spec §11, lpips wheel v0.1
    assert card["lpips"]["lpips_vgg_trunk_sha256"] is None  # not installed
    assert card["fid"]["fid_weights_sha256"] is None  # not installed
    assert card["is"] == {"splits": 10, "permutation_seed": 2020, "logits": "logits_unbiased", "softmax_dtype": "float64"}
    assert card["weights_conformant"] is False
    assert card["codebook"]["codebook_V"] == 64 and card["codebook"]["codebook_G"] == 4
    assert card["card_hash"] == _oracle_hash(card) == card_hash(card)


def test_run_specific_fields_do_not_change_the_hash():
    base = _card()["card_hash"]
    assert _card(runtime={"versions": {"torch": "9"}, "world_size": 8, "batch_size": 1, "seed": 3})["card_hash"] == base
    assert _card(model={"weights": "ema", "argmin": "first-index", "lookup_precision": "fp32",
                        "checkpoint_sha256": "other", "step": 99, "code_agreement": 0.1})["card_hash"] == base
    assert _card(metrics=_metrics(codebook=(8, 1)))["card_hash"] == base  # the subject's V and G are not protocol
    # lookup precision is a kwarg of the GSQ subject (only GSQ has one), so VQ/LFQ/FSQ rows stay comparable
    assert _card(model={"weights": "ema", "argmin": "first-index"})["card_hash"] == base
    assert _card(precision={"model": "fp32", "tf32": False, "device": "cuda:3", "driver": "12.4"})["card_hash"] == base


@pytest.mark.parametrize("change", [
    {"mode": "gsq-compat"},
    {"data": {"dataset": "synthetic", "split": "eval", "N": 6, "image_id_list_hash": "ab", "originals_hash": "cd",
              "crop": "gsq"}},
    {"data": {"dataset": "synthetic", "split": "eval", "N": 5, "image_id_list_hash": "ab", "originals_hash": "cd",
              "crop": "adm"}},
    {"model": {"weights": "raw", "argmin": "first-index", "lookup_precision": "fp32"}},
    {"metrics": lambda: _metrics(("pixel",))},
    {"metrics": lambda: [m if type(m).__name__ != "SSIMMetric" else type(m)(border="reflect-full") for m in _metrics()]},
])
def test_protocol_fields_change_the_hash(change):
    change = {k: (v() if callable(v) else v) for k, v in change.items()}  # metric objects built under the fixture
    assert _card(**change)["card_hash"] != _card()["card_hash"]


def test_key_order_and_nan_do_not_matter_or_break():
    card = _card()
    shuffled = json.loads(json.dumps(card))
    shuffled = {k: shuffled[k] for k in reversed(list(shuffled))}
    assert card_hash(shuffled) == card["card_hash"]
    card["model"]["code_agreement"] = float("nan")  # run-specific and non-finite: hashing must still work
    assert card_hash(card) == card["card_hash"]


def test_weights_conformant_only_without_weight_metrics():
    assert _card(metrics=_metrics(("pixel", "codebook")))["weights_conformant"] is True
    assert "fid" not in _card(metrics=_metrics(("pixel",))) and "lpips" not in _card(metrics=_metrics(("pixel",)))


def test_id_list_hash_is_ordered():
    assert id_list_hash(["a", "b"]) == hashlib.sha256(b"a\nb\n").hexdigest()
    assert id_list_hash(["b", "a"]) != id_list_hash(["a", "b"])
