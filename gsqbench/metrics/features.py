"""Per-image features kept on disk for the metrics that need all of them at the end (KID subsets, k-NN
precision/recall): float16 `.npy` chunks written during the pass, never the whole set in RAM.

Each rank appends (ids, features) and flushes a chunk file every `chunk_rows` rows under `<root>/.parts/`. After the
pass `sync()` gathers every rank's chunk list (the files must be on storage every rank and rank 0 can read: the run
folder, or a node-local temporary folder on one machine), and rank 0 assembles `<root>/<side>.npy`, one float16
(N, d) array in image-id order, with `<root>/ids.json`, through `np.lib.format.open_memmap` (row blocks, never the
whole array in RAM). Metrics read it memory-mapped. Sorting by image id makes the result independent of batch
size, sharding and world size (metrics-protocol.md §10). The folder is removed after use unless kept
(`--keep-features`).

float16 keeps 11 significant bits (relative rounding ≤ 2⁻¹¹ ≈ 4.9e-4); Inception pool and VGG16 fc2 features are
far below its 65,504 maximum, and an overflow is refused rather than stored as inf.
"""
from __future__ import annotations

import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes, atomic_write_json
from gsqbench.metrics.base import Metric

log = logging.getLogger(__name__)

STORE_DTYPE = np.float16
IDS_FILE = "ids.json"


class FeatureStore:
    """Float16 features of several sides (e.g. real and fake) of one metric, streamed to disk by image id.

    `root`: the folder to use (created; None = a fresh temporary folder); `keep`: leave the assembled files after
    `remove()` (the `--keep-features` rule). `add(side, ids, feats)` per batch; `sync()` once after the pass (all
    ranks); then on rank 0 `open(side)` gives the (N, d) float16 memmap in id order and `ids` the sorted ids.
    """

    def __init__(self, root: Optional[str | Path], sides: Sequence[str], dim: int, *, keep: bool = False,
                 chunk_rows: int = 4096) -> None:
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="gsqbench-features-")) if root is None else Path(root)
        self.parts = self.root / ".parts"
        self.sides, self.dim, self.keep, self.chunk_rows = tuple(sides), int(dim), keep, int(chunk_rows)
        self._pending: dict[str, list[tuple[list[str], np.ndarray]]] = {s: [] for s in self.sides}
        self._chunks: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in self.sides}
        self.ids: list[str] = []
        self.n: dict[str, int] = {s: 0 for s in self.sides}
        self._synced = False

    # ----------------------------------------------------------------------------------------------- writing
    def add(self, side: str, image_ids: Sequence[str], feats: torch.Tensor) -> None:
        if self._synced:
            raise RuntimeError("FeatureStore.add after sync(): create a new store per evaluation")
        f = feats.detach().to("cpu", torch.float32).numpy()
        if f.ndim != 2 or f.shape[1] != self.dim or f.shape[0] != len(image_ids):
            raise UserError(f"features ({side}): shape {f.shape} for {len(image_ids)} ids; expected (b, {self.dim})")
        with np.errstate(over="ignore"):  # an overflow is reported below, not as a numpy warning
            half = f.astype(STORE_DTYPE)
        if not np.isfinite(half).all():
            raise UserError(f"features ({side}): values beyond the float16 range (max |x| = {np.abs(f).max():.4g}); "
                            "they cannot be stored as float16")
        self._pending[side].append(([str(i) for i in image_ids], half))
        self.n[side] += len(image_ids)
        if sum(len(ids) for ids, _ in self._pending[side]) >= self.chunk_rows:
            self._flush(side)

    def _flush(self, side: str) -> None:
        pending = self._pending[side]
        if not pending:
            return
        ids = [i for part, _ in pending for i in part]
        block = np.concatenate([a for _, a in pending])
        name = f"{side}-r{distributed.rank():04d}-{len(self._chunks[side]):06d}.npy"
        buf = io.BytesIO()
        np.save(buf, block, allow_pickle=False)
        atomic_write_bytes(self.parts / name, buf.getvalue())
        self._chunks[side].append((name, ids))
        self._pending[side] = []

    # ----------------------------------------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        """This rank's progress as plain lists (pending rows are flushed to a chunk file first): with the chunk
        files under a stable root (the run folder), a resumed evaluation continues from here."""
        for side in self.sides:
            self._flush(side)
        return {"chunks": {s: [[name, list(ids)] for name, ids in self._chunks[s]] for s in self.sides},
                "n": dict(self.n)}

    def load_state_dict(self, state: dict) -> None:
        missing = [name for s in self.sides for name, _ in state["chunks"][s] if not (self.parts / name).is_file()]
        if missing:
            raise UserError(f"features: cannot resume, chunk file {self.parts / missing[0]} is gone")
        self._chunks = {s: [(name, list(ids)) for name, ids in state["chunks"][s]] for s in self.sides}
        self.n = {s: int(state["n"][s]) for s in self.sides}

    # ----------------------------------------------------------------------------------------------- gathering
    def sync(self) -> None:
        """Flush, gather every rank's chunk lists and (rank 0) assemble each side in image-id order. Once."""
        if self._synced:
            return
        self._synced = True
        for side in self.sides:
            self._flush(side)
        parts = distributed.all_gather_objects({"root": str(self.root), "chunks": self._chunks})
        error = None
        if distributed.is_main():
            try:
                self._assemble(parts)
            except UserError as exc:  # every rank must fail together, not wait at the barrier below
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise UserError(error)

    def _assemble(self, parts: list[dict]) -> None:
        order: Optional[list[str]] = None
        for side in self.sides:
            rows: list[tuple[str, Path, int]] = []
            for part in parts:
                for name, ids in part["chunks"][side]:
                    rows += [(image_id, Path(part["root"]) / ".parts" / name, j) for j, image_id in enumerate(ids)]
            rows.sort(key=lambda r: r[0])
            ids = [r[0] for r in rows]
            dup = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
            if dup is not None:
                raise UserError(f"features: image id '{dup}' was evaluated twice; image ids must be unique")
            if order is not None and ids != order:
                raise AssertionError(f"features: side '{side}' holds other image ids than '{self.sides[0]}'")
            order = ids
            self._write_side(side, rows)
            self.n[side] = len(rows)
        self.ids = order or []
        atomic_write_json(self.root / IDS_FILE, {"ids": self.ids, "dtype": "float16", "dim": self.dim,
                                                 "order": "sorted image id", "sides": list(self.sides)})
        for part in parts:
            shutil.rmtree(Path(part["root"]) / ".parts", ignore_errors=True)

    def _write_side(self, side: str, rows: list[tuple[str, Path, int]]) -> None:
        """Copy rows into `<side>.npy` in id order, chunk file by chunk file (memory-mapped on both ends)."""
        final = self.root / f"{side}.npy"
        if not rows:  # a memmap cannot map zero bytes
            buf = io.BytesIO()
            np.save(buf, np.zeros((0, self.dim), STORE_DTYPE), allow_pickle=False)
            atomic_write_bytes(final, buf.getvalue())
            return
        tmp = final.with_name(f".{final.name}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORE_DTYPE, shape=(len(rows), self.dim))
        by_file: dict[Path, tuple[list[int], list[int]]] = {}
        for dest, (_, path, src) in enumerate(rows):
            d, s = by_file.setdefault(path, ([], []))
            d.append(dest)
            s.append(src)
        for path, (dest, src) in by_file.items():
            chunk = np.load(path, mmap_mode="r", allow_pickle=False)
            out[np.asarray(dest)] = chunk[np.asarray(src)]
        out.flush()
        del out
        tmp.replace(final)

    # ----------------------------------------------------------------------------------------------- reading
    def open(self, side: str) -> np.ndarray:
        """(N, d) float16 memmap of `side` in image-id order (rank 0, after sync)."""
        return np.load(self.root / f"{side}.npy", mmap_mode="r", allow_pickle=False)

    def remove(self) -> None:
        """Delete the chunk files, and the assembled files unless kept. Safe to call more than once."""
        shutil.rmtree(self.parts, ignore_errors=True)
        if self.keep and not self.temporary:
            return
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for side in self.sides:
            (self.root / f"{side}.npy").unlink(missing_ok=True)
        (self.root / IDS_FILE).unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            pass


class PairedFeatureMetric(Metric):
    """A metric over the features of every (real, reconstruction) pair, kept in a FeatureStore during the pass and
    used after it (KID, precision/recall). Subclasses set `model` (None: unavailable), `store`, `pair_name` and
    implement `_features(images_u8) -> (B, d)`; the pass, resumable state and clean-up are shared here."""

    pair_name = "features"
    model: Any = None
    store: Optional[FeatureStore] = None

    def _features(self, images_u8: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, real_u8, fake_u8, image_ids: Sequence[str], qout=None) -> None:
        from gsqbench.metrics.common import check_image_pair

        if self.model is None:
            return
        check_image_pair(real_u8, fake_u8, what=self.pair_name)
        self.store.add("real", image_ids, self._features(real_u8))
        self.store.add("fake", image_ids, self._features(fake_u8))

    def sync(self) -> None:
        if self.store is not None:
            self.store.sync()

    def state_dict(self) -> dict:
        """Streaming state for a resumed evaluation: the feature chunks written so far (plain lists)."""
        return {"store": self.store.state_dict()} if self.store is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.store is not None:
            self.store.load_state_dict(state["store"])

    def close(self) -> None:
        if self.store is not None:
            self.store.remove()


def store_root(out_dir: Optional[Path], key: str, keep: bool) -> Optional[Path]:
    """Where a metric keeps its features: `<run>/features/<key>` (safe name), or None (a temporary folder)."""
    from gsqbench.io import safe_child

    if out_dir is None:
        if keep:
            raise UserError("eval.keep_features: needs an output directory (gsqbench eval --out DIR) to keep "
                            "the features in")
        return None
    return safe_child(out_dir, "features", key)


def compute_on_main(fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 (which holds the assembled features), its result broadcast to every rank; an exception on
    rank 0 is re-raised on every rank instead of leaving the others waiting."""
    result: Any = None
    if distributed.is_main():
        try:
            result = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            if not distributed.is_distributed():
                raise
            result = ("error", f"{type(exc).__name__}: {exc}")
    status, payload = distributed.broadcast_object(result)
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {payload}")
    return payload
