"""Weight manager: verification, import, and the one network path (download) against a local HTTP server.

Expected hashes come from hashlib over the test's own bytes (an independent oracle); the server is stdlib
http.server on 127.0.0.1 with Range support, bounded to a few requests so it stops by itself.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading

import pytest

from gsqbench import weights
from gsqbench.cli import main
from gsqbench.errors import UserError

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # > one read chunk so progress and resume are exercised
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    return tmp_path


def _manifest(monkeypatch, tmp_path, entries: dict) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entries))
    monkeypatch.setenv("GSQBENCH_WEIGHTS_MANIFEST", str(path))


class _Server:
    """Serves PAYLOAD at /w.pth; optionally drops the first connection half-way. Stops after `max_requests`."""

    def __init__(self, drop_first: bool, max_requests: int = 4):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append({"path": self.path, "range": rng})
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = PAYLOAD[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                self.end_headers()
                if drop_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5.0  # handle_request returns after 5 s idle: the loop below always ends
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/w.pth"
        self.thread = threading.Thread(target=self._serve, args=(max_requests,), daemon=True)

    def _serve(self, max_requests: int) -> None:
        for _ in range(max_requests):
            self.httpd.handle_request()
            if len(self.requests) >= max_requests:
                break

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=15)
        self.httpd.server_close()


def test_download_resumes_verifies_and_exposes(store, monkeypatch, capsys):
    with _Server(drop_first=True, max_requests=2) as srv:
        _manifest(monkeypatch, store, {"test-net": {"filename": "test-net.pth", "sha256": SHA, "url": srv.url}})
        rc = main(["weights", "download", "test-net"])
    assert rc == 0
    # first request cut mid-file, second resumed exactly where the part file ended
    assert srv.requests[0]["range"] is None
    assert srv.requests[1]["range"] == f"bytes={len(PAYLOAD) // 2}-"
    err = capsys.readouterr().err
    assert "test-net.pth" in err and "100%" in err  # tqdm progress bar reached the end
    path = weights.weight_path("test-net")
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name(path.name + ".part").exists()
    link = store / "torch" / "hub" / "checkpoints" / "w.pth"
    assert link.is_symlink() and link.resolve() == path.resolve()
    assert weights.is_conformant("test-net") is False  # manifest files never are
    # already installed and verified: no network (the server is gone, so a request would fail)
    assert weights.download("test-net", max_attempts=1, progress=False) == path


def test_download_hash_mismatch_leaves_nothing(store, monkeypatch, capsys):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with _Server(drop_first=False, max_requests=1) as srv:
        _manifest(monkeypatch, store, {"test-net": {"filename": "test-net.pth", "sha256": wrong, "url": srv.url}})
        rc = main(["weights", "download", "--no-progress", "test-net"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gsqbench: error:") and SHA in err[0] and wrong in err[0]
    wdir = store / "home" / "weights"
    assert not (wdir / "test-net.pth").exists()
    assert not (wdir / "test-net.pth.part").exists()
    assert not (store / "torch" / "hub" / "checkpoints" / "w.pth").exists()


def test_missing_weights_raise_with_fix(store):
    with pytest.raises(weights.WeightsUnavailable) as info:
        weights.weight_path("inception-fid")
    assert "not installed" in info.value.reason
    assert info.value.fix.startswith("gsqbench weights download inception-fid")
    assert "fix: gsqbench weights download inception-fid" in str(info.value)
    assert weights.is_conformant("inception-fid") is False
    with pytest.raises(UserError, match="did you mean 'alexnet'"):
        weights.weight_path("alexnett")


def test_import_pins_prefix_hash_and_detects_corruption(store, monkeypatch, tmp_path):
    src = tmp_path / "mine-abc.pth"
    src.write_bytes(b"stand-in weights" * 100)
    full = hashlib.sha256(src.read_bytes()).hexdigest()
    _manifest(monkeypatch, store, {"mine": {"filename": "mine-abc.pth", "sha256": full[:8]}})
    assert main(["weights", "import", str(src)]) == 0  # name inferred from the file name
    assert weights.status("mine")[0] == "ok"
    assert json.loads((store / "home" / "weights" / "pins.json").read_text())["mine"] == full
    installed = weights.weight_path("mine")
    installed.write_bytes(b"tampered")  # size and mtime change: the cached hash must not hide it
    with pytest.raises(weights.WeightsUnavailable, match="expected"):
        weights.weight_path("mine")
    assert main(["weights", "verify"]) == 2


def test_import_rejects_wrong_file_and_unknown_name(store, monkeypatch, tmp_path, capsys):
    src = tmp_path / "alexnet-owt-7be5be79.pth"
    src.write_bytes(b"not alexnet")  # its sha256 does not start with 7be5be79
    assert main(["weights", "import", str(src)]) == 2
    assert "7be5be79" in capsys.readouterr().err
    assert not (store / "home" / "weights" / "alexnet-owt-7be5be79.pth").exists()
    other = tmp_path / "random.bin"
    other.write_bytes(b"x")
    assert main(["weights", "import", str(other)]) == 2
    assert "--name" in capsys.readouterr().err


def test_manifest_override_marks_builtin_non_conformant(store, monkeypatch, tmp_path, capsys):
    src = tmp_path / "inc.pth"
    src.write_bytes(b"random inception stand-in")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    _manifest(monkeypatch, store, {"inception-fid": {"filename": "inc.pth", "sha256": sha}})
    assert main(["weights", "import", str(src), "--name", "inception-fid"]) == 0
    assert weights.weight_path("inception-fid").read_bytes() == src.read_bytes()
    assert weights.is_conformant("inception-fid") is False
    capsys.readouterr()
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "inception-fid" in out and "ok" in out and "missing" in out  # alexnet etc. still missing


def test_unknown_hash_is_recorded_on_import(store, tmp_path):
    src = tmp_path / "dinov2_vits14_reg4_pretrain.pth"  # built-in entry without a published hash
    src.write_bytes(b"dino stand-in")
    assert weights.import_file(src).name == src.name
    assert weights.status("dinov2-vits14-reg")[0] == "ok"
    pins = json.loads((store / "home" / "weights" / "pins.json").read_text())
    assert pins["dinov2-vits14-reg"] == hashlib.sha256(b"dino stand-in").hexdigest()
    assert weights.is_conformant("dinov2-vits14-reg") is False  # nothing official to compare with
    link = store / "torch" / "hub" / "checkpoints" / src.name
    assert link.is_symlink()
    other = tmp_path / "x" / src.name
    other.parent.mkdir()
    other.write_bytes(b"a different file")
    with pytest.raises(UserError, match="pinned locally"):  # the pin now guards the name
        weights.import_file(other)
