"""Datasets and crop protocols: every image leaves here as `(image_id, uint8 tensor (3, S, S))`.

Follows metrics-protocol.md §2 (crop protocols) and §10 (sharding), gsq-reference.md §5.5 (training data).

Crop protocols (on PIL images, decoded to RGB first):
- `gsq`: timm eval transform with crop_pct 0.875: PIL bilinear (antialiased) resize of the shorter side to
  floor(S / 0.875) (292 for 256), long side int(292·long/short) (torchvision `Resize(int)`), then a
  torchvision-style centre crop with offsets int(round((H − S)/2)), int(round((W − S)/2)) (Python rounding).
- `adm`: ADM `center_crop_arr`: halve with PIL BOX while the shorter side ≥ 2S, PIL BICUBIC resize so the
  shorter side is S (sizes rounded), crop at floor offsets (H − S)//2, (W − S)//2.
- `train`: the official training transform (timm `create_transform(is_training=True, no_aug=True)`): PIL
  bilinear resize of the shorter side to S, centre crop S. No random crop, no flip.

Kinds:
- `sample-photos`: real colour photographs bundled in installed wheels (scikit-image's `skimage/data/` files
  and matplotlib's `mpl-data/sample_data`), read by path with PIL, never through pooch or the network. Train and
  eval use disjoint, fixed photo lists. Eval images are the crop protocol applied to each photo. Because five
  photos are too few to train on, the train split is `n` virtual samples (default 1024): sample i is a random
  crop of photo i mod 5, rescaled so its shorter side is uniform in [S, shorter side] (bilinear) and cropped
  S×S at a uniform position, all drawn from a generator seeded by (seed, i), so sample i is always the same.
- `image-folder`: every jpg/jpeg/png/bmp/webp/tif/tiff file under a directory, recursively (ImageNet layout
  with class subfolders works as is), ids = relative POSIX paths, sorted. Files are header-checked when the
  dataset is built: unreadable files are skipped with a counted warning, or refused (UserError) with
  `strict=True`. A file whose body fails to decode later raises a UserError naming it (skipping at read time
  would change the set mid-run). Conversion to RGB uint8: grayscale/bilevel are replicated, palette images
  are expanded, 16-bit grayscale is scaled by 255/65535 with rounding (16-bit RGB files reach us already
  reduced by Pillow to their high byte, within one level of that), images with alpha (RGBA, LA, palette with
  transparency) are composited over WHITE. EXIF orientation is not applied (as in timm/torchvision).
  `n` picks n evenly spaced files (floor(i·N/n)), so a subset spans all classes instead of the first few.
- `synthetic`: procedural images (smooth colour gradient + a few flat shapes + mild noise), a pure function of
  (seed, split, index), so any id regenerates bit-exactly.

Several crops per image (`crops_per_image` C > 1, sample-photos eval and image-folder): crop 0 of every image is
the crop protocol's (its id unchanged), crops 1..C−1 are seeded random crops of the decoded original (shorter side
rescaled, PIL bilinear antialiased, to a uniform size in [S, shorter side], then an S×S window at a uniform
position), drawn from a generator seeded by (seed, SHA-256 of the image id, crop index), so a crop never depends
on which other images are in the set. Ids `<id>#crop<j>`; order crop-major (every image's crop 0 first), so the
first samples saved are the protocol crops. Five held-out photos give few tokens; their crops give enough for
codebook usage to be measurable (metrics-protocol §8: 5·V tokens per group).

Sharding (`shard_indices`) gives contiguous, possibly uneven shards: every index exactly once, no padding.
`train_loader` yields batches as a pure function of (seed, batch counter), so training resumes exactly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gsqbench.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

DATASET_KINDS = ("sample-photos", "image-folder", "synthetic")
CROP_PROTOCOLS = ("gsq", "adm", "train")
SPLITS = ("train", "eval")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
GSQ_CROP_PCT = 0.875
DEFAULT_VIRTUAL_TRAIN_SIZE = 1024
DEFAULT_SYNTHETIC_EVAL_SIZE = 64

# Protocol card fields per crop protocol (metrics-protocol.md §12, Data group).
CROP_CARDS: dict[str, dict] = {
    "gsq": {"crop_pct": GSQ_CROP_PCT, "resize": "PIL bilinear (antialiased), shorter side floor(S/0.875)",
            "crop_offsets": "int(round((H-S)/2))"},
    "adm": {"crop_pct": None, "resize": "PIL BOX halving while short >= 2S, then PIL bicubic to S",
            "crop_offsets": "(H-S)//2"},
    "train": {"crop_pct": 1.0, "resize": "PIL bilinear (antialiased), shorter side S",
              "crop_offsets": "int(round((H-S)/2))"},
}

# ---------------------------------------------------------------------------------------------------------------
# Decoding and crop protocols
# ---------------------------------------------------------------------------------------------------------------


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (16-bit scaled with rounding, alpha composited over white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # PIL's own convert clips 16-bit values at 255; scale the full 16-bit range instead.
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode == "F":  # float images: assumed to be on the 0–255 scale
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    return img.convert("RGB")


def _resize_short_side(img: Image.Image, short: int, resample: int) -> Image.Image:
    """torchvision `Resize(int)` on PIL: shorter side → `short`, longer → int(short·long/shorter); no-op if equal."""
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return img if size == (w, h) else img.resize(size, resample=resample)


def center_crop_box(width: int, height: int, size: int, rounding: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the S×S centre crop; 'round' = torchvision, 'floor' = ADM."""
    if rounding == "round":
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return left, top, left + size, top + size


def crop_gsq(img: Image.Image, size: int) -> Image.Image:
    resized = _resize_short_side(img, math.floor(size / GSQ_CROP_PCT), Image.BILINEAR)
    return resized.crop(center_crop_box(*resized.size, size, "round"))


def crop_train(img: Image.Image, size: int) -> Image.Image:
    resized = _resize_short_side(img, size, Image.BILINEAR)
    return resized.crop(center_crop_box(*resized.size, size, "round"))


def crop_adm(img: Image.Image, size: int) -> Image.Image:
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    return img.crop(center_crop_box(*img.size, size, "floor"))


_CROPS = {"gsq": crop_gsq, "adm": crop_adm, "train": crop_train}


def pil_to_u8(img: Image.Image) -> Tensor:
    """RGB PIL image → uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def apply_crop(img: Image.Image, protocol: str, size: int) -> Tensor:
    """Decoded image (any mode) → canonical uint8 (3, S, S) under a crop protocol."""
    _check_choice("data.crop", protocol, CROP_PROTOCOLS)
    out = pil_to_u8(_CROPS[protocol](to_rgb(img), size))
    assert out.shape == (3, size, size), out.shape
    return out


def to_model_input(images_u8: Tensor) -> Tensor:
    """uint8 (b, 3, H, W) → float in [-1, 1]: x = u8 / 127.5 − 1 (contracts.md)."""
    return images_u8.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------------------


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Contiguous shard of range(n) for `rank`: sizes differ by at most one, no padding, nothing dropped."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_indices: rank {rank} is not in [0, world) for world size {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{field}: unknown value '{value}'{did_you_mean(str(value), choices)}")


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image_id, uint8 (3, S, S)); subclasses fill `ids` and implement `load(i)`."""

    kind = "base"

    def __init__(self, *, split: str, resolution: int, crop: str):
        self.split, self.resolution, self.crop = split, resolution, crop
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        return self.ids[index], self.load(index)

    def load(self, index: int) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """Data fields of the protocol card."""
        return {"dataset": self.kind, "split": self.split, "n": len(self), "resolution": self.resolution,
                "crop": self.crop, **CROP_CARDS.get(self.crop, {}),
                "ids_sha256": hashlib.sha256("\n".join(self.ids).encode()).hexdigest()}

    def original(self, index: int) -> Image.Image:
        """The decoded RGB original of image `index` (for extra crops); datasets generated at S have none."""
        raise UserError(f"data.crops_per_image: data.kind {self.kind} has no originals to crop; use data.limit")


def random_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Shorter side rescaled to U[S, shorter side] (PIL bilinear, antialiased), then an S×S window at a uniform
    position (the sample-photos training crops and the extra evaluation crops).

    The rescaled photo is never built: only the window is resampled, from the matching box of the original
    (PIL `resize(box=...)`, the same filter; within a level or two of resize-then-crop, tests/test_fairness.py).
    At 32×32 crops of ~500-pixel photos that is most of the cost of a demo training step saved.
    """
    w, h = img.size
    short = int(rng.integers(size, max(size, min(w, h)) + 1))
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # torchvision Resize(int)
    left = int(rng.integers(0, nw - size + 1))
    top = int(rng.integers(0, nh - size + 1))
    if (nw, nh) == (w, h):
        return img.crop((left, top, left + size, top + size))
    sx, sy = w / nw, h / nh
    return img.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))


class MultiCrop(ImageDataset):
    """`crops` crops of every image of `base` (module docstring): crop 0 is the base's own, the others seeded
    random crops of its originals; crop-major order."""

    def __init__(self, base: ImageDataset, crops: int, seed: int):
        super().__init__(split=base.split, resolution=base.resolution, crop=base.crop)
        self.base, self.crops, self.seed, self.kind = base, crops, seed, base.kind
        n = len(base)
        self.ids = [base.ids[b] if j == 0 else f"{base.ids[b]}#crop{j}" for j in range(crops) for b in range(n)]

    def load(self, index: int) -> Tensor:
        j, b = divmod(index, len(self.base))
        if j == 0:
            return self.base.load(b)
        id_key = int.from_bytes(hashlib.sha256(self.base.ids[b].encode("utf-8")).digest()[:8], "big")
        rng = np.random.default_rng([self.seed, id_key, j])
        return pil_to_u8(random_crop(self.base.original(b), self.resolution, rng))

    def describe(self) -> dict:
        return {**self.base.describe(), "n": len(self), "n_originals": len(self.base), "crops_per_image": self.crops,
                "extra_crops": "seeded random: shorter side ~ U[S, short] (PIL bilinear), uniform S x S window",
                "crop_seed": self.seed, "ids_sha256": hashlib.sha256("\n".join(self.ids).encode()).hexdigest()}


# --- sample photos ---------------------------------------------------------------------------------------------

# (id, package, file). Disjoint fixed lists; only real colour photographs (no grayscale, charts or logos).
SAMPLE_PHOTOS_EVAL = (("astronaut", "skimage", "astronaut.png"), ("chelsea", "skimage", "chelsea.png"),
                      ("coffee", "skimage", "coffee.png"), ("grace_hopper", "matplotlib", "grace_hopper.jpg"),
                      ("rocket", "skimage", "rocket.jpg"))
SAMPLE_PHOTOS_TRAIN = (("hubble_deep_field", "skimage", "hubble_deep_field.jpg"), ("ihc", "skimage", "ihc.png"),
                       ("motorcycle_left", "skimage", "motorcycle_left.png"),
                       ("motorcycle_right", "skimage", "motorcycle_right.png"), ("retina", "skimage", "retina.jpg"))


def sample_photo_path(package: str, filename: str) -> Path:
    """Path of a photo inside an installed wheel (no fetchers: they may try the network)."""
    if package == "skimage":
        import skimage

        path = Path(skimage.__file__).parent / "data" / filename
    else:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / filename
    if not path.is_file():
        raise UserError(f"data.kind sample-photos: bundled photo {path} is missing; reinstall {package}")
    return path


@lru_cache(maxsize=16)
def _decoded_photo(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode before the file closes
        return to_rgb(img).copy()


class SamplePhotos(ImageDataset):
    kind = "sample-photos"

    def __init__(self, *, split: str, resolution: int, crop: str, n: Optional[int], seed: int):
        super().__init__(split=split, resolution=resolution, crop=crop)
        self.seed = seed
        if split == "eval":
            if n is not None and n > len(SAMPLE_PHOTOS_EVAL):
                raise UserError(f"data.n: {n} exceeds the {len(SAMPLE_PHOTOS_EVAL)} sample-photos eval images "
                                "(data.crops_per_image evaluates several crops of each)")
            self.photos = SAMPLE_PHOTOS_EVAL[: n or len(SAMPLE_PHOTOS_EVAL)]
            self.ids = [p[0] for p in self.photos]
        else:
            self.photos = SAMPLE_PHOTOS_TRAIN
            count = DEFAULT_VIRTUAL_TRAIN_SIZE if n is None else n
            self.ids = [f"{self.photos[i % len(self.photos)][0]}#{i:06d}" for i in range(count)]

    def _photo(self, index: int) -> Image.Image:
        _, package, filename = self.photos[index % len(self.photos)]
        return _decoded_photo(str(sample_photo_path(package, filename)))

    def original(self, index: int) -> Image.Image:
        if self.split == "train":  # its samples are random crops already: more of them is data.limit
            return super().original(index)
        return self._photo(index)

    def load(self, index: int) -> Tensor:
        img = self._photo(index)
        if self.split == "eval":
            return apply_crop(img, self.crop, self.resolution)
        return pil_to_u8(self._random_crop(img, index))

    def describe(self) -> dict:
        card = super().describe()
        if self.split == "train":  # the crop protocol is not used: seeded random crops (module docstring)
            card.update(crop="seeded-random-crop", crop_pct=None, resize="PIL bilinear, shorter side ~ U[S, short]",
                        crop_offsets="uniform")
        return card

    def _random_crop(self, img: Image.Image, index: int) -> Image.Image:
        return random_crop(img, self.resolution, np.random.default_rng([self.seed, index]))


# --- image folder ----------------------------------------------------------------------------------------------


def _header_ok(path: Path) -> Optional[str]:
    """None if PIL can parse the file's header (and verify() passes), else the error text."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"


def scan_image_folder(root: Path) -> list[Path]:
    """Sorted image files under root (recursive, extension match is case-insensitive)."""
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def evenly_spaced(total: int, n: int) -> list[int]:
    """n indices spread over range(total): floor(i·total/n)."""
    return [i * total // n for i in range(n)]


class ImageFolder(ImageDataset):
    kind = "image-folder"

    def __init__(self, root: str | os.PathLike, *, split: str, resolution: int, crop: str, n: Optional[int],
                 strict: bool = False, check_workers: int = 8):
        super().__init__(split=split, resolution=resolution, crop=crop)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(f"data.path: directory '{self.root}' does not exist")
        files = scan_image_folder(self.root)
        if not files:
            raise UserError(f"data.path: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{self.root}'")
        files, self.skipped = self._drop_corrupt(files, strict, check_workers)
        if n is not None:
            if n > len(files):
                raise UserError(f"data.n: {n} exceeds the {len(files)} readable images under '{self.root}'")
            files = [files[i] for i in evenly_spaced(len(files), n)]
        self.files = files
        self.ids = [p.relative_to(self.root).as_posix() for p in files]

    def _drop_corrupt(self, files: list[Path], strict: bool, workers: int) -> tuple[list[Path], list[str]]:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            errors = list(pool.map(_header_ok, files))
        bad = [(f, e) for f, e in zip(files, errors) if e is not None]
        if bad and strict:
            raise UserError(f"data.path: unreadable image '{bad[0][0]}' ({bad[0][1]}); "
                            "remove it or run without strict to skip unreadable files")
        if bad:
            log.warning("skipped %d unreadable image file(s) under %s (first: %s: %s)",
                        len(bad), self.root, bad[0][0], bad[0][1])
        good = [f for f, e in zip(files, errors) if e is None]
        if not good:
            raise UserError(f"data.path: none of the {len(files)} image files under '{self.root}' is readable")
        return good, [str(f.relative_to(self.root).as_posix()) for f, _ in bad]

    def load(self, index: int) -> Tensor:
        return apply_crop(self.original(index), self.crop, self.resolution)

    def original(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img).copy()
        except (OSError, ValueError, SyntaxError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"data.path: cannot decode image '{path}' ({type(exc).__name__}: {exc}); "
                            "remove or replace the file") from None

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "skipped_unreadable": len(self.skipped)}


# --- synthetic -------------------------------------------------------------------------------------------------


def synthetic_image(seed: int, split: str, index: int, size: int) -> Tensor:
    """Smooth 4-corner colour gradient + 2–5 flat discs/rectangles + N(0, 3) noise; uint8 (3, S, S)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    t = np.linspace(0.0, 1.0, size)
    corners = rng.uniform(0, 255, size=(4, 3))
    wy, wx = t[:, None, None], t[None, :, None]
    img = ((1 - wy) * ((1 - wx) * corners[0] + wx * corners[1])
           + wy * ((1 - wx) * corners[2] + wx * corners[3]))  # (S, S, 3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * rng.uniform(0.4, 1.0))
        img[mask] = rng.uniform(0, 255, size=3)
    img = img + rng.normal(0.0, 3.0, size=img.shape)
    return torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


class Synthetic(ImageDataset):
    kind = "synthetic"

    def __init__(self, *, split: str, resolution: int, crop: str, n: Optional[int], seed: int):
        super().__init__(split=split, resolution=resolution, crop=crop)
        self.seed = seed
        default = DEFAULT_VIRTUAL_TRAIN_SIZE if split == "train" else DEFAULT_SYNTHETIC_EVAL_SIZE
        self.ids = [f"synthetic-{split}-{i:06d}" for i in range(default if n is None else n)]

    def load(self, index: int) -> Tensor:
        # Generated directly at S×S: there is no original to crop, so the crop protocol is moot here.
        return synthetic_image(self.seed, self.split, index, self.resolution)

    def describe(self) -> dict:
        return {**super().describe(), "crop": "none (generated at S)", "crop_pct": None, "resize": None,
                "crop_offsets": None, "seed": self.seed}


def build_dataset(kind: Any, *, path: str | os.PathLike | None = None, split: Optional[str] = None,
                  resolution: Optional[int] = None, crop: Optional[str] = None, n: Optional[int] = None,
                  seed: int = 0, strict: bool = False, crops_per_image: int = 1) -> ImageDataset:
    """Dataset factory. `crop` defaults to 'gsq' for eval and 'train' for train; `split` defaults to 'eval';
    `crops_per_image` > 1 wraps it in MultiCrop (module docstring).

    `kind` may also be a config object with attributes kind, path, size, crop, limit, strict (and optionally
    split, seed); explicit keyword arguments win. Without a `split` its crop decides: 'train' → train split.
    """
    if not isinstance(kind, str) and hasattr(kind, "kind"):
        return _build_from_spec(kind, path=path, split=split, resolution=resolution, crop=crop, n=n, seed=seed,
                                strict=strict, crops_per_image=crops_per_image if crops_per_image != 1 else None)
    split = split or "eval"
    if resolution is None:
        raise UserError("data.resolution: missing; expected a positive integer (image side S)")
    _check_choice("data.kind", kind, DATASET_KINDS)
    _check_choice("data.split", split, SPLITS)
    crop = crop or ("train" if split == "train" else "gsq")
    _check_choice("data.crop", crop, CROP_PROTOCOLS)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise UserError(f"data.resolution: {resolution!r} is not valid; expected a positive integer")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise UserError(f"data.n: {n!r} is not valid; expected a positive integer or null (all)")
    if not isinstance(crops_per_image, int) or isinstance(crops_per_image, bool) or crops_per_image < 1:
        raise UserError(f"data.crops_per_image: {crops_per_image!r} is not valid; expected a positive integer")
    if kind == "image-folder":
        if path is None:
            raise UserError("data.path: required for data.kind image-folder (a directory of images)")
        ds: ImageDataset = ImageFolder(path, split=split, resolution=resolution, crop=crop, n=n, strict=strict)
    else:
        cls = SamplePhotos if kind == "sample-photos" else Synthetic
        ds = cls(split=split, resolution=resolution, crop=crop, n=n, seed=seed)
    if crops_per_image == 1:
        return ds
    if kind == "synthetic" or (kind == "sample-photos" and split == "train"):
        ds.original(0)  # raises the UserError naming the field
    return MultiCrop(ds, crops_per_image, seed)


def _build_from_spec(spec: Any, **overrides: Any) -> ImageDataset:
    """build_dataset from a config object (gsqbench.config.DataSource-like)."""
    crop = overrides["crop"] or getattr(spec, "crop", None)
    split = overrides["split"] or getattr(spec, "split", None) or ("train" if crop == "train" else "eval")
    return build_dataset(
        spec.kind, path=overrides["path"] or getattr(spec, "path", None), split=split,
        resolution=overrides["resolution"] or getattr(spec, "size", None) or getattr(spec, "resolution", None),
        crop=crop, n=overrides["n"] if overrides["n"] is not None else getattr(spec, "limit", None),
        seed=overrides["seed"] or getattr(spec, "seed", 0) or 0,
        strict=overrides["strict"] or bool(getattr(spec, "strict", False)),
        crops_per_image=overrides.get("crops_per_image") or getattr(spec, "crops_per_image", 1) or 1)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic, resumable training batches
# ---------------------------------------------------------------------------------------------------------------


def _collate(items: list[tuple[str, Tensor]]) -> tuple[list[str], Tensor]:
    return [i for i, _ in items], torch.stack([x for _, x in items])


class _BatchIndexStream(torch.utils.data.Sampler):
    """Infinite batch sampler: this rank's indices for batch k, k+1, ... (a pure function of the counter)."""

    def __init__(self, loader: "TrainLoader", start: int):
        self.loader, self.start = loader, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.loader.indices(step)
            step += 1


class TrainLoader:
    """Infinite stream of (ids, uint8 (B, 3, S, S)) batches for one rank.

    The global sample order is the concatenation of per-epoch permutations of range(N), permutation e seeded by
    (seed, e); global batch k covers positions [k·B·W, (k+1)·B·W) of that stream (batches may straddle epochs,
    so datasets smaller than a batch work) and rank r takes the r-th block of B. `step` counts batches drawn
    (not optimiser steps); `state_dict()`/`load_state_dict()` or `start_step` resume exactly.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, *,
                 start_step: int = 0, num_workers: int = 0, pin_memory: bool = False):
        if batch_size < 1:
            raise UserError(f"train.batch_size: {batch_size} is not valid; expected a positive integer")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"train_loader: rank {rank} is not in [0, world) for world size {world}")
        if len(dataset) == 0:
            raise UserError("data: the training dataset is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.step = rank, world, start_step
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint64)
            g = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's part of global batch `step`."""
        n, b = len(self.dataset), self.batch_size
        start = (step * self.world + self.rank) * b
        return [int(self._perm(pos // n)[pos % n]) for pos in range(start, start + b)]

    def batch(self, step: int) -> tuple[list[str], Tensor]:
        """Batch `step`, loaded in this process (no workers)."""
        return _collate([self.dataset[i] for i in self.indices(step)])

    def __iter__(self) -> Iterator[tuple[list[str], Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_BatchIndexStream(self, self.step), num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.pin_memory)
        for item in loader:
            self.step += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "batch_size", "world"):
            if int(state[key]) != getattr(self, key):
                log.warning("resuming data order with %s %s (checkpoint had %s): the sample order changes",
                            key, getattr(self, key), state[key])
        self.step = int(state["step"])


def train_loader(dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 **kwargs) -> TrainLoader:
    """The training batch stream for one rank (see TrainLoader)."""
    return TrainLoader(dataset, batch_size, seed, rank, world, **kwargs)
