"""Dataset manifests and the corrupt/small-image policy (gsqbench.manifest, gsqbench.data, README "Corrupt and
small images"): building a dataset opens no file; the cached manifest is reused and rebuilt when a file is added,
removed or touched; `gsqbench data check` records readability; a file that fails at read time is skipped with a
count (the card's N is the true N) or stops the run under --strict-data; images smaller than the crop are counted
and --min-size refuses them; the worker count does not change results.

Oracles: the files written here (which are broken, which are small), PIL decoding them directly, and the
in-process (0 workers) evaluation for the worker comparison.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gsqbench import data, manifest
from gsqbench.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _jpeg(path, w=48, h=40, seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, quality=90)


def _folder(root, n=6):
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        _jpeg(root / f"c{i % 2}" / f"{i}.jpg", seed=i)
    return root


def test_manifest_built_without_opening_files_then_reused(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    ds = data.build_dataset("image-folder", path=root, resolution=32)
    assert ds.manifest_origin == "built" and opened == []  # listed from directory entries and stat only
    assert ds.ids == sorted(ds.ids) and len(ds) == 6
    again = data.build_dataset("image-folder", path=root, resolution=32)
    assert again.manifest_origin == "cache" and again.ids == ds.ids and opened == []
    assert manifest.manifest_path(root).is_file()


def test_manifest_rebuilt_when_a_file_is_added_removed_or_touched(tmp_path):
    root = _folder(tmp_path / "imgs")
    report = manifest.check_folder(root)  # every file decoded once: all ok, sizes known
    assert report.checked == 6 and not report.bad
    assert manifest.load_manifest(root).origin == "cache"

    _jpeg(root / "c0" / "new.jpg", seed=9)  # added
    m = manifest.load_manifest(root)
    assert m.origin == "rebuilt" and "c0/new.jpg" in m.paths
    status = dict(zip(m.paths, m.status.tolist()))
    assert status["c0/new.jpg"] == manifest.UNCHECKED and status["c1/1.jpg"] == manifest.OK  # unchanged kept

    (root / "c1" / "1.jpg").unlink()  # removed
    m = manifest.load_manifest(root)
    assert m.origin == "rebuilt" and "c1/1.jpg" not in m.paths and len(m) == 6

    st = os.stat(root / "c0" / "0.jpg")
    os.utime(root / "c0" / "0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    m = manifest.load_manifest(root)
    status = dict(zip(m.paths, m.status.tolist()))
    assert m.origin == "rebuilt" and status["c0/0.jpg"] == manifest.UNCHECKED and status["c0/2.jpg"] == manifest.OK
    assert manifest.load_manifest(root).origin == "cache"


def test_data_check_cli_records_readability_and_sizes(tmp_path, capsys):
    from gsqbench.cli import main

    root = _folder(tmp_path / "imgs", n=4)
    good = (root / "c0" / "0.jpg").read_bytes()
    (root / "c0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c1" / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "c1" / "tiny.png")
    assert main(["data", "check", str(root), "--no-progress"]) == 1  # some files are unreadable
    out = capsys.readouterr().out
    assert "7 image files, 5 readable, 2 unreadable" in out and "c0/truncated.jpg" in out and "c1/empty.png" in out
    assert "below 64 px: 5" in out  # the four 48×40 JPEGs and the 8×8 PNG
    m = manifest.load_manifest(root)
    sizes = {p: (int(w), int(h)) for p, w, h in zip(m.paths, m.width, m.height)}
    assert sizes["c1/tiny.png"] == (8, 8) and sizes["c0/0.jpg"] == Image.open(root / "c0" / "0.jpg").size
    ds = data.build_dataset("image-folder", path=root, resolution=32)  # known-bad files are left out up front
    assert sorted(ds.skipped) == ["c0/truncated.jpg", "c1/empty.png"] and len(ds) == 5
    with pytest.raises(UserError) as err:  # a known-small file is refused before anything runs
        data.build_dataset("image-folder", path=root, resolution=32, min_size=16)
    assert "tiny.png" in str(err.value) and "8x8" in str(err.value) and "\n" not in str(err.value)


def _eval(ds, **kw):
    from test_evaluate import StandInTokenizer

    from gsqbench.evaluate import EvalSettings, evaluate

    settings = EvalSettings(batch_size=2, samples=0, metrics=("pixel", "codebook"), progress=False, **kw)
    return evaluate(StandInTokenizer().eval(), ds, settings, device="cpu")


def test_read_time_failure_is_skipped_counted_and_remembered_or_stops_under_strict(tmp_path, caplog):
    root = _folder(tmp_path / "imgs")
    good = (root / "c1" / "1.jpg").read_bytes()
    (root / "c1" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG, not known to the manifest
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(root / "c0" / "small.png")  # 100×80 < crop 96
    ds = data.build_dataset("image-folder", path=root, resolution=96, crop="gsq")
    assert "c1/1.jpg" in ds.ids and len(ds) == 7
    with caplog.at_level(logging.WARNING):
        res = _eval(ds)
    card = res.card["data"]
    assert card["N"] == 6 and card["n"] == 6 and card["skipped_unreadable"] == 1  # the true N
    assert "c1/1.jpg" not in res.per_image["image_id"] and len(res.per_image["psnr"]) == 6
    assert card["smaller_than_crop"] == 7 - 1  # 48×40 and 100×80 originals are all below 96
    assert any("skipped 1 image(s)" in r.getMessage() and "c1/1.jpg" in r.getMessage() for r in caplog.records)
    # remembered: the next build leaves it out, and the card describes the same evaluated set
    again = data.build_dataset("image-folder", path=root, resolution=96, crop="gsq")
    assert again.skipped == ["c1/1.jpg"] and len(again) == 6
    res2 = _eval(again)
    assert res2.card_hash == res.card_hash and res2.card["data"]["skipped_unreadable"] == 1
    # --strict-data: one line naming the file, at read time (the manifest's memory is cleared by touching it)
    (root / "c1" / "1.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(UserError) as err:
        _eval(data.build_dataset("image-folder", path=root, resolution=96, crop="gsq", strict=True))
    assert "c1/1.jpg" in str(err.value) and "\n" not in str(err.value)
    # --min-size refuses images smaller than it at read time (not checked yet), naming the file
    (root / "c1" / "1.jpg").write_bytes(good)
    with pytest.raises(UserError) as err:
        _eval(data.build_dataset("image-folder", path=root, resolution=96, crop="gsq", min_size=60))
    assert "c0/0.jpg" in str(err.value) and "48x40" in str(err.value) and "--min-size 60" in str(err.value)


def test_worker_count_does_not_change_results(tmp_path):
    root = _folder(tmp_path / "imgs", n=10)
    ds = data.build_dataset("image-folder", path=root, resolution=32, crop="gsq")
    ref = _eval(ds, num_workers=0)
    par = _eval(ds, num_workers=2)
    assert par.card["runtime"]["num_workers"] == 2 and ref.card["runtime"]["num_workers"] == 0
    assert par.per_image == ref.per_image and par.card_hash == ref.card_hash
    assert np.array_equal(par.code_counts, ref.code_counts)
    assert [(m.name, m.value, m.ci_low, m.ci_high) for m in par.metrics] == \
        [(m.name, m.value, m.ci_low, m.ci_high) for m in ref.metrics]
    train = data.build_dataset("image-folder", path=root, split="train", resolution=16)
    loaders = [iter(data.train_loader(train, 3, seed=5, num_workers=w)) for w in (0, 2)]
    for _ in range(4):  # crosses an epoch boundary (10 images, batches of 3)
        (ids0, x0), (ids2, x2) = (next(it) for it in loaders)
        assert ids0 == ids2 and torch.equal(x0, x2)


def test_auto_workers_follow_cores_and_skip_in_memory_data(monkeypatch):
    synthetic = data.build_dataset("synthetic", resolution=128, n=64)
    monkeypatch.setattr(data, "usable_cores", lambda: 4)
    assert data.resolve_num_workers(None, synthetic, 4) == 3
    assert data.resolve_num_workers(None, synthetic, 32) == 0  # fewer than four batches
    assert data.resolve_num_workers(None, data.build_dataset("sample-photos", resolution=32), 1) == 0
    assert data.resolve_num_workers(5, synthetic, 4) == 5
    with pytest.raises(UserError, match="num_workers"):
        data.resolve_num_workers(-1, synthetic, 4)


def test_names_that_cannot_be_ids_are_left_out_with_a_warning(tmp_path, caplog):
    root = _folder(tmp_path / "imgs", n=2)
    good = (root / "c0" / "0.jpg").read_bytes()
    (root / "c0" / "two\nlines.jpg").write_bytes(good)
    with open(os.path.join(os.fsencode(root / "c1"), b"latin1-\xe9.jpg"), "wb") as f:  # not UTF-8
        f.write(good)
    with caplog.at_level(logging.WARNING, logger="gsqbench.manifest"):
        ds = data.build_dataset("image-folder", path=root, resolution=32)
    assert ds.ids == ["c0/0.jpg", "c1/1.jpg"]
    assert any("left out 2 image file(s)" in r.getMessage() for r in caplog.records)
    assert data.build_dataset("image-folder", path=root, resolution=32).manifest_origin == "cache"
