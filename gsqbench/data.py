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
- `torchvision`: torchvision `Resize(S)` + `CenterCrop(S)` on PIL images, the eval transform of Open-MAGVIT2
  (magvit2-compat); the same operations as `train`, named for what it reproduces.
- `torchvision-bicubic`: `Resize(S, BICUBIC, antialias=True)` + `CenterCrop(S)` (1d-tokenizer; maskgit-compat).
- `albumentations`: `SmallestMaxSize(S)` (cv2 INTER_LINEAR: bilinear, half-pixel centres, no antialiasing,
  restated in float and rounded) + `CenterCrop(S)` at floor offsets (taming's validation data; taming-compat).

Kinds:
- `sample-photos`: real colour photographs bundled in installed wheels (scikit-image's `skimage/data/` files
  and matplotlib's `mpl-data/sample_data`), read by path with PIL, never through pooch or the network. Train and
  eval use disjoint, fixed photo lists. Eval images are the crop protocol applied to each photo. Because five
  photos are too few to train on, the train split is `n` virtual samples (default 1024): sample i is a random
  crop of photo i mod 5, rescaled so its shorter side is uniform in [S, shorter side] (bilinear) and cropped
  S×S at a uniform position, all drawn from a generator seeded by (seed, i), so sample i is always the same.
- `image-folder`: every jpg/jpeg/png/bmp/webp/tif/tiff file under a directory, recursively (ImageNet layout
  with class subfolders works as is), ids = relative POSIX paths, sorted. Building the dataset opens no file: it
  reads the folder's manifest (gsqbench.manifest: paths, sizes, mtimes, cached and reused). Files known to be bad
  (empty, or found unreadable by `gsqbench data check` or an earlier evaluation) are skipped with a counted
  warning, or refused (UserError) with `strict=True`; known sizes below `min_size` are refused. A file that fails
  to decode when read is reported by `read()` as a `Sample` without image, and the caller applies the policy
  (README "Corrupt and small images"). Conversion to RGB uint8: grayscale/bilevel are replicated, palette images
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
Decoding runs in DataLoader worker processes (`resolve_num_workers`: chosen from the cores unless given), with
prefetching and pinned memory on CUDA; the worker count never changes a result.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gsqbench.errors import UserError, did_you_mean
from gsqbench.manifest import IMAGE_EXTENSIONS
from gsqbench.results import CROP_ID_MARK, original_image_id

log = logging.getLogger(__name__)

DATASET_KINDS = ("sample-photos", "image-folder", "synthetic")
CROP_PROTOCOLS = ("gsq", "adm", "train", "torchvision", "torchvision-bicubic", "albumentations")
SPLITS = ("train", "eval")
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
    "torchvision": {"crop_pct": 1.0, "resize": "torchvision Resize(S): PIL bilinear (antialiased), shorter side S",
                    "crop_offsets": "int(round((H-S)/2))"},
    "torchvision-bicubic": {"crop_pct": 1.0, "resize": "torchvision Resize(S, BICUBIC, antialias): PIL bicubic, "
                                                         "shorter side S", "crop_offsets": "int(round((H-S)/2))"},
    "albumentations": {"crop_pct": 1.0, "resize": "SmallestMaxSize(S): bilinear, half-pixel centres, no antialiasing "
                                                  "(float, rounded half-even), sizes round(S*side/short)",
                       "crop_offsets": "(H-S)//2"},
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


def crop_torchvision_bicubic(img: Image.Image, size: int) -> Image.Image:
    resized = _resize_short_side(img, size, Image.BICUBIC)
    return resized.crop(center_crop_box(*resized.size, size, "round"))


def crop_albumentations(img: Image.Image, size: int) -> Image.Image:
    """albumentations SmallestMaxSize(S) + CenterCrop(S) (taming's validation data): cv2 INTER_LINEAR, i.e. bilinear
    with half-pixel centres and no antialiasing, restated in float (cv2 rounds fixed-point weights: ±1 level)."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = (size, int(round(h * scale))) if w <= h else (int(round(w * scale)), size)
    if (new_w, new_h) != (w, h):
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)[None].double()
        y = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                            antialias=False)
        arr = torch.round(y[0]).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr, "RGB")
    return img.crop(center_crop_box(*img.size, size, "floor"))


def crop_adm(img: Image.Image, size: int) -> Image.Image:
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    return img.crop(center_crop_box(*img.size, size, "floor"))


_CROPS = {"gsq": crop_gsq, "adm": crop_adm, "train": crop_train, "torchvision": crop_train,
          "torchvision-bicubic": crop_torchvision_bicubic, "albumentations": crop_albumentations}


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


class Sample(NamedTuple):
    """One read image: the uint8 (3, S, S) crop, or None with the reason when the file cannot be used.

    `width`/`height` are the original size before the crop protocol (−1 unknown); `problem` is `unreadable`
    (decode failed) or `too-small` (shorter side below the dataset's `min_size`).
    """

    image_id: str
    image: Optional[Tensor]
    width: int = -1
    height: int = -1
    error: Optional[str] = None
    problem: Optional[str] = None


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image_id, uint8 (3, S, S)); subclasses fill `ids` and implement `load(i)`.

    `read(i)` is what the evaluator and the training stream call: it never raises for a bad file but returns a
    `Sample` saying what went wrong, so the caller applies one policy on every rank (README "Corrupt images").
    """

    kind = "base"
    ids: list[str]
    strict: bool = False
    min_size: Optional[int] = None

    def __init__(self, *, split: str, resolution: int, crop: str):
        self.split, self.resolution, self.crop = split, resolution, crop

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        sample = self.read(index)
        if sample.image is None:
            raise UserError(problem_message(self, sample))
        return sample.image_id, sample.image

    def image_id(self, index: int) -> str:
        return self.ids[index]

    def read(self, index: int) -> Sample:
        return Sample(self.image_id(index), self.load(index))

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
        base_ids = base.ids  # once: an image folder builds its id list on each access
        self.ids = [i if j == 0 else f"{i}{CROP_ID_MARK}{j}" for j in range(crops) for i in base_ids]

    # the corrupt/small-image policy is the base's (README "Corrupt and small images")
    strict = property(lambda self: self.base.strict)
    min_size = property(lambda self: self.base.min_size)
    root = property(lambda self: getattr(self.base, "root", None))

    def read(self, index: int) -> Sample:
        j, b = divmod(index, len(self.base))
        if j == 0:
            return self.base.read(b)
        image_id = self.ids[index]
        img = _checked_original(image_id, lambda: self.base.original(b), self.min_size)
        if isinstance(img, Sample):
            return img
        w, h = img.size
        id_key = int.from_bytes(hashlib.sha256(self.base.image_id(b).encode("utf-8")).digest()[:8], "big")
        rng = np.random.default_rng([self.seed, id_key, j])
        return Sample(image_id, pil_to_u8(random_crop(img, self.resolution, rng)), w, h)

    def record_read_results(self, results: Sequence[tuple[str, Optional[str]]]) -> None:
        record = getattr(self.base, "record_read_results", None)
        if record is not None:  # every crop of a bad file is bad: the manifest holds the file once
            record(sorted({(original_image_id(i), r) for i, r in results}))

    def describe(self) -> dict:
        return {**self.base.describe(), "n": len(self), "n_originals": len(self.base), "crops_per_image": self.crops,
                "extra_crops": "seeded random: shorter side ~ U[S, short] (PIL bilinear), uniform S x S window",
                "crop_seed": self.seed, "ids_sha256": hashlib.sha256("\n".join(self.ids).encode()).hexdigest()}


def _checked_original(image_id: str, decode: Callable[[], Image.Image], min_size: Optional[int]
                      ) -> Image.Image | Sample:
    """The decoded original, or the Sample saying why it cannot be used (never raises for a bad file: DataLoader
    workers would turn that into a multi-line error; a UserError, e.g. a missing bundled photo, still propagates)."""
    try:
        img = decode()
    except UserError:
        raise
    except Exception as exc:  # PIL raises many types for bad files; all mean "cannot be read"
        return Sample(image_id, None, error=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300],
                      problem="unreadable")
    w, h = img.size
    if min_size is not None and min(w, h) < min_size:
        return Sample(image_id, None, w, h, error=f"{w}x{h}", problem="too-small")
    return img


def problem_message(dataset: Any, sample: Sample) -> str:
    """The one-line error for a sample that cannot be used (unreadable, or smaller than --min-size)."""
    root = getattr(dataset, "root", None)
    where = str(Path(root) / sample.image_id) if root is not None else sample.image_id
    if sample.problem == "too-small":
        return _too_small_message(where, sample.width, sample.height, int(getattr(dataset, "min_size", 0) or 0), 1)
    return (f"data.path: cannot decode image '{where}' ({sample.error}); remove or replace the file, or run "
            "without --strict-data to skip unreadable files with a count")


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

    def read(self, index: int) -> Sample:
        w, h = self._photo(index).size
        return Sample(self.ids[index], self.load(index), w, h)

    def describe(self) -> dict:
        card = super().describe()
        if self.split == "train":  # the crop protocol is not used: seeded random crops (module docstring)
            card.update(crop="seeded-random-crop", crop_pct=None, resize="PIL bilinear, shorter side ~ U[S, short]",
                        crop_offsets="uniform")
        return card

    def _random_crop(self, img: Image.Image, index: int) -> Image.Image:
        return random_crop(img, self.resolution, np.random.default_rng([self.seed, index]))


# --- image folder ----------------------------------------------------------------------------------------------


def evenly_spaced(total: int, n: int) -> list[int]:
    """n indices spread over range(total): floor(i·total/n)."""
    return [i * total // n for i in range(n)]


def _decode(path: Path) -> Image.Image:
    """Open and fully decode one file to RGB (any failure here means the file cannot be read)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class ImageFolder(ImageDataset):
    """Image files under a folder, indexed by its manifest (gsqbench.manifest): building opens no file.

    Known-bad files (empty, or found unreadable by `gsqbench data check` or an earlier run) are skipped with a
    counted warning, or refused with `strict`; so are files whose known size is below `min_size`. A file that
    fails to decode later is reported by `read` (never raised there: DataLoader workers would turn it into a
    multi-line error) and handled by the caller's policy.
    """

    kind = "image-folder"

    def __init__(self, root: str | os.PathLike, *, split: str, resolution: int, crop: str, n: Optional[int],
                 strict: bool = False, min_size: Optional[int] = None):
        from gsqbench.manifest import load_manifest, smaller_than

        super().__init__(split=split, resolution=resolution, crop=crop)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(f"data.path: directory '{self.root}' does not exist")
        self.strict, self.min_size = bool(strict), min_size
        manifest = load_manifest(self.root)
        self.manifest_origin = manifest.origin
        if not len(manifest):
            raise UserError(f"data.path: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{self.root}'")
        bad = manifest.bad()
        if bad and strict:
            raise UserError(f"data.path: unreadable image '{self.root / bad[0][0]}' ({bad[0][1]}); "
                            "remove it or run without --strict-data to skip unreadable files")
        if bad:
            log.warning("skipped %d known-unreadable image file(s) under %s (first: %s: %s)",
                        len(bad), self.root, bad[0][0], bad[0][1])
        bad_set = {p for p, _ in bad}
        good = [i for i, p in enumerate(manifest.paths) if p not in bad_set]
        if not good:
            raise UserError(f"data.path: none of the {len(manifest)} image files under '{self.root}' is readable")
        if n is not None:
            if n > len(good):
                raise UserError(f"data.n: {n} exceeds the {len(good)} readable images under '{self.root}'")
            good = [good[i] for i in evenly_spaced(len(good), n)]
        if min_size is not None:
            small = smaller_than(manifest, good, min_size)
            if small:
                raise UserError(_too_small_message(self.root / small[0][0], small[0][1], small[0][2], min_size,
                                                   len(small)))
        self._base = manifest.root  # resolved folder the relative paths hang off
        # one numpy byte array instead of a list of str: DataLoader workers share it without copy-on-write growth
        self._rel = np.array([manifest.paths[i].encode("utf-8") for i in good], dtype=bytes)
        self.skipped = [p for p, _ in bad]

    @property
    def ids(self) -> list[str]:  # type: ignore[override]
        return [p.decode("utf-8") for p in self._rel.tolist()]

    def __len__(self) -> int:
        return len(self._rel)

    def image_id(self, index: int) -> str:
        return self._rel[index].decode("utf-8")

    @property
    def files(self) -> list[Path]:
        return [self._base / i for i in self.ids]

    def read(self, index: int) -> Sample:
        image_id = self.image_id(index)
        img = _checked_original(image_id, lambda: _decode(self._base / image_id), self.min_size)
        if isinstance(img, Sample):
            return img
        w, h = img.size
        return Sample(image_id, apply_crop(img, self.crop, self.resolution), w, h)

    def original(self, index: int) -> Image.Image:
        """The decoded original (for extra crops); raises whatever decoding raises (MultiCrop.read reports it)."""
        return _decode(self._base / self.image_id(index))

    def record_read_results(self, results: Sequence[tuple[str, Optional[str]]]) -> None:
        """Remember files that failed to decode during a run (id, reason) in the manifest, so the next run skips
        them up front (every rank then builds the same, smaller dataset)."""
        from gsqbench.manifest import BAD, record_results

        record_results(self._base, {i: (BAD, reason, -1, -1) for i, reason in results})

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "skipped_unreadable": len(self.skipped)}


def _too_small_message(path: Path | str, w: int, h: int, min_size: int, count: int) -> str:
    more = f" ({count} such images)" if count > 1 else ""
    return (f"--min-size {min_size}: image '{path}' is {w}x{h}, its shorter side is below {min_size}{more}; "
            "remove it or lower --min-size")


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

    def read(self, index: int) -> Sample:
        return Sample(self.ids[index], self.load(index), self.resolution, self.resolution)

    def describe(self) -> dict:
        return {**super().describe(), "crop": "none (generated at S)", "crop_pct": None, "resize": None,
                "crop_offsets": None, "seed": self.seed}


def build_dataset(kind: Any, *, path: str | os.PathLike | None = None, split: Optional[str] = None,
                  resolution: Optional[int] = None, crop: Optional[str] = None, n: Optional[int] = None,
                  seed: int = 0, strict: bool = False, min_size: Optional[int] = None,
                  crops_per_image: int = 1) -> ImageDataset:
    """Dataset factory. `crop` defaults to 'gsq' for eval and 'train' for train; `split` defaults to 'eval';
    `crops_per_image` > 1 wraps it in MultiCrop (module docstring).

    `kind` may also be a config object with attributes kind, path, size, crop, limit, strict (and optionally
    split, seed); explicit keyword arguments win. Without a `split` its crop decides: 'train' → train split.
    `strict`: an unreadable image is an error instead of skipped with a count; `min_size`: images whose shorter
    side is below it are refused (image-folder; README "Corrupt and small images").
    """
    if not isinstance(kind, str) and hasattr(kind, "kind"):
        return _build_from_spec(kind, path=path, split=split, resolution=resolution, crop=crop, n=n, seed=seed,
                                strict=strict, min_size=min_size,
                                crops_per_image=crops_per_image if crops_per_image != 1 else None)
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
    if min_size is not None and (not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 1):
        raise UserError(f"--min-size: {min_size!r} is not valid; expected a positive number of pixels")
    if kind == "image-folder":
        if path is None:
            raise UserError("data.path: required for data.kind image-folder (a directory of images)")
        ds: ImageDataset = ImageFolder(path, split=split, resolution=resolution, crop=crop, n=n, strict=strict,
                                       min_size=min_size)
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
        min_size=overrides["min_size"] if overrides["min_size"] is not None else getattr(spec, "min_size", None),
        crops_per_image=overrides.get("crops_per_image") or getattr(spec, "crops_per_image", 1) or 1)


# ---------------------------------------------------------------------------------------------------------------
# Parallel decoding
# ---------------------------------------------------------------------------------------------------------------

MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    """CPU cores this process may run on, shared among the ranks of this node (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_num_workers(requested: Optional[int], dataset: Any, batch_size: int,
                        n_items: Optional[int] = None) -> int:
    """DataLoader worker processes: `requested` when given, else chosen from the cores.

    Auto: none for data the main process makes faster than a worker could hand it over (the bundled sample
    photos, decoded once and cached; synthetic images up to 64 px) or fewer than four batches of `n_items`
    (default: the dataset's size; starting processes would cost more than it saves); otherwise one per usable
    core but one (the main process runs the model), at most MAX_AUTO_WORKERS. Results never depend on it (tested).
    """
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
            raise UserError(f"data.num_workers: {requested!r} is not valid; expected an integer >= 0 or null (auto)")
        return requested
    n_items = len(dataset) if n_items is None else n_items
    kind = getattr(dataset, "kind", None)
    cheap = kind == "sample-photos" or (kind == "synthetic" and getattr(dataset, "resolution", 0) <= 64)
    if cheap or n_items < 4 * max(1, batch_size):
        return 0
    return max(0, min(MAX_AUTO_WORKERS, usable_cores() - 1))


def loader_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader keyword arguments: prefetching per worker and pinned host memory for CUDA copies."""
    opts: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        opts["prefetch_factor"] = 4  # batches in flight per worker: hides uneven decode times (JPEG sizes vary)
    return opts


# ---------------------------------------------------------------------------------------------------------------
# Deterministic, resumable training batches
# ---------------------------------------------------------------------------------------------------------------


def _collate(items: list[tuple[str, Tensor]]) -> tuple[list[str], Tensor]:
    return [i for i, _ in items], torch.stack([x for _, x in items])


class _Reads(torch.utils.data.Dataset):
    """`dataset.read(i)` (never raises for a bad file) behind the DataLoader's __getitem__."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        read = getattr(self.dataset, "read", None)
        if read is not None:
            return read(index)
        image_id, image = self.dataset[index]
        return Sample(str(image_id), image)


def _collate_samples(items: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(usable samples, problem samples); stacking happens in the caller once problems are handled."""
    return [s for s in items if s.image is not None], [s for s in items if s.image is None]


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
        self.dropped = 0  # unreadable images left out of their batch (logged; see README "Corrupt images")
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
            _Reads(self.dataset), batch_sampler=_BatchIndexStream(self, self.step), collate_fn=_collate_samples,
            **loader_options(self.num_workers, self.pin_memory))
        for good, bad in loader:
            self.step += 1
            if bad:
                self._problems(bad)
            if good:  # a batch whose every image failed is dropped (the step counter still moves on)
                yield [s.image_id for s in good], torch.stack([s.image for s in good])

    def _problems(self, bad: list[Sample]) -> None:
        """Unreadable training images: an error under --strict-data, else dropped from their batch with a count."""
        refused = [s for s in bad if s.problem == "too-small" or getattr(self.dataset, "strict", False)]
        if refused:
            raise UserError(problem_message(self.dataset, refused[0]))
        self.dropped += len(bad)
        # not recorded in the manifest: the next build would leave the file out and change the sample order of a
        # resumed run; `gsqbench data check` (or an evaluation) records it
        log.warning("dropped %d unreadable training image(s) from batch %d (%d so far; first: %s: %s)",
                    len(bad), self.step - 1, self.dropped, bad[0].image_id, bad[0].error)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "world": self.world,
                "n": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        current = {"seed": self.seed, "batch_size": self.batch_size, "world": self.world, "n": len(self.dataset)}
        for key, value in current.items():
            if key in state and int(state[key]) != value:  # `n`: e.g. files added, or newly known to be unreadable
                log.warning("resuming data order with %s %s (checkpoint had %s): the sample order changes",
                            key, value, state[key])
        self.step = int(state["step"])


def train_loader(dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 **kwargs) -> TrainLoader:
    """The training batch stream for one rank (see TrainLoader)."""
    return TrainLoader(dataset, batch_size, seed, rank, world, **kwargs)
