"""The results store: one directory per run, written atomically, read back without torch.

Layout (docs/contracts.md "Results"):

    <results_root>/<suite>/<run_id>/
        run.json  metrics.csv  per_image.csv  train_log.csv  codes.npz  samples/{real,recon}/<id>.png

There is no shared index file: runs are discovered by globbing for `metrics.csv`, so any number of processes can
write different runs into one root at once and nothing is lost (every file goes through `gsqbench.io`'s temp file
+ rename). Metric rows follow the long format of lm-evaluation-harness-style results: one row per run × metric
with value, stderr, interval, direction and the hashes that say which rows may be compared.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from gsqbench.errors import UserError
from gsqbench.io import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_dir, safe_child, safe_name,
)

if TYPE_CHECKING:  # pandas is imported lazily so writers stay cheap inside training processes
    import pandas as pd

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
RUN_FILE = "run.json"
PER_IMAGE_FILE = "per_image.csv"
TRAIN_LOG_FILE = "train_log.csv"
CODES_FILE = "codes.npz"

#: columns of metrics.csv, in order (contracts.md)
METRIC_COLUMNS: tuple[str, ...] = (
    "suite", "run", "subject", "seed", "metric", "value", "stderr", "ci_low", "ci_high", "direction", "n",
    "unavailable", "fairness_hash", "card_hash", "device", "not_comparable",
)
#: run.json `status` values: `done` = trained (or loaded) and evaluated, results complete; `diverged` = training
#: stopped at a non-finite loss or gradient norm (run.json `divergence`: step, term, value; metrics.csv holds the
#: train_* rows only, no evaluation)
STATUS_DONE = "done"
STATUS_DIVERGED = "diverged"
RUN_STATUSES = (STATUS_DONE, STATUS_DIVERGED)
DIRECTIONS = ("lower", "higher", "none")
_FLOAT_COLS = ("value", "stderr", "ci_low", "ci_high")
#: packages whose versions every run records (metrics-protocol.md §12 "Runtime")
VERSION_PACKAGES = ("gsqbench", "torch", "torchvision", "torch-fidelity", "lpips", "scikit-image", "numpy",
                    "pandas", "matplotlib")


# ----------------------------------------------------------------------------------------------- provenance
def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions(names: Iterable[str] = VERSION_PACKAGES) -> dict[str, str | None]:
    """Installed versions via importlib.metadata: never imports the packages themselves (torch stays unloaded)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _default_device() -> str:
    # Only ask torch when something already imported it: provenance must not drag torch into report processes.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def provenance(*, device: str | None = None, precision: str = "fp32", world_size: int = 1,
               repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Git SHA and dirty flag, library versions, device, precision, world size and UTC date of this run."""
    repo = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent.parent
    sha = _git(["rev-parse", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) if sha else None
    return {
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "versions": package_versions(),
        "device": device or _default_device(),
        "precision": precision,
        "world_size": int(world_size),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------------------------- image ids
#: the extra crops of one image (data.crops_per_image, gsqbench.data.MultiCrop) have ids '<image id>#crop<j>'
CROP_ID_MARK = "#crop"


def original_image_id(image_id: str) -> str:
    """The id of the image a crop was cut from (itself for a plain image id)."""
    return image_id.split(CROP_ID_MARK, 1)[0]


def image_clusters(image_ids: Sequence[str]) -> "np.ndarray | None":
    """Cluster index per id (the crops of one original share one, numbered in order of first appearance), or None
    when every id is its own original. Crops of one photo are not independent samples: intervals resample them
    together (metrics-protocol.md, "Several crops per image")."""
    if not any(CROP_ID_MARK in i for i in image_ids):
        return None
    index: dict[str, int] = {}
    return np.array([index.setdefault(original_image_id(i), len(index)) for i in image_ids], dtype=np.int64)


# ----------------------------------------------------------------------------------------------- writing
def run_dir_for(results_root: str | os.PathLike, suite: str, run_id: str) -> Path:
    """`<root>/<suite>/<run_id>` with both names sanitised so they can never leave the root."""
    return safe_child(results_root, suite, run_id)


#: written by `gsqbench eval` into every folder it creates; an existing folder without it is not eval's to write
EVAL_MARKER = ".gsqbench-eval.json"
#: hidden bookkeeping files that do not make a folder "someone else's"
_BOOKKEEPING = (EVAL_MARKER, ".gsqbench.lock")


def default_eval_dir(results_root: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """`<root>/eval/<name>-<8 hex of sha256(absolute path)>`: two checkpoints that share a basename never share a
    folder, and the same checkpoint always gets the same one (a re-evaluation replaces its own results)."""
    resolved = Path(checkpoint).absolute().resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:8]
    return safe_child(results_root, "eval", f"{resolved.name}-{digest}")


def eval_dir_state(out_dir: str | os.PathLike, *, force: bool = False) -> str:
    """'new' (absent or empty), 'eval' (created by gsqbench eval) or 'forced'; refuses a folder eval did not create.

    Reads only: call it on every rank before anything is written. A UserError names what the folder holds.
    """
    out = check_output_dir(out_dir, "--out")
    if not out.exists():
        return "new"
    entries = sorted(p.name for p in out.iterdir() if p.name not in _BOOKKEEPING and not p.name.endswith(".tmp"))
    if (out / EVAL_MARKER).is_file():
        return "eval"
    if not entries:
        return "new"
    if force:
        return "forced"
    raise UserError(f"--out {out}: refusing to write into a folder that `gsqbench eval` did not create (it holds "
                    f"{_describe_folder(out, entries)}); choose another --out, or pass --force to replace its "
                    "evaluation files (run.json, metrics.csv, per_image.csv, codes.npz, samples/)")


def _describe_folder(out: Path, entries: Sequence[str]) -> str:
    try:
        info = read_run_info(out)
    except UserError:
        info = {}
    if info.get("run_id"):
        return f"results of run '{info.get('run_id')}' of suite '{info.get('suite', '?')}'"
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}"


def mark_eval_dir(out_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Record that `gsqbench eval` created `out_dir` (so later evaluations may replace their own results there)."""
    return atomic_write_json(Path(out_dir) / EVAL_MARKER, {
        "created_by": "gsqbench eval", "checkpoint": str(Path(checkpoint).absolute()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _as_dict(metric: Any) -> dict[str, Any]:
    if is_dataclass(metric) and not isinstance(metric, type):
        return asdict(metric)
    if isinstance(metric, Mapping):
        return dict(metric)
    raise UserError(f"metrics: expected MetricValue or dict, got {type(metric).__name__}")


def fmt_float(value: Any) -> str:
    if value is None:
        return ""
    value = float(value)
    return "nan" if math.isnan(value) else repr(value)  # repr round-trips float64 exactly


def _fmt_opt(value: Any) -> str:
    return "" if value is None else str(value)


def metric_rows(run_info: Mapping[str, Any], metrics: Sequence[Any]) -> list[dict[str, str]]:
    """The metrics.csv rows (as strings) for one run; validates names and directions."""
    prov = run_info.get("provenance") or {}
    device = run_info.get("device") or prov.get("device") or ""
    rows, seen = [], set()
    for m in metrics:
        d = _as_dict(m)
        name = str(d.get("name") or d.get("metric") or "")
        if not name:
            raise UserError(f"metrics: a row has no metric name: {d!r}")
        if name in seen:
            raise UserError(f"metrics: metric '{name}' appears twice for run '{run_info.get('run_id')}'")
        seen.add(name)
        direction = d.get("direction") or "none"
        if direction not in DIRECTIONS:
            raise UserError(f"metrics: direction '{direction}' of '{name}' is invalid; valid: {', '.join(DIRECTIONS)}")
        value = d.get("value")
        rows.append({
            "suite": str(run_info.get("suite", "")), "run": str(run_info.get("run_id", "")),
            "subject": str(run_info.get("subject", "")), "seed": _fmt_opt(run_info.get("seed")),
            "metric": name, "value": fmt_float(float("nan") if value is None else value),
            "stderr": fmt_float(d.get("stderr")), "ci_low": fmt_float(d.get("ci_low")),
            "ci_high": fmt_float(d.get("ci_high")), "direction": direction, "n": _fmt_opt(d.get("n")),
            "unavailable": _fmt_opt(d.get("unavailable")),
            "fairness_hash": str(run_info.get("fairness_hash", "")), "card_hash": str(run_info.get("card_hash", "")),
            "device": str(device), "not_comparable": _fmt_opt(d.get("not_comparable")),
        })
    return rows


def rows_to_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_run(run_dir: str | os.PathLike, run_info: Mapping[str, Any], metrics: Sequence[Any], *,
              per_image: Mapping[str, Sequence[Any]] | None = None, code_counts: np.ndarray | None = None,
              samples: Sequence[str] | None = None) -> Path:
    """The one results writer (`run` and `eval`): per_image.csv, codes.npz, metrics.csv, then run.json, atomically.

    `run_info` carries run_id, suite, subject, seed, grid, spec, fairness_hash, card, card_hash, provenance, status
    (default `done`); `provenance` is filled when the caller gave none. run.json is written last, so a reader that
    sees it sees complete results. Each file replaces its previous version only once complete; if a write fails,
    the previous files stay as they were. After run.json, what an earlier evaluation left and this one did not
    write is removed, so results never mix: per_image.csv / codes.npz when not given, and, when `samples` (the
    image ids whose PNGs this evaluation saved, all ranks) is given, every other PNG under samples/.
    """
    info = dict(run_info)
    for key in ("run_id", "suite", "subject"):
        if not info.get(key):
            raise UserError(f"run_info: field '{key}' is missing or empty; it names the run in every result row")
    info.setdefault("provenance", provenance())
    info.setdefault("status", STATUS_DONE)
    info.setdefault("grid", {})
    if info["status"] not in RUN_STATUSES:
        raise UserError(f"run_info: status {info['status']!r} is invalid; valid: {', '.join(RUN_STATUSES)}")
    run_dir = Path(run_dir)
    rows = metric_rows(info, metrics)  # validate before anything is written
    if per_image:
        write_per_image(run_dir, per_image)
    if code_counts is not None:
        write_code_counts(run_dir, code_counts)
    atomic_write_text(run_dir / METRICS_FILE, rows_to_csv(rows, METRIC_COLUMNS))
    atomic_write_json(run_dir / RUN_FILE, info)
    remove_stale_outputs(run_dir, per_image=bool(per_image), code_counts=code_counts is not None, samples=samples)
    return run_dir


def remove_stale_outputs(run_dir: str | os.PathLike, *, per_image: bool, code_counts: bool,
                         samples: Sequence[str] | None) -> list[Path]:
    """Delete result files of an earlier evaluation that the latest one did not rewrite; returns what went."""
    run_dir = Path(run_dir)
    stale = [run_dir / name for name, kept in ((PER_IMAGE_FILE, per_image), (CODES_FILE, code_counts))
             if not kept and (run_dir / name).is_file()]
    if samples is not None:
        keep = {safe_name(i) for i in samples} | {str(i) for i in samples}
        for kind in ("real", "recon"):
            stale += [p for p in sorted((run_dir / "samples" / kind).glob("*.png")) if p.stem not in keep]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("%s: removed %d file(s) left by an earlier evaluation", run_dir, len(stale))
    return stale


def write_per_image(run_dir: str | os.PathLike, per_image: Mapping[str, Sequence[Any]]) -> Path:
    """per_image.csv from column → values (`image_id` first, as evaluate() returns it)."""
    if "image_id" not in per_image:
        raise UserError("per_image: column 'image_id' is missing")
    columns = ["image_id"] + [c for c in per_image if c != "image_id"]
    lengths = {c: len(per_image[c]) for c in columns}
    if len(set(lengths.values())) > 1:
        raise UserError(f"per_image: columns have different lengths {lengths}")
    rows = [{c: (fmt_float(per_image[c][i]) if c != "image_id" else str(per_image[c][i])) for c in columns}
            for i in range(lengths["image_id"])]
    return atomic_write_text(Path(run_dir) / PER_IMAGE_FILE, rows_to_csv(rows, columns))


def write_train_log(run_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """train_log.csv (step, loss, loss_*, lr, images_per_s, time_s, then any other column) rewritten whole, atomically."""
    seen = list(dict.fromkeys(k for row in rows for k in row))
    columns = list(dict.fromkeys(["step", "loss", *[k for k in seen if k.startswith("loss_")],
                                  "lr", "images_per_s", "time_s", *seen]))
    return atomic_write_text(Path(run_dir) / TRAIN_LOG_FILE, rows_to_csv(rows, columns))


def read_train_log_rows(run_dir: str | os.PathLike) -> list[dict[str, str]]:
    """train_log.csv as rows of strings without pandas (what a resumed training appends to); [] when absent."""
    return read_csv_rows(Path(run_dir) / TRAIN_LOG_FILE)


def write_code_counts(run_dir: str | os.PathLike, counts: np.ndarray) -> Path:
    """codes.npz with `counts` (G, V) int64: per-group code histograms for usage and Zipf plots."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer):
        raise UserError(f"code counts: expected an integer (G, V) array, got {counts.dtype} {counts.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, counts=counts.astype(np.int64))
    return atomic_write_bytes(Path(run_dir) / CODES_FILE, buf.getvalue())


def write_samples(run_dir: str | os.PathLike, image_ids: Sequence[str], real_u8: Any, recon_u8: Any) -> list[Path]:
    """samples/real/<id>.png and samples/recon/<id>.png from uint8 (N, 3, H, W) arrays (numpy or CPU tensors):
    the exact evaluated pixels, losslessly. Ids are sanitised into file names (safe_name)."""
    from PIL import Image

    real, recon = (np.asarray(a.cpu() if hasattr(a, "cpu") else a) for a in (real_u8, recon_u8))
    if real.dtype != np.uint8 or recon.dtype != np.uint8 or real.shape != recon.shape or real.ndim != 4 \
            or real.shape[1] != 3 or len(image_ids) != real.shape[0]:
        raise UserError(f"samples: expected two uint8 (N, 3, H, W) arrays and N ids, got {real.dtype} {real.shape}, "
                        f"{recon.dtype} {recon.shape}, {len(image_ids)} ids")
    written = []
    for kind, arr in (("real", real), ("recon", recon)):
        for image_id, img in zip(image_ids, arr):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, format="PNG")
            written.append(atomic_write_bytes(safe_child(run_dir, "samples", kind, f"{image_id}.png"), buf.getvalue()))
    return written


# ----------------------------------------------------------------------------------------------- reading
def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a small CSV as dicts of strings ([] when the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None


def read_per_image(run_dir: str | os.PathLike) -> "pd.DataFrame | None":
    return _read_frame(Path(run_dir) / PER_IMAGE_FILE, dtype={"image_id": str})


def read_train_log(run_dir: str | os.PathLike) -> "pd.DataFrame | None":
    return _read_frame(Path(run_dir) / TRAIN_LOG_FILE)


def _read_frame(path: Path, dtype: dict | None = None) -> "pd.DataFrame | None":
    import pandas as pd

    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=dtype, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None


def read_code_counts(run_dir: str | os.PathLike) -> np.ndarray | None:
    """The (G, V) int64 counts, or None when the run did not store them (huge V). Never unpickles."""
    path = Path(run_dir) / CODES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            counts = np.asarray(data["counts"])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a codes.npz with a 'counts' array ({exc})") from None
    if counts.ndim != 2:
        raise UserError(f"{path}: 'counts' must be (G, V), got shape {counts.shape}")
    return counts.astype(np.int64)


def sample_ids(run_dir: str | os.PathLike) -> list[str]:
    """Image ids that have both a real and a reconstructed sample PNG, sorted."""
    root = Path(run_dir) / "samples"
    real = {p.stem for p in (root / "real").glob("*.png")}
    recon = {p.stem for p in (root / "recon").glob("*.png")}
    return sorted(real & recon)


def find_run_dirs(*roots: str | os.PathLike, markers: Sequence[str] = (METRICS_FILE,)) -> list[Path]:
    """Every directory below `roots` (or a root itself) that holds one of `markers`, sorted and de-duplicated.

    A marker is a file name, or 'folder/name' for a file inside a sub-folder of the run (e.g. a checkpoint)."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise UserError(f"results path '{root}' does not exist")
        if root.is_file():
            if root.name != METRICS_FILE:
                raise UserError(f"results path '{root}' is a file; give a results directory or a metrics.csv")
            found.add(root.parent.resolve())
            continue
        for marker in markers:
            *parent, name = marker.split("/")
            for p in root.rglob(name):
                if not parent:
                    found.add(p.parent.resolve())
                elif p.parent.name == parent[0]:
                    found.add(p.parent.parent.resolve())
    return sorted(found)


def check_csv_complete(path: Path, required: Sequence[str] = ("metric", "value")) -> str:
    """The text of a results CSV written by `write_run`, or a UserError saying how it is damaged.

    A file cut short (disk full, a copy interrupted, a killed writer outside gsqbench) would otherwise parse
    as fewer or half rows: every row must have exactly the header's number of fields and the file must end with
    a newline, as the writer leaves it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None
    header = rows[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(METRIC_COLUMNS)}")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(f"{path}: line {i} has {len(row)} of {len(header)} fields (file truncated or corrupt)")
    if not text.endswith("\n"):
        raise UserError(f"{path}: truncated (the last line, line {len(rows)}, has no end of line)")
    return text


def _read_metrics_csv(path: Path) -> "pd.DataFrame":
    import pandas as pd

    text = check_csv_complete(path)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: not a readable metrics CSV ({exc})") from None
    return df


def read_metrics(run_dir: str | os.PathLike) -> "pd.DataFrame":
    """One run's metrics.csv, checked complete and normalised (numeric columns parsed); UserError naming the file
    and the damage otherwise."""
    path = Path(run_dir) / METRICS_FILE
    return normalize_metrics_frame(_read_metrics_csv(path), str(path))


def _parse_float(value: Any, column: str, source: str) -> float:
    if value is None or value == "":
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: column '{column}' has non-numeric value {value!r}; expected a number, "
                        "'nan' or empty") from None


def normalize_metrics_frame(df: "pd.DataFrame", source: str = "results") -> "pd.DataFrame":
    """Give a long-format frame every METRIC_COLUMNS column with numeric dtypes for the numbers."""
    import pandas as pd

    df = df.copy()
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    for col in _FLOAT_COLS:
        df[col] = [_parse_float(v, col, source) for v in df[col].tolist()]
    df["n"] = pd.to_numeric(df["n"], errors="coerce")
    for col in METRIC_COLUMNS:
        if col not in _FLOAT_COLS and col != "n":
            df[col] = df[col].fillna("").astype(str)
    bad = sorted(set(df["direction"]) - set(DIRECTIONS) - {""})
    if bad:
        raise UserError(f"{source}: direction {bad[0]!r} is invalid; valid: {', '.join(DIRECTIONS)}")
    df["direction"] = df["direction"].replace("", "none")
    return df


def load_results(*dirs: str | os.PathLike) -> "pd.DataFrame":
    """Concatenate every metrics.csv found (recursively) under `dirs`; adds a `run_dir` column.

    Raises UserError when a path does not exist or holds no results.
    """
    import pandas as pd

    if not dirs:
        raise UserError("no results directories given")
    run_dirs = find_run_dirs(*dirs)
    if not run_dirs:
        raise UserError(f"no {METRICS_FILE} found under {', '.join(str(d) for d in dirs)}")
    frames = []
    for rd in run_dirs:
        df = read_metrics(rd)
        df["run_dir"] = str(rd)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
