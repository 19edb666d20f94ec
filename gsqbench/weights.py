"""Offline weight manager: the pretrained files metrics need, verified by SHA-256, never fetched implicitly.

Follows metrics-protocol.md §11: files live under `$GSQBENCH_HOME/weights` (default `~/.cache/gsqbench`), are
checked against their full SHA-256 before use (torch.hub re-verifies nothing once a file is cached), and are made
visible where torch.hub/torchvision look (`$TORCH_HOME/hub/checkpoints/<URL basename>`) only when the user runs
`gsqbench weights import|download`. `download` is the only code path in gsqbench that touches the network.

Where the spec gives only the torch.hub hash prefix (or no hash), the full SHA-256 is pinned locally on first
provisioning (`pins.json`) and verified from then on. A manifest override (env `GSQBENCH_WEIGHTS_MANIFEST`, a
JSON file path or inline JSON `{name: {"filename", "sha256", "url"?}}`) registers other files, e.g. the
random-init stand-ins tests create; those are never conformant.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from gsqbench.errors import UserError, did_you_mean
from gsqbench.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file. `sha256` is the full hash, or only its leading hex digits when `sha256_is_prefix`."""

    name: str
    filename: str
    url: str
    sha256: Optional[str]  # None: unknown, recorded on first import/download
    size: Optional[int]  # approximate bytes (spec §11 gives ≈ sizes), informational only
    used_by: str
    sha256_is_prefix: bool = False
    note: str = ""
    official: bool = True  # False for manifest-override entries (tests, user stand-ins)


KNOWN_WEIGHTS: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            name="inception-fid",
            filename="weights-inception-2015-12-05-6726825d.pth",
            url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            "weights-inception-2015-12-05-6726825d.pth",
            # Full hash as published by a third-party repository (spec §11, unverified); prefix matches torch.hub.
            sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
            size=96_000_000,
            used_by="rfid@inception, is@inception, kid@inception (torch-fidelity inception-v3-compat)",
            note="full hash from a third-party listing (unverified)",
        ),
        WeightFile(
            name="alexnet",
            filename="alexnet-owt-7be5be79.pth",
            url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            sha256="7be5be79",
            sha256_is_prefix=True,
            size=233 * 2**20,
            used_by="lpips@alex (trunk via torchvision)",
            note="pin full hash on first provisioning",
        ),
        WeightFile(
            name="vgg16",
            filename="vgg16-397923af.pth",
            url="https://download.pytorch.org/models/vgg16-397923af.pth",
            sha256="397923af",
            sha256_is_prefix=True,
            size=528 * 2**20,
            used_by="lpips@vgg, LPIPS training loss (trunk via torchvision); precision@vgg16, recall@vgg16 "
            "(torch-fidelity FeatureExtractorVGG16, torchvision IMAGENET1K_V1)",
            note="pin full hash on first provisioning",
        ),
        WeightFile(
            name="dinov2-vits14-reg",
            filename="dinov2_vits14_reg4_pretrain.pth",
            url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
            sha256=None,
            size=None,
            used_by="DINO discriminator (GAN training)",
            note="hash unknown: recorded on first import/download",
        ),
        WeightFile(
            name="dinov2-vitl14",
            filename="dinov2_vitl14_pretrain.pth",
            # the file torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14') fetches (dinov2/hub/backbones.py),
            # which dgm-eval (Stein et al. 2023) uses for FD_DINOv2
            url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            sha256=None,
            size=1_217_586_395,  # as listed by a third-party repository (unverified)
            used_by="rfd@dinov2 (FD on DINOv2 ViT-L/14 class-token features)",
            note="hash unpublished: pinned on first import/download",
        ),
    )
}


class WeightsUnavailable(Exception):
    """A weight file is missing or fails its hash check. `.reason` says what, `.fix` is the command to run."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason, fix)
        self.reason = reason
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.reason}; fix: {self.fix}"


# ---------------------------------------------------------------------------------------------------------------
# Locations


def gsqbench_home() -> Path:
    return Path(os.environ.get("GSQBENCH_HOME") or Path.home() / ".cache" / "gsqbench").expanduser()


def weights_dir() -> Path:
    return gsqbench_home() / "weights"


def torch_hub_checkpoints_dir() -> Path:
    """Where torch.hub/torchvision/torch-fidelity look for cached files (same rule as torch.hub.get_dir())."""
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        torch_home = os.path.join(xdg, "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def display_path(path: Path) -> str:
    """`path` as messages and results show it: under the weights dir as `$GSQBENCH_HOME/weights/<file>`, so no
    home-directory path lands in results or committed baselines."""
    try:
        return "$GSQBENCH_HOME/weights/" + Path(path).relative_to(weights_dir()).as_posix()
    except ValueError:
        return str(path)


def _pins_path() -> Path:
    return weights_dir() / "pins.json"


# ---------------------------------------------------------------------------------------------------------------
# The table: built-ins, manifest override, local pins


def _read_manifest() -> dict[str, WeightFile]:
    raw = os.environ.get("GSQBENCH_WEIGHTS_MANIFEST", "").strip()
    if not raw:
        return {}
    source = "GSQBENCH_WEIGHTS_MANIFEST"
    try:
        if raw.startswith("{"):
            data = json.loads(raw)
        else:
            source = raw
            data = json.loads(Path(raw).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"weights manifest {source}: cannot read JSON ({exc}); expected {{name: {{filename, sha256}}}}")
    if not isinstance(data, dict):
        raise UserError(f"weights manifest {source}: top level is {type(data).__name__}; expected an object")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise UserError(f"weights manifest {source}: entry '{name}' needs a 'filename' string")
        filename = entry["filename"]
        if Path(filename).name != filename or filename in ("", ".", ".."):
            raise UserError(f"weights manifest {source}: entry '{name}' filename '{filename}' must be a plain file name")
        sha = entry.get("sha256")
        if sha is not None and not _is_hex(sha):
            raise UserError(f"weights manifest {source}: entry '{name}' sha256 '{sha}' is not hex")
        out[name] = WeightFile(
            name=name, filename=filename, url=str(entry.get("url", "")), sha256=sha.lower() if sha else None,
            size=entry.get("size"), used_by=str(entry.get("used_by", "manifest override")),
            sha256_is_prefix=bool(sha) and len(sha) < 64, official=False, note="manifest override (non-conformant)",
        )
    return out


def _is_hex(s: object) -> bool:
    return isinstance(s, str) and len(s) > 0 and all(c in "0123456789abcdefABCDEF" for c in s)


def _read_pins() -> dict[str, str]:
    try:
        data = json.loads(_pins_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and len(v) == 64 and _is_hex(v)}


def _record_pin(name: str, sha256: str) -> None:
    pins = _read_pins()
    pins[name] = sha256
    atomic_write_json(_pins_path(), pins)
    log.info("pinned %s sha256 %s", name, sha256)


def all_weights() -> dict[str, WeightFile]:
    """Built-in table updated by the manifest override (which may replace a built-in name)."""
    table = dict(KNOWN_WEIGHTS)
    table.update(_read_manifest())
    return table


def get_weight(name: str) -> WeightFile:
    table = all_weights()
    if name not in table:
        raise UserError(f"weight name '{name}' is unknown{did_you_mean(name, table)}")
    return table[name]


def expected_sha256(entry: WeightFile) -> tuple[Optional[str], bool]:
    """(hash to check, is_full). A local pin replaces a prefix or missing hash once provisioned."""
    if entry.sha256 and not entry.sha256_is_prefix:
        return entry.sha256, True
    pin = _read_pins().get(entry.name)
    if pin and (not entry.sha256 or pin.startswith(entry.sha256)):
        return pin, True
    return entry.sha256, False


# ---------------------------------------------------------------------------------------------------------------
# Hashing and verification

def _hash_ok(actual: str, expected: Optional[str], is_full: bool) -> bool:
    if expected is None:
        return True
    return actual == expected if is_full else actual.startswith(expected)


def _fix_for(entry: WeightFile) -> str:
    if entry.official and entry.url:
        return f"gsqbench weights download {entry.name} (offline: gsqbench weights import FILE)"
    return f"gsqbench weights import FILE --name {entry.name}"


def installed_path(name: str) -> Path:
    return weights_dir() / get_weight(name).filename


def weight_path(name: str) -> Path:
    """The verified local file for `name`, else WeightsUnavailable (missing file or wrong hash)."""
    return verified_file(name)[0]


def verified_file(name: str) -> tuple[Path, str]:
    """(path, full SHA-256) of the verified local file for `name`, hashed once; else WeightsUnavailable."""
    entry = get_weight(name)
    path = weights_dir() / entry.filename
    if not path.is_file():
        raise WeightsUnavailable(f"weight file '{name}' is not installed (expected {display_path(path)})",
                                 _fix_for(entry))
    expected, is_full = expected_sha256(entry)
    actual = sha256_file(path)
    if not _hash_ok(actual, expected, is_full):
        raise WeightsUnavailable(
            f"weight file {display_path(path)} has sha256 {actual[:16]}…, expected {expected[:16]}…", _fix_for(entry)
        )
    return path, actual


def is_conformant(name: str) -> bool:
    """True when the installed file's hash equals the official one (prefix where only a prefix is published)."""
    entry = get_weight(name)
    if not entry.official or not entry.sha256:
        return False
    try:
        path = weight_path(name)
    except WeightsUnavailable:
        return False
    actual = sha256_file(path)
    return actual.startswith(entry.sha256) if entry.sha256_is_prefix else actual == entry.sha256


def status(name: str) -> tuple[str, str]:
    """(status, detail) with status in ok | missing | mismatch | unpinned, for `weights list/verify`."""
    entry = get_weight(name)
    try:
        path = weight_path(name)
    except WeightsUnavailable as exc:
        return ("missing" if "not installed" in exc.reason else "mismatch"), str(exc)
    expected, is_full = expected_sha256(entry)
    if not is_full:
        return "unpinned", f"{path} (hash not pinned; run gsqbench weights import {path} --name {name})"
    return "ok", str(path)


# ---------------------------------------------------------------------------------------------------------------
# Provisioning: import, download, torch.hub visibility


def expose_in_torch_hub(name: str) -> Optional[Path]:
    """Symlink the verified file where torch.hub looks; an existing foreign file there is left alone."""
    entry = get_weight(name)
    src = weight_path(name)
    basename = entry.url.rsplit("/", 1)[-1] if entry.url else entry.filename
    dst = torch_hub_checkpoints_dir() / basename
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or not dst.exists():
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(src)
        os.replace(tmp, dst)  # atomic swap of the link
        return dst
    if sha256_file(dst) != sha256_file(src):
        log.warning("%s exists and differs from %s; torch.hub will use it, gsqbench will not", dst, src)
    return dst


def _expose_quietly(name: str) -> None:
    try:
        expose_in_torch_hub(name)
    except OSError as exc:  # an unwritable TORCH_HOME must not undo a good install
        log.warning("could not link %s into the torch.hub cache: %s", name, exc)


def _infer_name(src: Path) -> str:
    table = all_weights()
    for name, entry in table.items():
        if entry.filename == src.name or (entry.url and entry.url.rsplit("/", 1)[-1] == src.name):
            return name
    raise UserError(
        f"import {src}: cannot infer the weight name from the file name; pass --name (valid: {', '.join(sorted(table))})"
    )


def _check_new_file(entry: WeightFile, actual: str, what: str) -> None:
    expected, is_full = expected_sha256(entry)
    if not _hash_ok(actual, expected, is_full):
        pinned = is_full and expected != entry.sha256
        hint = f" (pinned locally in {_pins_path()}; remove that entry to accept another file)" if pinned else ""
        raise UserError(
            f"{what}: sha256 {actual} does not match the expected {'hash' if is_full else 'prefix'} {expected} "
            f"for '{entry.name}' ({entry.filename}){hint}"
        )


def import_file(src: str | os.PathLike, name: Optional[str] = None) -> Path:
    """Copy a local file into the weights dir after checking its hash; pin the full hash if not yet known."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"import: file {src} does not exist")
    entry = get_weight(name) if name else get_weight(_infer_name(src))
    actual = sha256_file(src)
    _check_new_file(entry, actual, f"import {src}")
    dst = weights_dir() / entry.filename
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != actual:  # the copy itself must be intact
            raise UserError(f"import {src}: copy to {dst} is corrupted (disk full?)")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _pin_if_needed(entry, actual)
    _expose_quietly(entry.name)
    return dst


def _pin_if_needed(entry: WeightFile, actual: str) -> None:
    _, is_full = expected_sha256(entry)
    if not is_full:
        _record_pin(entry.name, actual)


def download(
    name: str,
    *,
    url: Optional[str] = None,
    max_attempts: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    opener: Callable[..., object] = urllib.request.urlopen,
) -> Path:
    """Fetch a known file (the only network path): `.part` file, HTTP Range resume, sha256 check, atomic rename.

    A dropped connection is retried up to `max_attempts` times, each resuming where the part file ends.
    A hash mismatch deletes the part file and raises UserError; no final file is left behind.
    """
    entry = get_weight(name)
    url = url or entry.url
    if not url:
        raise UserError(f"weight '{name}' has no download URL; use gsqbench weights import FILE --name {name}")
    dst = weights_dir() / entry.filename
    part = dst.with_name(dst.name + ".part")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_file():
        try:
            weight_path(name)
            log.info("%s is already installed and verified: %s", name, dst)
            _expose_quietly(name)
            return dst
        except WeightsUnavailable:
            log.warning("%s fails its hash check; downloading it again", dst)
    for attempt in range(1, max_attempts + 1):
        try:
            _fetch_into(url, part, timeout=timeout, progress=progress, opener=opener, desc=entry.filename)
            break
        except (OSError, http.client.HTTPException) as exc:  # URLError, resets, timeouts, IncompleteRead
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise UserError(f"download {name}: HTTP {exc.code} from {url}") from None
            log.warning("download %s attempt %d/%d interrupted: %s", name, attempt, max_attempts, exc)
            if attempt == max_attempts:
                raise UserError(
                    f"download {name}: failed after {max_attempts} attempts ({exc}); rerun to resume from {part}"
                ) from None
            time.sleep(min(2.0 ** (attempt - 1), 10.0) * 0.1)
    actual = sha256_file(part)
    try:
        _check_new_file(entry, actual, f"download {url}")
    except UserError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dst)
    _pin_if_needed(entry, actual)
    _expose_quietly(name)
    return dst


def _fetch_into(url: str, part: Path, *, timeout: float, progress: bool, opener, desc: str) -> None:
    """Append the rest of `url` to `part` (Range request when part exists). Raises on a short read."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "gsqbench", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        resp = opener(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # part already complete
            return
        raise
    with resp:
        status_code = getattr(resp, "status", 200)
        if have and status_code != 206:  # server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        from tqdm import tqdm

        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=desc, disable=not progress
        ) as bar:
            got = 0
            while True:
                block = resp.read(_CHUNK)
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if length is not None and got < int(length):
        raise ConnectionError(f"connection closed after {have + got} of {total} bytes")
