"""Tests for gsqbench.data: crop protocols vs their formulas, timm's transforms and an ADM reimplementation;
image-folder decoding and errors; bundled sample photos; synthetic data; sharding; the resumable train loader."""
from __future__ import annotations

import logging
import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from gsqbench import data
from gsqbench.errors import UserError


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def _u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


# (width, height): odd/even differences, portrait/landscape, square, smaller than the crop.
SIZES = [(300, 400), (400, 300), (293, 517), (517, 293), (256, 256), (300, 301), (100, 80), (64, 999)]


# --------------------------------------------------------------------------------------------- crop protocols
def _expected_gsq_geometry(w: int, h: int, s: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """metrics-protocol §2 written out: short → floor(S/0.875), long → int(short'·long/short); round offsets."""
    short_new = math.floor(s / 0.875)
    if w <= h:
        new = (short_new, int(short_new * h / w))
    else:
        new = (int(short_new * w / h), short_new)
    top = int(round((new[1] - s) / 2))
    left = int(round((new[0] - s) / 2))
    return new, (left, top)


def test_gsq_target_is_292_for_256():
    (nw, nh), _ = _expected_gsq_geometry(500, 375, 256)
    assert nh == 292 and nw == int(292 * 500 / 375)
    assert math.floor(128 / 0.875) == 146


@pytest.mark.parametrize("w,h", SIZES)
def test_gsq_crop_matches_formula_geometry(w, h):
    s = 256
    img = _noise_image(w, h)
    (nw, nh), (left, top) = _expected_gsq_geometry(w, h, s)
    resized = img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BILINEAR)
    expected = _u8(resized.crop((left, top, left + s, top + s)))
    out = data.apply_crop(img, "gsq", s)
    assert out.dtype == torch.uint8 and out.shape == (3, s, s)
    assert torch.equal(out, expected)


def test_gsq_offsets_use_python_rounding_on_half_values():
    # 293-pixel long side: (293 - 256)/2 = 18.5 → round-half-even 18; 295: 19.5 → 20.
    assert data.center_crop_box(293, 256, 256, "round")[0] == 18
    assert data.center_crop_box(295, 256, 256, "round")[0] == 20
    assert data.center_crop_box(293, 256, 256, "floor")[0] == 18
    assert data.center_crop_box(295, 256, 256, "floor")[0] == 19


@pytest.mark.parametrize("w,h", SIZES[:5])
def test_gsq_and_train_match_timm_official_transforms(w, h):
    from timm.data import create_transform

    s = 128
    img = _noise_image(w, h, seed=1)
    evaluate = create_transform(input_size=s, crop_pct=0.875, interpolation="bilinear", is_training=False)
    train = create_transform(input_size=s, is_training=True, no_aug=True, interpolation="bilinear")
    # keep only the PIL geometry steps (Resize, CenterCrop); ToTensor/Normalize are not part of the protocol
    for tf, crop in ((evaluate, "gsq"), (train, "train")):
        names = [type(t).__name__ for t in tf.transforms[:2]]
        assert names == ["Resize", "CenterCrop"], names
        expected = tf.transforms[1](tf.transforms[0](img))
        assert torch.equal(data.apply_crop(img, crop, s), _u8(expected)), crop


def _adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Direct reimplementation of ADM guided-diffusion `center_crop_arr` (the oracle)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("w,h,s", [(300, 400, 128), (517, 293, 128), (600, 520, 128), (100, 80, 64), (64, 999, 32),
                                   (255, 256, 128)])
def test_adm_matches_reference_center_crop_arr(w, h, s):
    img = _noise_image(w, h, seed=2)
    expected = torch.from_numpy(_adm_center_crop_arr(img, s)).permute(2, 0, 1)
    assert torch.equal(data.apply_crop(img, "adm", s), expected)


def test_gsq_and_adm_differ():
    img = _noise_image(400, 300, seed=3)
    assert not torch.equal(data.apply_crop(img, "gsq", 128), data.apply_crop(img, "adm", 128))


# --------------------------------------------------------------------------------------------- image folder
def _write_folder(root):
    """Class subfolders with one image per special mode; every image is 8×8 so crop 'train' at 8 is identity."""
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(grey, "L").save(root / "a" / "grey.png")
    rgba = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0
    rgba[4:6, :, 3] = 255
    rgba[6:, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(root / "a" / "rgba.png")
    g16 = (rng.integers(0, 65536, size=(8, 8))).astype(np.uint16)
    g16[0, :3] = [0, 65535, 257 * 77]
    Image.fromarray(g16).save(root / "b" / "sixteen.png")
    pal = Image.fromarray(rng.integers(0, 4, size=(8, 8), dtype=np.uint8), "P")
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0, 255, 255, 255]
    pal.putpalette(palette + [0] * (768 - len(palette)))
    pal.save(root / "b" / "deep" / "palette.PNG")
    Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8), "RGB").save(root / "b" / "photo.jpg",
                                                                                      quality=95)
    (root / "b" / "notes.txt").write_text("not an image, wrong extension: ignored")
    return {"grey": grey, "rgba": rgba, "g16": g16, "pal": (np.array(pal), palette)}


def test_image_folder_ids_sorted_relative_paths(tmp_path):
    _write_folder(tmp_path)
    ds = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="train")
    assert ds.ids == ["a/grey.png", "a/rgba.png", "b/deep/palette.PNG", "b/photo.jpg", "b/sixteen.png"]
    for image_id, img in ds:
        assert img.dtype == torch.uint8 and img.shape == (3, 8, 8), image_id


def test_image_folder_mode_conversions(tmp_path):
    src = _write_folder(tmp_path)
    ds = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="train")
    out = {i: x.permute(1, 2, 0).numpy().astype(np.int64) for i, x in ds}
    # grayscale: replicated into three equal channels
    assert np.array_equal(out["a/grey.png"], np.repeat(src["grey"][..., None], 3, axis=2))
    # RGBA over white: alpha 0 → white, alpha 255 → colour, alpha 128 → c·a + 255·(1 − a) within one level
    rgba = src["rgba"].astype(np.float64)
    a = rgba[..., 3:] / 255.0
    expected = rgba[..., :3] * a + 255.0 * (1 - a)
    got = out["a/rgba.png"]
    assert np.all(got[:4] == 255)
    assert np.array_equal(got[4:6], src["rgba"][4:6, :, :3].astype(np.int64))
    assert np.max(np.abs(got - expected)) <= 1.0
    # 16-bit: full range scaled to 8 bits with rounding (not clipped at 255)
    g16 = out["b/sixteen.png"]
    assert np.array_equal(g16, np.repeat(np.rint(src["g16"] * 255.0 / 65535.0)[..., None], 3, axis=2))
    assert list(g16[0, :3, 0]) == [0, 255, 77]
    # palette: indices looked up in the palette
    idx, palette = src["pal"]
    lut = np.array(palette, dtype=np.int64).reshape(-1, 3)
    assert np.array_equal(out["b/deep/palette.PNG"], lut[idx])


def test_image_folder_corrupt_file_skipped_with_count_or_refused(tmp_path, caplog):
    """Building opens no file: an empty file is known bad from its size, a broken one once checked (README
    "Corrupt and small images"); known-bad files are skipped with a count, or refused under strict."""
    from gsqbench.manifest import check_folder

    _write_folder(tmp_path)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    ds = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="train")
    assert "a/broken.jpg" in ds.ids and ds.skipped == ["b/empty.png"]  # not opened yet: not known bad
    sample = ds.read(ds.ids.index("a/broken.jpg"))
    assert sample.image is None and sample.problem == "unreadable"
    with pytest.raises(UserError) as err:
        ds[ds.ids.index("a/broken.jpg")]
    assert "broken.jpg" in str(err.value) and "\n" not in str(err.value)
    assert [p for p, _ in check_folder(tmp_path).bad] == ["a/broken.jpg", "b/empty.png"]
    with caplog.at_level(logging.WARNING, logger="gsqbench.data"):
        ds = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="train")
    assert "a/broken.jpg" not in ds.ids and "b/empty.png" not in ds.ids and len(ds) == 5
    assert sorted(ds.skipped) == ["a/broken.jpg", "b/empty.png"] and ds.describe()["skipped_unreadable"] == 2
    assert any("skipped 2 known-unreadable" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError) as err:
        data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="train", strict=True)
    msg = str(err.value)
    assert "\n" not in msg and "broken.jpg" in msg


def test_extra_crops_of_an_image_folder_follow_the_same_policy(tmp_path):
    """crops_per_image on an image folder: a broken file is unreadable in every crop (never raised by read), the
    manifest records the file once, and the extra crops of a good file are seeded random S x S crops of it."""
    from gsqbench.manifest import load_manifest

    _write_folder(tmp_path)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="gsq", crops_per_image=3)
    base_ids = [i for i in ds.ids if "#crop" not in i]
    assert len(ds) == 3 * len(base_ids) and ds.ids[len(base_ids)] == base_ids[0] + "#crop1"
    broken = [ds.read(k) for k, i in enumerate(ds.ids) if i.startswith("a/broken.jpg")]
    assert len(broken) == 3 and all(s.image is None and s.problem == "unreadable" for s in broken)
    good = ds.read(len(base_ids) + 1)
    assert good.image.shape == (3, 8, 8) and good.image.dtype == torch.uint8
    assert torch.equal(good.image, ds.read(len(base_ids) + 1).image)  # seeded
    ds.record_read_results([(s.image_id, s.error) for s in broken])
    m = load_manifest(tmp_path)
    assert [p for p, _ in m.bad()] == ["a/broken.jpg"]
    again = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="gsq", crops_per_image=3)
    assert not any(i.startswith("a/broken.jpg") for i in again.ids) and len(again) == len(ds) - 3
    strict = data.build_dataset("image-folder", path=tmp_path, resolution=8, crop="gsq", crops_per_image=2,
                                min_size=1000)
    assert strict.read(len(strict) - 1).problem == "too-small"  # an extra crop honours --min-size too


def test_image_folder_missing_and_empty_dirs(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as err:
        data.build_dataset("image-folder", path=missing, resolution=8)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("no images")
    with pytest.raises(UserError) as err:
        data.build_dataset("image-folder", path=empty, resolution=8)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="data.path"):
        data.build_dataset("image-folder", resolution=8)


def test_image_folder_n_is_evenly_spaced_and_small_images_upscaled(tmp_path):
    for c in range(4):
        (tmp_path / f"c{c}").mkdir()
        for k in range(3):
            _noise_image(20, 30, seed=c * 10 + k).save(tmp_path / f"c{c}" / f"{k}.png")
    ds = data.build_dataset("image-folder", path=tmp_path, resolution=64, crop="gsq", n=4)
    assert ds.ids == ["c0/0.png", "c1/0.png", "c2/0.png", "c3/0.png"]  # indices 0, 3, 6, 9 of 12
    assert ds[0][1].shape == (3, 64, 64)  # 20×30 upscaled by the protocol's resize
    with pytest.raises(UserError, match="data.n"):
        data.build_dataset("image-folder", path=tmp_path, resolution=64, n=13)


# --------------------------------------------------------------------------------------------- sample photos
def test_sample_photos_disjoint_deterministic_colour_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("sample-photos tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    ev = data.build_dataset("sample-photos", split="eval", resolution=64, crop="gsq")
    tr = data.build_dataset("sample-photos", split="train", resolution=64, n=10, seed=3)
    eval_photos = set(ev.ids)
    train_photos = {i.split("#")[0] for i in tr.ids}
    assert len(eval_photos) >= 4 and len(train_photos) >= 4
    assert not eval_photos & train_photos
    first = [x for _, x in ev]
    again = [x for _, x in data.build_dataset("sample-photos", split="eval", resolution=64, crop="gsq")]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for image_id, img in zip(ev.ids, first):
        assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
        f = img.float()
        for i, j in ((0, 1), (1, 2), (0, 2)):  # a real colour photo: no two channels alike
            assert (f[i] - f[j]).abs().mean() > 2.0, (image_id, i, j)
    assert len({x.float().mean().item() for x in first}) == len(first)  # distinct photos


def test_sample_photos_train_crops_seeded():
    a = data.build_dataset("sample-photos", split="train", resolution=32, n=6, seed=1)
    b = data.build_dataset("sample-photos", split="train", resolution=32, n=6, seed=1)
    c = data.build_dataset("sample-photos", split="train", resolution=32, n=6, seed=2)
    xa, xb, xc = ([x for _, x in d] for d in (a, b, c))
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))
    assert all(x.shape == (3, 32, 32) for x in xa)
    assert len(data.build_dataset("sample-photos", split="train", resolution=32)) == 1024
    with pytest.raises(UserError, match="data.n"):
        data.build_dataset("sample-photos", split="eval", resolution=32, n=99)


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_per_id_and_split():
    a = data.build_dataset("synthetic", split="eval", resolution=24, n=4, seed=7)
    b = data.build_dataset("synthetic", split="eval", resolution=24, n=6, seed=7)
    t = data.build_dataset("synthetic", split="train", resolution=24, n=4, seed=7)
    assert a.ids == b.ids[:4] and not set(a.ids) & set(t.ids)
    for i in range(4):
        assert torch.equal(a[i][1], b[i][1])
        assert not torch.equal(a[i][1], t[i][1])
    assert not torch.equal(a[0][1], a[1][1])
    assert a[0][1].dtype == torch.uint8 and a[0][1].shape == (3, 24, 24)
    assert a[0][1].float().std() > 10  # not a flat image


def test_build_dataset_rejects_bad_arguments():
    with pytest.raises(UserError, match="did you mean 'synthetic'"):
        data.build_dataset("synthetc", resolution=8)
    with pytest.raises(UserError, match="data.crop"):
        data.build_dataset("synthetic", resolution=8, crop="center")
    with pytest.raises(UserError, match="data.split"):
        data.build_dataset("synthetic", resolution=8, split="val")
    for bad in (0, -3):
        with pytest.raises(UserError, match="data.n"):
            data.build_dataset("synthetic", resolution=8, n=bad)
    with pytest.raises(UserError, match="data.resolution"):
        data.build_dataset("synthetic", resolution=0)


def test_to_model_input_range():
    u8 = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    assert torch.allclose(data.to_model_input(u8), torch.tensor([-1.0, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0]), atol=1e-6)


# --------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_each_index_exactly_once(n, world):
    shards = [data.shard_indices(n, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # no padding, nothing dropped, no duplicates
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:
        assert s == list(range(s[0], s[0] + len(s))) if s else True  # contiguous
    with pytest.raises(ValueError):
        data.shard_indices(n, world, world)


# --------------------------------------------------------------------------------------------- train loader
def test_train_loader_resumes_exactly_and_splits_ranks():
    ds = data.build_dataset("synthetic", split="train", resolution=8, n=7, seed=0)
    full = data.train_loader(ds, batch_size=2, seed=11)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    assert full.state_dict()["step"] == 6
    resumed = data.train_loader(ds, batch_size=2, seed=11)
    resumed.load_state_dict({"step": 3, "seed": 11, "batch_size": 2, "world": 1})
    it2 = iter(resumed)
    for k in (3, 4, 5):
        ids, x = next(it2)
        assert ids == batches[k][0] and torch.equal(x, batches[k][1])
    assert batches[0][1].dtype == torch.uint8 and batches[0][1].shape == (2, 3, 8, 8)
    # every epoch of the stream is a permutation of the dataset (positions 0..6, 7..13)
    stream = [i for b in batches for i in b[0]]
    assert sorted(stream[:7]) == sorted(ds.ids) and sorted(stream[7:12]) == sorted(set(stream[7:12]))
    assert data.train_loader(ds, 2, seed=12).indices(0) != full.indices(0) or \
        data.train_loader(ds, 2, seed=12).indices(1) != full.indices(1)
    # two ranks: rank r takes the r-th block of each global batch of 2 × 2
    r0, r1 = data.train_loader(ds, 2, 11, rank=0, world=2), data.train_loader(ds, 2, 11, rank=1, world=2)
    assert r0.indices(0) == full.indices(0) and r1.indices(0) == full.indices(1)
    assert r0.indices(1) == full.indices(2) and r1.indices(1) == full.indices(3)


def test_train_loader_with_workers_matches_in_process():
    ds = data.build_dataset("synthetic", split="train", resolution=8, n=5, seed=0)
    loader = data.train_loader(ds, 3, seed=4, num_workers=1)
    it = iter(loader)
    got = [next(it) for _ in range(2)]
    del it
    for k, (ids, x) in enumerate(got):
        ref_ids, ref_x = loader.batch(k)
        assert ids == ref_ids and torch.equal(x, ref_x)


def test_describe_names_what_was_done():
    ev = data.build_dataset("sample-photos", split="eval", resolution=32, crop="adm").describe()
    assert (ev["dataset"], ev["split"], ev["n"], ev["crop"], ev["resolution"]) == ("sample-photos", "eval", 5, "adm", 32)
    gsq = data.build_dataset("sample-photos", split="eval", resolution=32).describe()
    assert gsq["crop"] == "gsq" and gsq["crop_pct"] == 0.875 and gsq["ids_sha256"] == ev["ids_sha256"]
    assert data.build_dataset("sample-photos", split="train", resolution=32, n=3).describe()["crop"] == \
        "seeded-random-crop"
    assert data.build_dataset("synthetic", resolution=8, n=2).describe()["crop"].startswith("none")
