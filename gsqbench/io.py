"""Atomic file writes, safe output paths, checks of user-given paths and file hashing: nothing is left half-written,
a failed write leaves the previous file as it was, files follow the umask, user names never escape a root, a bad
path is one UserError line before any work starts, and a large file is hashed once per process."""
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


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class WriteFailed(OSError):
    """A write that did not happen (disk full, I/O error, permission): the previous file at `path` is unchanged.

    The CLI prints it as one line and exits 1 (not bad input, so not 2)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path` (atomic on POSIX).

    `durable=False` skips the fsync: still never half-written if the process dies, only not flushed against a power
    loss; for bulk exports of many small files (one PNG per image), where an fsync each would dominate.
    The file gets mode 0666 & ~umask like any normally created file (mkstemp alone would leave 0600, so a shared
    report could not be read by others). Any OS error (ENOSPC, EIO, EACCES, ...) removes the temp file, leaves the
    previous `path` untouched and is raised as WriteFailed naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        if isinstance(exc, WriteFailed):
            raise
        reason = exc.strerror or str(exc)
        raise WriteFailed(exc.errno, f"could not write {path}: {reason}; the previous file (if any) is unchanged") \
            from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def _remove_quietly(tmp: str | None) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


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


# ----------------------------------------------------------------------------------------------- user-given paths
def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as an existing, readable regular file, or a one-line UserError saying which of those it is not."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} '{p}' does not exist")
    if p.is_dir():
        raise UserError(f"{what} '{p}' is a directory; expected a file")
    if not p.is_file():
        raise UserError(f"{what} '{p}' is not a regular file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} '{p}' is not readable (permission denied)")
    return p


def check_input_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as an existing, listable directory, or a one-line UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} '{p}' does not exist")
    if not p.is_dir():
        raise UserError(f"{what} '{p}' is a file; expected a directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise UserError(f"{what} '{p}' is not readable (permission denied)")
    return p


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a directory we can create or write into (nothing is created here), or a one-line UserError."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what} '{p}' is a file, not a directory; give a directory (or a path to create)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{what} '{p}' is not writable (permission denied)")
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} '{p}' cannot be created: '{parent}' is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{p}' cannot be created: '{parent}' is not writable (permission denied)")
    return p


def read_text_utf8(path: str | os.PathLike, what: str) -> str:
    """A text file's content; a file that is not UTF-8 is a UserError naming the first bad byte and its line."""
    p = check_input_file(path, what)
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{what} '{p}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
                        "save it as UTF-8") from None
