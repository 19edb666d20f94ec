"""One writer per output folder: a lock file that names its holder, survives NFS, and is taken over when stale.

`hold(folder, purpose)` creates `<folder>/.gsqbench.lock` holding its holder as JSON (pid, host, boot id, process
start time, start date, purpose, a random token): written to a private temp file, then hard-linked to the lock name.
link() is atomic and fails when the name exists, on local file systems and on NFS, unlike `fcntl`/`flock`, which NFS
implements through a separate lock daemon that is often absent or broken; O_CREAT | O_EXCL is the fallback where
hard links are not supported. While held, a daemon thread touches the file every `HEARTBEAT_S` seconds, so its mtime says "still alive".

A second writer is refused at once with one line naming the holder (or, with `wait_s`, polls until then). A lock is
**stale**, and is taken over, when
- its holder ran on this host (same hostname) and that process is gone: the boot id differs (the machine
  rebooted), the pid does not exist, or the pid now belongs to a process that started later (pid reuse); or
- its holder ran on another host and the heartbeat stopped: mtime older than `STALE_S` (default 300 s, env
  `GSQBENCH_LOCK_STALE_S`; much longer than the heartbeat, so clock skew between NFS clients of a minute or two
  does not matter); or
- it is unreadable (empty or torn: a holder killed between create and write) and older than `STALE_S`.

Taking over is race-free: the breaker creates `<lock>.break` with O_EXCL (so one breaker at a time), re-reads the
lock and removes it only if it still carries the stale holder's token, then competes for the lock like anyone else.
A process that finds its own lock gone or replaced (someone judged it stale) logs an error from the heartbeat.

Holding is re-entrant within one process (the runner holds a run folder across train + evaluate, and train_run
holds it too). Under DDP only rank 0 takes the lock and broadcasts the outcome (`gsqbench.distributed.rank0_lock`):
the other ranks never write results, and they leave with the same one-line error when rank 0 is refused.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from gsqbench.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".gsqbench.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
_POLL_S = 0.5


def stale_after_s() -> float:
    try:
        return float(os.environ.get("GSQBENCH_LOCK_STALE_S", STALE_S))
    except ValueError:
        return STALE_S


class LockHeld(UserError):
    """The folder is being written by another live process (one line naming it; CLI exit code 2)."""


# ----------------------------------------------------------------------------------------------- who holds it
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    try:  # the command name (field 2) may contain spaces and parentheses: split after its closing ')'
        return int(text[text.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    boot_id: str
    proc_start: Optional[int]
    started: str
    purpose: str
    token: str

    @classmethod
    def me(cls, purpose: str) -> "Holder":
        pid = os.getpid()
        return cls(pid=pid, host=socket.gethostname(), boot_id=_boot_id(), proc_start=_process_start(pid),
                   started=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"), purpose=purpose,
                   token=secrets.token_hex(8))

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]), host=str(d["host"]), boot_id=str(d.get("boot_id", "")),
                       proc_start=None if d.get("proc_start") is None else int(d["proc_start"]),
                       started=str(d.get("started", "?")), purpose=str(d.get("purpose", "")), token=str(d["token"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True) + "\n"

    def describe(self) -> str:
        what = f" ({self.purpose})" if self.purpose else ""
        return f"pid {self.pid} on host {self.host}, started {self.started}{what}"


def stale_reason(holder: Optional[Holder], mtime: float, now: Optional[float] = None) -> Optional[str]:
    """Why a lock with this holder and file mtime is stale, or None when its holder may still be writing."""
    age = (time.time() if now is None else now) - mtime
    if holder is None:
        return f"unreadable lock file {age:.0f} s old" if age > stale_after_s() else None
    if holder.host == socket.gethostname():
        mine = _boot_id()
        if holder.boot_id and mine and holder.boot_id != mine:
            return f"pid {holder.pid} ran before this host rebooted"
        if not _pid_alive(holder.pid):
            return f"pid {holder.pid} no longer exists"
        now_start = _process_start(holder.pid)
        if holder.proc_start is not None and now_start is not None and now_start != holder.proc_start:
            return f"pid {holder.pid} now belongs to another process"
        return None
    if age > stale_after_s():
        return f"no heartbeat from host {holder.host} for {age:.0f} s"
    return None


# ----------------------------------------------------------------------------------------------- the lock
def _read(path: Path) -> tuple[Optional[Holder], Optional[float]]:
    """(holder or None if torn, mtime) of an existing lock; (None, None) when it vanished meanwhile."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None, None
    return Holder.parse(text), st.st_mtime


def _create(path: Path, holder: Holder) -> bool:
    """Create the lock with its content complete: write a private temp file, then hard-link it to the lock name.

    link() is atomic and fails when the name exists, on local file systems and on NFS (the classic NFS-safe lock;
    a retransmitted LINK may report EEXIST although it worked, so success is read from the temp file's link count).
    File systems without hard links fall back to O_CREAT | O_EXCL.
    """
    tmp = path.with_name(f"{path.name}.{holder.token}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, holder.to_json().encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except OSError as exc:
        with contextlib.suppress(OSError):
            if os.stat(tmp).st_nlink == 2:
                return True
        if isinstance(exc, FileExistsError):
            return False
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        return _create_exclusive(path, holder)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _create_exclusive(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, holder.to_json().encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _break(path: Path, stale: Holder | None, stale_mtime: float) -> None:
    """Remove the lock at `path` if it still is the stale one we judged; one breaker at a time."""
    guard = path.with_name(path.name + ".break")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):  # a breaker killed mid-way leaves its guard: old guards are removed
            if time.time() - guard.stat().st_mtime > 60:
                guard.unlink()
        return
    os.close(fd)
    try:
        holder, mtime = _read(path)
        same = (holder.token == stale.token) if (holder and stale) else (holder is None and stale is None
                                                                          and mtime == stale_mtime)
        if same:
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _held(folder: Path, holder: Optional[Holder]) -> LockHeld:
    who = holder.describe() if holder else "a process that is still writing its lock file"
    return LockHeld(f"{folder} is being written by {who}; wait for it to finish, or use another folder (a lock "
                    "left by a killed process is taken over automatically)")


def check_free(folder: str | os.PathLike) -> None:
    """Raise LockHeld when another live process holds `folder`'s lock; reads only (commands call it to refuse
    early, before heavy imports; the lock itself is still taken, race-free, when writing starts)."""
    folder = Path(folder)
    if is_held_here(folder):
        return
    holder, mtime = _read(folder / LOCK_NAME)
    if mtime is not None and stale_reason(holder, mtime) is None:
        raise _held(folder, holder)


class FolderLock:
    """The lock of one folder; use `hold()` rather than this class directly."""

    def __init__(self, folder: str | os.PathLike, purpose: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.holder: Optional[Holder] = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def acquire(self, wait_s: float = 0.0) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = Holder.me(self.purpose)
        deadline = time.monotonic() + wait_s
        while True:
            if _create(self.path, me):
                self.holder = me
                self._start_heartbeat()
                return self
            holder, mtime = _read(self.path)
            if mtime is None:
                continue  # released between our create and read: try again at once
            reason = stale_reason(holder, mtime)
            if reason is not None:
                log.warning("%s: taking over a stale lock (%s)", self.path, reason)
                _break(self.path, holder, mtime)
                continue
            if time.monotonic() >= deadline:
                raise _held(self.folder, holder)
            time.sleep(_POLL_S)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat {self.folder}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder, _ = _read(self.path)
            if holder is None or self.holder is None or holder.token != self.holder.token:
                log.error("%s: this process's lock was removed or taken over by another process; results in this "
                          "folder may now be written by two processes", self.path)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder, _ = _read(self.path)
        if holder is not None and self.holder is not None and holder.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.holder = None


_HELD: dict[Path, tuple[FolderLock, int]] = {}
_HELD_GUARD = threading.Lock()


def _key(folder: str | os.PathLike) -> Path:
    return Path(folder).absolute().resolve()


def is_held_here(folder: str | os.PathLike) -> bool:
    """Whether this process already holds the lock of `folder`."""
    return _key(folder) in _HELD


@contextlib.contextmanager
def hold(folder: str | os.PathLike, purpose: str = "", wait_s: float = 0.0) -> Iterator[Any]:
    """Hold `folder`'s lock for the body (re-entrant in this process); LockHeld if another live process has it."""
    key = _key(folder)
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            _HELD[key] = (entry[0], entry[1] + 1)
    if entry is None:
        lock = FolderLock(folder, purpose).acquire(wait_s)
        with _HELD_GUARD:
            _HELD[key] = (lock, 1)
    try:
        yield _HELD[key][0]
    finally:
        with _HELD_GUARD:
            lock, count = _HELD[key]
            if count > 1:
                _HELD[key] = (lock, count - 1)
            else:
                del _HELD[key]
        if count <= 1:
            lock.release()
