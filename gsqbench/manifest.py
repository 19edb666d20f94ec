"""Dataset manifests: the file index of an image folder, built without opening a single image, cached and reused.

An `image-folder` dataset of ImageNet size (1,281,167 training files) must not open every file on every rank and
every resume. A manifest lists the folder's image files (relative POSIX paths, sorted, the dataset's ids) with
their sizes and modification times, from directory entries and `stat` only. It is cached under
`$GSQBENCH_MANIFESTS` (default `$GSQBENCH_HOME/manifests`), one file per folder (keyed by the folder's resolved
path), and reused by every rank, every resume and every later run as long as the file list, sizes and mtimes are
unchanged; a stale manifest (a file added, removed or touched) is detected by that comparison and rebuilt, keeping
what was known about every unchanged file.

What a manifest knows about each file (`status`):
- `unchecked`: listed only (the default after indexing);
- `ok`: fully decoded once (`gsqbench data check`, or read during a run), with its width and height;
- `bad`: empty (size 0, known without opening it), failed a full decode in `data check`, or failed to decode
  during a run; the reason is kept. Datasets skip known-bad files with a counted warning (or refuse them with
  `--strict-data`). A bad file that is replaced or touched gets a new mtime and is listed as unchecked again.

Storage: one `.npz` (no pickles): the paths as one NUL-separated UTF-8 byte array, sizes/mtimes int64, status int8, width and
height int32 (−1 unknown), the bad files' reasons and the folder as JSON. Writes are atomic; concurrent writers
(ranks) write the same content, and a lost update only means a file is checked again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
UNCHECKED, OK, BAD = 0, 1, 2
STATUS_NAMES = {UNCHECKED: "unchecked", OK: "ok", BAD: "bad"}


def manifests_dir() -> Path:
    """`$GSQBENCH_MANIFESTS`, else `$GSQBENCH_HOME/manifests` (default `~/.cache/gsqbench/manifests`)."""
    override = os.environ.get("GSQBENCH_MANIFESTS")
    if override:
        return Path(override).expanduser()
    from gsqbench.weights import gsqbench_home

    return gsqbench_home() / "manifests"


def manifest_path(root: str | os.PathLike) -> Path:
    """The cache file of one folder: keyed by its resolved path (a copy elsewhere gets its own manifest)."""
    key = hashlib.sha256(str(Path(root).expanduser().resolve()).encode("utf-8")).hexdigest()[:32]
    return manifests_dir() / f"{key}.npz"


# ---------------------------------------------------------------------------------------------------------------
# Listing


@dataclass
class Listing:
    """Image files under a folder from directory entries and stat: no file is opened."""

    paths: list[str]  # relative POSIX paths, sorted
    sizes: np.ndarray  # int64 bytes
    mtimes: np.ndarray  # int64 ns


_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)


def _is_image_name(name: str) -> bool:
    """Extension match, case-insensitive (as os.path.splitext: a leading dot alone is no extension)."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _EXTENSIONS


def _usable_name(rel: str) -> bool:
    """Image ids travel through CSV, JSON and id hashes: names that are not UTF-8 or hold a line break are left out."""
    if "\n" in rel or "\r" in rel:
        return False
    try:
        rel.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes (surrogate-escaped by os.scandir)
        return False


def list_images(root: Path) -> Listing:
    """Every image file under `root`, recursively (symlinked folders followed once), sorted by relative path."""
    found: list[tuple[str, int, int]] = []
    unusable: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink cycle or a folder linked twice
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                for entry in entries:
                    rel = prefix + entry.name
                    try:
                        if entry.is_dir():
                            stack.append((Path(entry.path), rel + "/"))
                        elif _is_image_name(entry.name) and entry.is_file():
                            if not _usable_name(rel):
                                unusable.append(rel)
                                continue
                            est = entry.stat()
                            found.append((rel, est.st_size, est.st_mtime_ns))
                    except OSError:  # a dangling symlink or an entry removed while listing
                        continue
        except OSError as exc:
            if folder == root:
                raise UserError(f"data.path: cannot list '{root}' ({exc.strerror or exc})") from None
            log.warning("cannot list %s (%s); its images are left out", folder, exc)
    if unusable:
        log.warning("left out %d image file(s) under %s whose names are not UTF-8 or contain a line break "
                    "(first: %r); rename them to include them", len(unusable), root, unusable[0])
    found.sort(key=lambda t: t[0])
    return Listing([p for p, _, _ in found], np.array([s for _, s, _ in found], dtype=np.int64),
                   np.array([m for _, _, m in found], dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# The manifest


@dataclass
class Manifest:
    """The index of one folder; `origin` says how it was obtained: built | cache | rebuilt."""

    root: Path
    paths: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    status: np.ndarray  # int8: UNCHECKED | OK | BAD
    width: np.ndarray  # int32, −1 unknown
    height: np.ndarray
    reasons: dict[str, str] = field(default_factory=dict)  # path → why it is bad
    origin: str = "built"

    def __len__(self) -> int:
        return len(self.paths)

    def bad(self) -> list[tuple[str, str]]:
        """(path, reason) of every known-bad file, in path order."""
        bad = np.flatnonzero(self.status == BAD)
        return [(self.paths[i], self.reasons.get(self.paths[i], "unreadable")) for i in bad]

    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in STATUS_NAMES.items()}

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def record(self, results: Mapping[str, tuple[int, Optional[str], int, int]]) -> int:
        """Apply {path: (status, reason, width, height)}; returns how many entries changed."""
        pos = self.index()
        changed = 0
        for path, (status, reason, w, h) in results.items():
            i = pos.get(path)
            if i is None:
                continue
            before = (int(self.status[i]), self.reasons.get(path), int(self.width[i]), int(self.height[i]))
            self.status[i], self.width[i], self.height[i] = status, w, h
            if status == BAD:
                self.reasons[path] = reason or "unreadable"
            else:
                self.reasons.pop(path, None)
            changed += before != (status, self.reasons.get(path), w, h)
        return changed

    # --- storage ---------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = {"version": MANIFEST_VERSION, "root": str(self.root), "reasons": self.reasons, "written": time.time()}
        np.savez(buf, paths=np.frombuffer("\0".join(self.paths).encode("utf-8"), dtype=np.uint8),
                 sizes=self.sizes, mtimes=self.mtimes, status=self.status, width=self.width, height=self.height,
                 meta=np.array(json.dumps(meta)))
        return buf.getvalue()

    def save(self) -> Optional[Path]:
        """Write the cache file atomically; a cache that cannot be written is only a warning (a read-only home)."""
        path = manifest_path(self.root)
        try:
            return atomic_write_bytes(path, self.to_bytes())
        except OSError as exc:
            log.warning("cannot write the dataset manifest %s (%s); the folder will be listed again next time",
                        path, exc)
            return None

    @classmethod
    def read(cls, root: Path) -> Optional["Manifest"]:
        """The cached manifest of `root`, or None when absent, unreadable or of another version or folder."""
        path = manifest_path(root)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                text = f["paths"].tobytes().decode("utf-8")
                arrays = {k: f[k] for k in ("sizes", "mtimes", "status", "width", "height")}
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("dataset manifest %s is unreadable (%s); rebuilding it", path, exc)
            return None
        if meta.get("version") != MANIFEST_VERSION or meta.get("root") != str(root):
            return None
        paths = text.split("\0") if text else []
        if len({len(paths), *(len(a) for a in arrays.values())}) != 1:
            return None
        return cls(root, paths, reasons=dict(meta.get("reasons") or {}), origin="cache", **arrays)


def _fresh(root: Path, listing: Listing) -> Manifest:
    n = len(listing.paths)
    status = np.full(n, UNCHECKED, dtype=np.int8)
    status[listing.sizes == 0] = BAD  # known without opening the file
    reasons = {listing.paths[i]: "empty file (0 bytes)" for i in np.flatnonzero(listing.sizes == 0)}
    return Manifest(root, listing.paths, listing.sizes, listing.mtimes, status, np.full(n, -1, dtype=np.int32),
                    np.full(n, -1, dtype=np.int32), reasons)


def _carry_over(new: Manifest, old: Manifest) -> None:
    """Keep what `old` knew about every file that is unchanged (same path, size and mtime)."""
    pos = old.index()
    for i, path in enumerate(new.paths):
        j = pos.get(path)
        if j is None or old.sizes[j] != new.sizes[i] or old.mtimes[j] != new.mtimes[i] or new.status[i] == BAD:
            continue
        new.status[i], new.width[i], new.height[i] = old.status[j], old.width[j], old.height[j]
        if old.status[j] == BAD:
            new.reasons[path] = old.reasons.get(path, "unreadable")


def load_manifest(root: str | os.PathLike, *, save: bool = True) -> Manifest:
    """The manifest of `root`: the cached one when the folder's file list, sizes and mtimes are unchanged, else a
    rebuilt one (what the stale cache knew about unchanged files is kept). Lists files; opens none."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data.path: directory '{root}' does not exist")
    listing = list_images(root)
    cached = Manifest.read(root)
    if (cached is not None and cached.paths == listing.paths and np.array_equal(cached.sizes, listing.sizes)
            and np.array_equal(cached.mtimes, listing.mtimes)):
        return cached
    manifest = _fresh(root, listing)
    if cached is not None:
        _carry_over(manifest, cached)
        manifest.origin = "rebuilt"
        log.info("dataset manifest of %s is stale (files added, removed or touched): rebuilt", root)
    if save:
        manifest.save()
    return manifest


def record_results(root: str | os.PathLike, results: Mapping[str, tuple[int, Optional[str], int, int]]) -> None:
    """Merge decode results {path: (status, reason, width, height)} into the cached manifest of `root`.

    Used for files that failed (or were first read) during a run; entries whose file changed since are ignored by
    the next load anyway (their mtime no longer matches).
    """
    root = Path(root).expanduser().resolve()
    manifest = Manifest.read(root)
    if manifest is None or not results:
        return
    if manifest.record(results):
        manifest.save()


# ---------------------------------------------------------------------------------------------------------------
# Full check (`gsqbench data check`)


def decode_check(path: str | os.PathLike) -> tuple[int, Optional[str], int, int]:
    """(status, reason, width, height) after a full decode of one file with PIL."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            w, h = img.size
        return OK, None, int(w), int(h)
    except Exception as exc:  # PIL raises many types for bad files; each one means "cannot be read"
        return BAD, f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300], -1, -1


@dataclass
class CheckReport:
    manifest: Manifest
    checked: int
    seconds: float

    @property
    def bad(self) -> list[tuple[str, str]]:
        return self.manifest.bad()


def check_folder(root: str | os.PathLike, *, workers: Optional[int] = None, recheck: bool = False,
                 progress: bool = False) -> CheckReport:
    """Fully decode every not yet checked file (all files with `recheck`), record ok/bad and sizes in the manifest.

    Threads: Pillow releases the GIL while decoding, so a thread pool scales with the cores.
    """
    manifest = load_manifest(root, save=False)
    todo = [i for i in range(len(manifest)) if recheck or manifest.status[i] == UNCHECKED]
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    t0 = time.perf_counter()
    results: dict[str, tuple[int, Optional[str], int, int]] = {}
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(todo), unit="img", desc="check", disable=None if progress else True) as bar:
        paths = [manifest.paths[i] for i in todo]
        for path, result in zip(paths, pool.map(decode_check, (manifest.root / p for p in paths), chunksize=64)):
            results[path] = result
            bar.update(1)
    manifest.record(results)
    manifest.save()
    return CheckReport(manifest, len(todo), time.perf_counter() - t0)


def summarize_sizes(manifest: Manifest, thresholds: Sequence[int] = (64, 128, 256, 512)) -> dict[int, int]:
    """How many checked files have a shorter side below each threshold (known only after a check or a read)."""
    known = manifest.width >= 0
    short = np.minimum(manifest.width, manifest.height)[known]
    return {t: int((short < t).sum()) for t in thresholds}


def smaller_than(manifest: Manifest, indices: Iterable[int], min_size: int) -> list[tuple[str, int, int]]:
    """(path, width, height) of files among `indices` whose known shorter side is below `min_size`."""
    out = []
    for i in indices:
        w, h = int(manifest.width[i]), int(manifest.height[i])
        if w >= 0 and min(w, h) < min_size:
            out.append((manifest.paths[i], w, h))
    return out
