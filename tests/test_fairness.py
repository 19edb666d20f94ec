"""Valid comparisons: the fairness hash covers what a run actually used, fields that cannot change a result leave it
(each proven bit-identical: weights and metrics, CPU, one thread), `run --jobs 2` reproduces `--jobs 1` bit for bit,
measurability verdicts land in metrics.csv with their ceiling, and the report shows effective values and fallbacks.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path

import pytest

from gsqbench.config import suite_from_dict
from gsqbench.effective import expand_runs
from gsqbench.report import render_report
from gsqbench.runner import run_suite

pytestmark = pytest.mark.usefixtures("one_thread")

#: measured timings and memory (metrics declared non-deterministic): never a function of the weights
TIMINGS = {"train_images_per_s", "train_time_s", "encode_images_per_s", "decode_images_per_s", "peak_memory_mb"}
SUBJECTS = [
    {"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 4, "groups": 2}},  # 5·V = 20 ≤ 32
    {"name": "vq", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 64}},  # 5·V = 320 > 32 tokens
]


def _raw(**changes) -> dict:
    """A tiny suite; `changes` maps 'section.key' (or 'section.sub.key') to a value."""
    shared = {
        "model": {"preset": "tiny-f8", "latent_dim": 8},
        "data": {"train": {"kind": "synthetic", "size": 16, "limit": 6},
                 "eval": {"kind": "synthetic", "size": 16, "limit": 8}},  # 8 images x 2x2 tokens = 32 per group
        "train": {"steps": 2, "batch_size": 2, "precision": "fp32", "checkpoint_every": 100, "log_every": 1,
                  "ema_decay": 0.5},
        "eval": {"batch_size": 4, "samples": 1, "metrics": ["pixel", "codebook"]},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = shared
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return {"suite": "fair", "shared": shared, "subjects": copy.deepcopy(SUBJECTS), "seeds": [0]}


def _results(run_dir: Path) -> tuple[str, dict[str, str]]:
    """(model.safetensors sha256, metric -> value text, timings left out)."""
    sha = hashlib.sha256((run_dir / "checkpoint" / "model.safetensors").read_bytes()).hexdigest()
    return sha, {r["metric"]: r["value"] for r in _rows(run_dir).values() if r["metric"] not in TIMINGS}


def _rows(run_dir: Path) -> dict[str, dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return {r["metric"]: r for r in csv.DictReader(f)}


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the per-test one_thread: same thread count as the tests
    try:
        res = run_suite(suite_from_dict(_raw()), tmp_path_factory.mktemp("reference"), progress=False)
    finally:
        torch.set_num_threads(before)
    return {d.name: d for d in res.run_dirs}


def test_run_json_records_effective_spec_and_usage_ceiling(reference):
    gsq, vq = reference["gsq-s0"], reference["vq-s0"]
    info = _info(gsq)
    assert info["status"] == "done" and info["effective"]["resolved"] is True
    assert info["checkpoint_sha256"] == _results(gsq)[0]
    assert info["effective"]["quantizer"]["commitment_weight"] == 0.25  # the class default, filled in
    assert info["effective"]["no_effect"]["gan.lr"] == "no discriminator"
    # vq: V = 64 and 8 images x 4 tokens = 32 tokens per group < 5·64: usage can reach at most 32/64
    rows = _rows(vq)
    assert rows["usage_pooled"]["not_comparable"].startswith("≤ 50.0 %: 32 tokens per group for V = 64")
    assert rows["ppl_pooled"]["not_comparable"].startswith("≤ 32: ") and float(rows["ppl_pooled"]["value"]) <= 32
    assert rows["dead_codes"]["not_comparable"].startswith("≥ 32: ") and float(rows["dead_codes"]["value"]) >= 32
    assert rows["tokens_counted"]["not_comparable"] == "" and rows["psnr"]["not_comparable"] == ""
    assert all(r["not_comparable"] == "" for r in _rows(gsq).values())  # V = 4: 32 ≥ 5·4 tokens per group


# Each field that leaves the hash, changed: same fairness hash, byte-identical checkpoint, identical metric values.
# One variant per result-free field; the fields without effect here (no discriminator, perceptual loss off) together.
EXCLUDED = {
    "train.checkpoint_every": {"train.checkpoint_every": 1}, "train.log_every": {"train.log_every": 2},
    "data.num_workers": {"data.num_workers": 1}, "eval.samples": {"eval.samples": 3},
    "eval.require": {"eval.require": ["psnr"]}, "eval.fid_cache_dir": {"eval.fid_cache_dir": "elsewhere"},
    "loss.perceptual_required": {"loss.perceptual_required": True},
    "eval.keep_features": {"eval.keep_features": True}, "eval.save_recon": {"eval.save_recon": "png"},
    "no-effect": {"gan.lr": 0.5, "gan.g_loss": "hinge", "loss.adversarial_weight": 5.0,
                  "loss.perceptual_input_range": "[-1,1]", "train.min_lr_ratio": 0.5},
}


@pytest.mark.parametrize("name", list(EXCLUDED))
def test_excluded_field_leaves_hash_weights_and_metrics_bit_identical(name, reference, tmp_path):
    changes = dict(EXCLUDED[name])
    if "eval.fid_cache_dir" in changes:
        changes["eval.fid_cache_dir"] = str(tmp_path / "elsewhere")
    suite = suite_from_dict(_raw(**changes))
    assert expand_runs(suite)[0].fairness_hash == _info(reference["gsq-s0"])["fairness_hash"]
    res = run_suite(suite, tmp_path, only=["gsq"], progress=False)
    assert _results(res.run_dirs[0]) == _results(reference["gsq-s0"])


def test_hashed_fields_do_move_the_hash():
    ref = expand_runs(suite_from_dict(_raw()))[0].fairness_hash
    for dotted, value in {"eval.batch_size": 2, "train.lr": 1e-3, "data.eval.crops_per_image": 2,
                          "gan.discriminator": "patchgan"}.items():
        assert expand_runs(suite_from_dict(_raw(**{dotted: value})))[0].fairness_hash != ref, dotted


def test_jobs_2_reproduces_jobs_1_bit_for_bit(reference, tmp_path):
    res = run_suite(suite_from_dict(_raw()), tmp_path, progress=False, jobs=2, threads=1)
    for d in res.run_dirs:
        assert _results(d) == _results(reference[d.name]), d.name


def _install_fake_vgg(tmp_path: Path, monkeypatch) -> str:
    """A stand-in file registered as `vgg16`: the effective spec only hashes it (nothing trains with it here)."""
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    data = b"not really vgg16"
    (home / "weights" / "vgg16-stand-in.pth").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setenv("GSQBENCH_WEIGHTS_MANIFEST", json.dumps({"vgg16": {"filename": "vgg16-stand-in.pth",
                                                                            "sha256": sha}}))
    return sha


def test_missing_vgg_fallback_changes_the_hash_and_the_report_shows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    # vq and gsq with init uniform / no norm / one group are one model: the report must say so
    twins = [{"name": "vq", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16}},
             {"name": "gsq-as-vq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "init": "uniform",
                                                 "norm": "none"}}]
    on = suite_from_dict({**_raw(**{"loss.perceptual_weight": 1.0}), "subjects": twins})
    missing = expand_runs(on)[0]
    assert missing.effective.perceptual == "off"
    assert missing.effective.fallbacks[0].startswith("loss.perceptual_weight 1 → off: VGG16 weights missing")
    assert "$GSQBENCH_HOME/weights/vgg16-397923af.pth" in missing.effective.fallbacks[0]
    assert str(tmp_path) not in missing.effective.fallbacks[0]
    # off by fallback trains exactly what weight 0 trains: the same hash; the loss on (weights there) differs
    assert missing.fairness_hash == expand_runs(suite_from_dict({**_raw(), "subjects": twins}))[0].fairness_hash
    sha = _install_fake_vgg(tmp_path, monkeypatch)
    present = expand_runs(on)[0]
    assert present.effective.perceptual == "lpips-vgg-v0.1" and present.effective.perceptual_trunk_sha256 == sha
    assert present.fairness_hash != missing.fairness_hash
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST")

    res = run_suite(on, tmp_path / "r", progress=False)
    infos = [_info(d) for d in res.run_dirs]
    assert infos[0]["train"]["perceptual_loss"] == "off"
    assert infos[0]["effective"]["fallbacks"] == list(missing.effective.fallbacks)
    assert infos[0]["checkpoint_sha256"] == infos[1]["checkpoint_sha256"]  # byte-identical weights
    page = (render_report([tmp_path / "r"], tmp_path / "report").parent / "suite-fair.html").read_text()
    assert "1 → off: VGG16 weights missing" in page  # the effective value, with its fallback note
    assert "(no effect: no discriminator)" in page and "(cannot change a result; not hashed)" in page
    assert "Identical checkpoints:</strong> gsq-as-vq (gsq-as-vq-s0), vq (vq-s0) exported byte-identical" in page
    # defaults are shown in the differences table, e.g. gsq's groups = 1 and vq's lack of that parameter
    assert "quantizer.groups" in page and "(no such parameter)" in page


def test_crops_per_image_adds_seeded_crops_and_errors_name_the_suite_key():
    from gsqbench.config import DataSource
    from gsqbench.errors import UserError
    from gsqbench.runner import open_dataset

    one = open_dataset(DataSource(kind="sample-photos", size=16, crop="gsq", limit=2), role="eval")
    many = open_dataset(DataSource(kind="sample-photos", size=16, crop="gsq", crops_per_image=3), role="eval")
    first = open_dataset(DataSource(kind="sample-photos", size=16, crop="gsq", limit=1, crops_per_image=3),
                         role="eval")
    assert many.ids[:6] == ["astronaut", "chelsea", "coffee", "grace_hopper", "rocket", "astronaut#crop1"]
    assert len(many) == 15 and many.describe()["crops_per_image"] == 3
    assert many[1][1].equal(one[1][1])  # crop 0 is the crop protocol's
    assert many[5][1].equal(first[1][1]) and not many[5][1].equal(many[0][1])  # seeded by id, not by position
    with pytest.raises(UserError, match=r"^shared\.data\.eval\.limit: 6 exceeds the 5 sample-photos eval images "
                                        r"\(shared\.data\.eval\.crops_per_image"):
        open_dataset(DataSource(kind="sample-photos", size=16, limit=6), role="eval")
    with pytest.raises(UserError, match=r"^shared\.data\.train\.crops_per_image: data\.kind synthetic"):
        open_dataset(DataSource(kind="synthetic", size=16, crops_per_image=2), role="train")


def test_fid_and_is_below_2048_images_are_not_comparable():
    from gsqbench.metrics.base import Facts
    from gsqbench.metrics.fid import FIDMetric

    reason = FIDMetric.comparable("rfid@inception", Facts(n_images=2047))
    assert reason.startswith("N = 2,047 images < 2,048: FID") and "comparable from N = 2,048" in reason
    assert FIDMetric.comparable("is@inception", Facts(n_images=5)).startswith("N = 5 images < 2,048: IS")
    assert FIDMetric.comparable("rfid@inception", Facts(n_images=2048)) is None


def test_random_crop_resamples_only_the_window_like_resize_then_crop():
    """The seeded random crops (training and extra eval crops) resample only their window from the original; the
    oracle is PIL resizing the whole photo (torchvision Resize(int) sizes) and then cropping, with the same draws."""
    import numpy as np
    from PIL import Image

    from gsqbench import data

    img = data._decoded_photo(str(data.sample_photo_path("skimage", "coffee.png")))
    for seed in range(12):
        size = (16, 32, 64)[seed % 3]
        ours = np.asarray(data.random_crop(img, size, np.random.default_rng(seed)), dtype=float)
        rng = np.random.default_rng(seed)
        short = int(rng.integers(size, min(img.size) + 1))
        w, h = img.size
        full = img.resize((int(short * w / h), short) if w > h else (short, int(short * h / w)), Image.BILINEAR)
        left, top = int(rng.integers(0, full.size[0] - size + 1)), int(rng.integers(0, full.size[1] - size + 1))
        oracle = np.asarray(full.crop((left, top, left + size, top + size)), dtype=float)
        assert np.abs(ours - oracle).max() <= 3 and np.abs(ours - oracle).mean() < 0.5, seed
