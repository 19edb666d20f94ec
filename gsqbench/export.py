"""Exports of evaluated images for external evaluators (`gsqbench eval --save-recon npz|png`).

Both sides are exported, the reconstructions and the originals exactly as every metric saw them (the evaluated
uint8, metrics-protocol.md §1), so an external evaluator (the ADM / guided-diffusion TF suite that LlamaGen and
MaskGIT report with, torch-fidelity, dgm-eval, clean-fid) sees both sides of the same comparison:

- `npz`: the ADM layout, `recon.npz` and `real.npz`, each holding one array `arr_0` uint8 (N, H, W, 3) in
  image-id order (uncompressed, like `np.savez`), and `ids.json` listing the ids in that order. Streamed: each rank
  writes its batches as chunk files under `.parts/`, and after the pass rank 0 writes the zip member `arr_0.npy`
  row by row in id order from the memory-mapped chunks, so N images are never held in RAM.
- `png`: `recon/<id>.png` and `real/<id>.png`, the folder tree mirroring the ids (an id `n01440764/x.JPEG`
  becomes `recon/n01440764/x.JPEG.png`; every path component is sanitised with `gsqbench.io.safe_name` and
  must stay inside the folder), written by each rank as it goes, plus `ids.json`.

Under DDP every rank exports its own shard; `finish()` is called on every rank after the pass (ids gathered, checked
unique, sorted; rank 0 assembles and writes the sidecar).
"""
from __future__ import annotations

import io
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes, atomic_write_json, safe_child, safe_name

log = logging.getLogger(__name__)

FORMATS = ("npz", "png")
SIDES = ("recon", "real")
IDS_FILE = "ids.json"


def id_path(root: str | Path, image_id: str, suffix: str = ".png") -> Path:
    """`root/<id components>` + suffix: the ids' folder tree mirrored, each component made safe, never escaping."""
    parts = [p for p in str(image_id).split("/") if p not in ("", ".")]
    if not parts:
        raise UserError(f"image id {image_id!r}: cannot be used as a file name")
    parts[-1] = safe_name(parts[-1] + suffix)
    return safe_child(root, *parts[:-1], parts[-1]) if len(parts) > 1 else safe_child(root, parts[-1])


def encode_png(image_hwc: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_hwc)).save(buf, format="PNG")
    return buf.getvalue()


class ImageExporter:
    """Writes every evaluated (real, recon) pair under `root` in `fmt` ('npz' or 'png'); see the module docstring."""

    def __init__(self, root: str | Path, fmt: str, chunk_images: int = 256) -> None:
        if fmt not in FORMATS:
            raise UserError(f"--save-recon: '{fmt}' is not valid; expected one of {', '.join(FORMATS)}")
        self.root, self.fmt, self.chunk_images = Path(root), fmt, int(chunk_images)
        self.parts = self.root / ".parts"
        self._ids: list[str] = []
        self._pending: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self._chunks: list[tuple[str, list[str]]] = []  # (chunk stem, ids) of this rank
        self._done = False

    # ----------------------------------------------------------------------------------------------- per batch
    def add(self, image_ids: Sequence[str], real_u8: Any, recon_u8: Any) -> None:
        """One batch of uint8 (b, 3, H, W) pairs (tensors on any device, or numpy)."""
        real, recon = (_to_hwc(a) for a in (real_u8, recon_u8))
        ids = [str(i) for i in image_ids]
        if real.shape != recon.shape or real.shape[0] != len(ids):
            raise UserError(f"export: {len(ids)} ids for real {real.shape} / recon {recon.shape} images")
        self._ids += ids
        if self.fmt == "png":
            for image_id, r, f in zip(ids, real, recon):  # one file per image: no fsync each (see io.py)
                atomic_write_bytes(id_path(self.root / "real", image_id), encode_png(r), durable=False)
                atomic_write_bytes(id_path(self.root / "recon", image_id), encode_png(f), durable=False)
            return
        self._pending.append((ids, real, recon))
        if sum(len(p[0]) for p in self._pending) >= self.chunk_images:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        ids = [i for p in self._pending for i in p[0]]
        stem = f"r{distributed.rank():04d}-{len(self._chunks):06d}"
        for k, side in ((2, "recon"), (1, "real")):
            buf = io.BytesIO()
            np.save(buf, np.concatenate([p[k] for p in self._pending]), allow_pickle=False)
            atomic_write_bytes(self.parts / f"{side}-{stem}.npy", buf.getvalue())
        self._chunks.append((stem, ids))
        self._pending = []

    # ----------------------------------------------------------------------------------------------- after the pass
    def finish(self) -> None:
        """All ranks: gather ids (and npz chunk lists); rank 0 checks them, assembles, writes ids.json."""
        self._flush()
        parts = distributed.all_gather_objects({"ids": self._ids, "chunks": self._chunks, "parts": str(self.parts)})
        error = None
        if distributed.is_main():
            try:
                self._assemble(parts)
            except UserError as exc:  # all ranks fail together instead of waiting on the barrier
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise UserError(error)
        self._done = True

    def _assemble(self, parts: list[dict]) -> None:
        ids = sorted(i for part in parts for i in part["ids"])
        dup = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
        if dup is not None:
            raise UserError(f"export: image id '{dup}' occurs twice; image ids must be unique")
        if self.fmt == "png":
            paths = {id_path(self.root / "recon", i) for i in ids}
            if len(paths) != len(ids):
                raise UserError("export: two image ids map to the same PNG path after sanitising; rename the images")
        else:
            rows = {}
            for part in parts:
                for stem, chunk_ids in part["chunks"]:
                    rows.update({image_id: (Path(part["parts"]), stem, j) for j, image_id in enumerate(chunk_ids)})
            for side in SIDES:
                _write_adm_npz(self.root / f"{side}.npz", side, [rows[i] for i in ids])
            shutil.rmtree(self.parts, ignore_errors=True)
        atomic_write_json(self.root / IDS_FILE, {"ids": ids, "order": "sorted image id", "format": self.fmt,
                                                "files": _layout(self.fmt), "n": len(ids)})
        log.info("exported %d reconstructions and originals (%s) to %s", len(ids), self.fmt, self.root)

    def close(self) -> None:
        """Remove chunk files left by an interrupted pass (the finished exports stay)."""
        if not self._done:
            shutil.rmtree(self.parts, ignore_errors=True)


def _layout(fmt: str) -> dict[str, str]:
    if fmt == "npz":
        return {side: f"{side}.npz: arr_0 uint8 (N, H, W, 3), rows in the order of 'ids'" for side in SIDES}
    return {side: f"{side}/<id>.png" for side in SIDES}


def _to_hwc(images: Any) -> np.ndarray:
    arr = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
        raise UserError(f"export: expected uint8 (b, 3, H, W) images, got {arr.dtype} {arr.shape}")
    return arr.transpose(0, 2, 3, 1)


def _write_adm_npz(path: Path, side: str, rows: Sequence[tuple[Path, str, int]]) -> None:
    """`arr_0` (N, H, W, 3) uint8 written into an uncompressed zip member row by row (np.load reads it as usual)."""
    if not rows:
        raise UserError("export: no images to write")
    cache: dict[tuple[Path, str], np.ndarray] = {}  # a few memory-mapped chunks (ranks' shards interleave)

    def row(parts: Path, stem: str, j: int) -> np.ndarray:
        key = (parts, stem)
        if key not in cache:
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            cache[key] = np.load(parts / f"{side}-{stem}.npy", mmap_mode="r", allow_pickle=False)
        return cache[key][j]

    first = row(*rows[0])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(rows), *first.shape)}
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for r in rows:
                    img = row(*r)
                    if img.shape != first.shape:
                        raise UserError(f"export: images of different sizes {first.shape} and {img.shape}; "
                                        "the ADM npz layout needs one size")
                    member.write(np.ascontiguousarray(img).tobytes())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
