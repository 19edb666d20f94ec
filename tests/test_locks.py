"""One writer per output folder (gsqbench.locks): who holds a lock, when a lock is stale, race-free takeover, and,
through the real CLI, two `run`s with different specs on one results folder plus a holder killed with SIGKILL."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gsqbench import locks
from gsqbench.locks import LOCK_NAME, Holder, LockHeld, hold

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **fields) -> Path:
    holder = {**Holder.me("someone else").__dict__, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return folder / LOCK_NAME


# ----------------------------------------------------------------------------------------------- unit
def test_second_holder_is_refused_with_one_line_naming_the_holder(tmp_path):
    with hold(tmp_path, "first"):
        with hold(tmp_path, "re-entrant in this process"):  # the runner and train_run both hold a run folder
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()  # still held by the outer block
        # a live process on this host that is not us
        _write_lock(tmp_path / "other", pid=os.getppid(), proc_start=locks._process_start(os.getppid()))
        with pytest.raises(LockHeld) as err:
            with hold(tmp_path / "other", "second"):
                pass
        msg = str(err.value)
        assert "\n" not in msg and re.search(rf"is being written by pid {os.getppid()} on host "
                                             rf"{re.escape(socket.gethostname())}, started \S+ \(someone else\)", msg)
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_waiting_holder_gets_the_lock_once_it_is_released(tmp_path):
    lock = locks.FolderLock(tmp_path, "first").acquire()
    t0 = time.monotonic()
    threading.Timer(0.6, lock.release).start()
    with hold(tmp_path, "second", wait_s=10):
        assert time.monotonic() - t0 >= 0.5
        assert Holder.parse((tmp_path / LOCK_NAME).read_text()).purpose == "second"


@pytest.mark.parametrize("case", ["dead pid", "pid reused", "rebooted", "silent other host", "torn and old"])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, case, caplog):
    folder = tmp_path / "run"
    if case == "dead pid":
        _write_lock(folder, pid=_dead_pid())
    elif case == "pid reused":  # our own pid, but recorded with another process start time
        _write_lock(folder, pid=os.getpid(), proc_start=(locks._process_start(os.getpid()) or 0) + 12345)
    elif case == "rebooted":
        _write_lock(folder, boot_id="0" * 36)
    else:
        path = _write_lock(folder, host="elsewhere.example")
        if case == "torn and old":
            path.write_text("")  # a holder killed between creating and writing the file (O_EXCL fallback)
        old = time.time() - 10 * 60
        os.utime(path, (old, old))
    with hold(folder, "taker"):
        assert Holder.parse((folder / LOCK_NAME).read_text()).purpose == "taker"
    assert "taking over a stale lock" in caplog.text


def test_live_other_host_lock_is_respected_until_its_heartbeat_stops(tmp_path, monkeypatch):
    path = _write_lock(tmp_path, host="elsewhere.example", pid=1)
    with pytest.raises(LockHeld, match=r"pid 1 on host elsewhere\.example"):
        with hold(tmp_path):
            pass
    path.write_text("")  # unreadable but fresh: its creator may be writing it right now
    with pytest.raises(LockHeld, match="a process that is still writing its lock file"):
        with hold(tmp_path):
            pass
    path.write_text(json.dumps({**Holder.me("x").__dict__, "host": "elsewhere.example", "pid": 1}))
    monkeypatch.setenv("GSQBENCH_LOCK_STALE_S", "1")
    old = time.time() - 5
    os.utime(path, (old, old))
    with hold(tmp_path, "after the heartbeat stopped"):
        pass


def test_a_breaker_never_removes_a_lock_it_did_not_judge(tmp_path):
    """Two processes judge the same dead holder stale; the first replaces the lock; the second must not remove the
    new, live lock: removal checks the judged holder's token."""
    path = _write_lock(tmp_path, pid=_dead_pid())
    judged = Holder.parse(path.read_text())
    mtime = path.stat().st_mtime
    path.unlink()
    fresh = _write_lock(tmp_path, pid=os.getpid(), purpose="new holder")
    locks._break(path, judged, mtime)
    assert fresh.exists() and Holder.parse(fresh.read_text()).purpose == "new holder"


# ----------------------------------------------------------------------------------------------- end to end
def _suite(path: Path, lr: float) -> Path:
    raw = {"suite": "t", "shared": {
        "model": {"preset": "tiny-f8", "latent_dim": 8},
        "data": {"train": {"kind": "synthetic", "size": 16, "limit": 8}, "eval": {"kind": "synthetic", "size": 16,
                                                                                   "limit": 4}},
        "train": {"steps": 40, "batch_size": 2, "precision": "fp32", "lr": lr, "checkpoint_every": 4,
                  "log_every": 4},
        "eval": {"batch_size": 4, "samples": 2, "metrics": ["pixel"]}},
        "subjects": [{"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}}]}
    path.write_text(yaml.safe_dump(raw))
    return path


def _gsqbench(*argv: str, cwd: Path, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GSQBENCH_HOME": str(cwd / "home")}
    cmd = [sys.executable, "-m", "gsqbench", *argv]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_two_runs_with_different_specs_on_one_folder_and_a_killed_holder(tmp_path):
    """A trains; B (another spec, same folder) is refused with one line naming A; A is killed with SIGKILL while
    holding the lock; A run again takes the stale lock over, resumes from its checkpoint and finishes. Only A's
    spec is in the folder, and B never wrote a byte."""
    from gsqbench.config import load_suite
    from gsqbench.effective import expand_runs  # the effective-spec hash run.json records

    a, b = _suite(tmp_path / "a.yaml", 1e-3), _suite(tmp_path / "b.yaml", 2e-3)
    run_dir = tmp_path / "results" / "t" / "gsq-s0"
    first = _gsqbench("run", "a.yaml", "--threads", "1", cwd=tmp_path, wait=False)
    _wait_for(run_dir / "checkpoint" / "train_state.pt", first)
    os.kill(first.pid, signal.SIGSTOP)  # frozen mid-training: alive, holding the lock
    try:
        listing = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
        second = _gsqbench("run", "b.yaml", "--threads", "1", cwd=tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert re.fullmatch(rf"gsqbench: error: {re.escape(str(run_dir))} is being written by pid {first.pid} on host "
                            r".+, started \S+ \(gsqbench run t/gsq-s0\); .*\n", second.stderr), second.stderr
        assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == listing
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    assert (run_dir / LOCK_NAME).exists()  # left behind by the killed holder

    again = _gsqbench("run", "a.yaml", "--threads", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    err = again.stderr
    assert re.search(rf"taking over a stale lock \(pid {first.pid} no longer exists\)", err)
    resumed = re.search(r"^\[1/1\] gsq-s0 trained 40 steps in \S+ s \(resumed from step (\d+)\)$", err, re.M)
    assert resumed and 4 <= int(resumed.group(1)) < 40, err
    # logs to a pipe: one line per 10 % of training, one per stage, each distinct warning once
    tenths = re.findall(r"^gsq-s0 train: \d+/40 steps \((\d+) %\)", err, re.M)
    assert tenths and len(tenths) == len(set(tenths)) <= 10
    assert re.search(r"^\[1/1\] gsq-s0 evaluated 4 images in ", err, re.M)
    assert re.search(r"^\[1/1\] gsq-s0 done in ", err, re.M)
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == len(set(warnings))
    assert not (run_dir / LOCK_NAME).exists()

    hash_a = expand_runs(load_suite(a))[0].fairness_hash
    hash_b = expand_runs(load_suite(b))[0].fairness_hash
    assert hash_a != hash_b
    info = json.loads((run_dir / "run.json").read_text())
    assert info["fairness_hash"] == hash_a and info["spec"]["shared"]["train"]["lr"] == 1e-3
    text = "".join(p.read_text(errors="replace") for p in run_dir.rglob("*.csv")) + (run_dir / "run.json").read_text()
    assert hash_b not in text
    assert not [p for p in run_dir.rglob("*.tmp")]
