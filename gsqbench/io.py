"""Atomic file writes and safe output paths: nothing is left half-written, user names never escape a root."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from gsqbench.errors import UserError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
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
