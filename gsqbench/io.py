"""Atomic file writes, safe output paths and file hashing: nothing is left half-written, user names never escape
a root, and a large file is hashed once per process."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from gsqbench.errors import UserError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path` (atomic on POSIX).

    `durable=False` skips the fsync: still never half-written if the process dies, only not flushed against a power
    loss; for bulk exports of many small files (one PNG per image), where an fsync each would dominate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def safe_name(name: str) -> str:
    """A user-given name turned into one harmless path component (no separators, no '..', never empty)."""
    cleaned = _SAFE.sub("_", str(name)).strip("._")
    return cleaned[:120] or "unnamed"


def safe_child(root: str | os.PathLike, *parts: str) -> Path:
    """`root/parts...` with every part sanitised; refuses anything that would resolve outside `root`."""
    root_path = Path(root).resolve()
    out = root_path.joinpath(*(safe_name(p) for p in parts)).resolve()
    if root_path != out and root_path not in out.parents:
        raise UserError(f"output path {out} escapes {root_path}")
    return out


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, cached per process by (path, size, mtime) so repeated checks cost nothing."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]
