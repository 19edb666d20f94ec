"""Orchestration: a suite's runs (train → evaluate → results), and the evaluation of one checkpoint.

`run_suite` expands subjects × seeds × grid into runs, skips finished ones, trains, evaluates with the exported
(EMA) weights, writes each run's results directory (gsqbench.results.write_run), optionally renders the report and
summarises. A run counts as finished when its run.json says `status: done` and its exported checkpoint exists, so
re-running a suite after a crash redoes only what is missing (training itself resumes from its last checkpoint).
`evaluate_checkpoint` is the library form of `gsqbench eval`: load a checkpoint (ours or an official release),
evaluate it on a dataset, write the same results layout.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gsqbench.config import DataSource, EvalSpec, RunSpec, Suite, expand_runs
from gsqbench.errors import UserError

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("rfid@inception", "psnr", "ssim", "lpips@alex", "usage_pooled", "ppl_pooled", "bits_per_token",
                   "train_images_per_s", "train_time_s")


@dataclass
class SuiteResult:
    run_dirs: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # run_id -> metric -> value
    report: Optional[Path] = None


# ----------------------------------------------------------------------------------------------- data
def open_dataset(source: DataSource, *, strict: bool = False, role: str = "train",
                 min_size: Optional[int] = None) -> Any:
    """Build a dataset through gsqbench.data; errors name the config key (`shared.data.<role>.*`)."""
    from gsqbench import data

    try:
        ds = data.build_dataset(source.kind, path=source.path, split=role, resolution=source.size, crop=source.crop,
                                n=source.limit, seed=source.seed, strict=strict or source.strict, min_size=min_size)
    except UserError as exc:  # data.py names its fields 'data.<field>'; point at the suite's key instead
        msg = str(exc)
        msg = f"shared.data.{role}.{msg[5:]}" if msg.startswith("data.") else f"shared.data.{role}: {msg}"
        raise UserError(msg) from None
    if len(ds) == 0:
        raise UserError(f"config key 'shared.data.{role}.path': {source.path!r} contains no images")
    return ds


# ----------------------------------------------------------------------------------------------- per run
def is_finished(run: RunSpec, run_dir: Path) -> bool:
    """True when run.json says done and the checkpoint exists; a finished run of ANOTHER spec is refused."""
    from gsqbench.results import STATUS_DONE, read_run_info

    if not (run_dir / "run.json").exists() or not (run_dir / "checkpoint" / "model.safetensors").exists():
        return False
    try:
        info = read_run_info(run_dir)
    except (UserError, ValueError):
        return False
    if info.get("status") != STATUS_DONE:
        return False
    if info.get("fairness_hash") != run.fairness_hash or (info.get("spec") or {}).get("quantizer") != run.quantizer:
        raise UserError(f"{run_dir} holds finished results of run {run.run_id!r} with a different spec "
                        "(shared settings or quantizer changed); use another --results root or delete that directory")
    return True


def eval_settings(run: RunSpec, require: Sequence[str] = (), weights: str = "ema", progress: bool = True,
                  fid_cache_dir: Optional[str] = None) -> Any:
    """gsqbench.evaluate.EvalSettings for one run: the suite's eval spec plus the run's seed and workers.

    `fid_cache_dir` (unless the suite sets its own) lets every subject of a suite reuse the real-side FID
    statistics, keyed by data + extractor (metrics-protocol §6), instead of re-running Inception on the originals.
    """
    from gsqbench.evaluate import EvalSettings

    e = run.shared.eval
    return EvalSettings.from_spec(
        e, require=tuple(sorted({*e.require, *require})), weights=weights, seed=run.seed,
        num_workers=run.shared.data.num_workers, progress=progress,
        fid_cache_dir=e.fid_cache_dir if e.fid_cache_dir is not None else fid_cache_dir)


def run_one(run: RunSpec, run_dir: Path, *, device: str, strict_data: bool, require: Sequence[str],
            progress: bool, label: str = "", min_size: Optional[int] = None) -> dict[str, float]:
    """Train (or resume) then evaluate one run and write its results directory; returns metric -> value.

    `label` (e.g. "[2/4] vq-s0") starts the one-line stage messages (gsqbench.progress); `min_size` refuses
    evaluation images whose shorter side is below it (README "Corrupt and small images")."""
    import torch

    from gsqbench import distributed as ddp
    from gsqbench.evaluate import evaluate
    from gsqbench.progress import fmt_seconds, stage
    from gsqbench.results import provenance, write_run
    from gsqbench.train import train_metrics, train_run

    label = label or run.run_id
    train_ds = open_dataset(run.shared.data.train, strict=strict_data, role="train")
    eval_ds = open_dataset(run.shared.data.eval, strict=strict_data, role="eval", min_size=min_size)
    trained = train_run(run, run_dir, train_ds, device=device, progress=progress)
    if ddp.is_main():
        resumed = f" (resumed from step {trained.resumed_from})" if trained.resumed_from is not None else ""
        stage("%s trained %d steps in %s%s", label, trained.steps, fmt_seconds(trained.time_s), resumed)
    dev = next(trained.model.parameters()).device
    settings = eval_settings(run, require, trained.weights, progress, str(run_dir.parent / ".fid-cache"))
    t0 = time.perf_counter()
    with torch.no_grad():
        ev = evaluate(trained.model, eval_ds, settings, device=dev, out_dir=run_dir,
                      model_info={"fairness_hash": run.fairness_hash, "step": trained.steps,
                                  "weights": trained.weights})
    metrics = [*ev.metrics, *train_metrics(trained)]
    saved = sorted({i for part in ddp.all_gather_objects(ev.samples) for i in part})
    if ddp.is_main():
        stage("%s evaluated %d images in %s", label, len(ev.per_image.get("image_id", [])),
              fmt_seconds(time.perf_counter() - t0))
        info = {
            "run_id": run.run_id, "suite": run.suite, "subject": run.subject, "seed": run.seed,
            "grid": dict(run.grid), "spec": run.spec_json(),
            "fairness_hash": run.fairness_hash, "card": ev.card, "card_hash": ev.card_hash,
            "weights": trained.weights, "train_steps": trained.steps, "resumed_from": trained.resumed_from,
            "train": trained.card,
            "provenance": provenance(device=str(dev), precision=run.shared.train.precision,
                                     world_size=ddp.world_size()),
        }
        write_run(run_dir, info, metrics, per_image=ev.per_image, code_counts=ev.code_counts, samples=saved)
    return {m.name: m.value for m in metrics}


def _finished_metrics(run_dir: Path) -> dict[str, float]:
    from gsqbench.results import read_csv_rows

    out = {}
    for row in read_csv_rows(run_dir / "metrics.csv"):
        try:
            out[row["metric"]] = float(row["value"])
        except (KeyError, ValueError):
            continue
    return out


# ----------------------------------------------------------------------------------------------- suite
def run_suite(suite: Suite, results_root: str | Path, only: Optional[list[str]] = None, *, device: str = "cpu",
              report_dir: Optional[str | Path] = None, strict_data: bool = False, require: Sequence[str] = (),
              progress: bool = True, min_size: Optional[int] = None) -> SuiteResult:
    """Run every (not yet finished) run of `suite` under `results_root/<suite>/<run_id>`.

    Each run folder is locked while its run is checked, trained, evaluated and written (gsqbench.locks, held by
    rank 0): a second process on the same folder is refused with one line naming the holder, so two suites with
    different specs can never mix results in one folder.
    """
    from gsqbench import distributed as ddp
    from gsqbench.progress import fmt_seconds, stage
    from gsqbench.results import run_dir_for
    from gsqbench.validate import validate_suite

    validate_suite(suite)
    runs = expand_runs(suite, only)
    if require:  # fail before hours of training, not after
        from gsqbench.metrics.catalogue import check_required_weights

        eval_settings(runs[0], require)
        check_required_weights(tuple(require))
    ddp.init_from_env(device)  # the locks are coordinated across ranks from the first run on
    out = SuiteResult()
    for i, run in enumerate(runs):
        run_dir = run_dir_for(results_root, suite.suite, run.run_id)
        out.run_dirs.append(run_dir)
        label = f"[{i + 1}/{len(runs)}] {run.run_id}"
        t0 = time.perf_counter()
        with ddp.rank0_lock(run_dir, f"gsqbench run {suite.suite}/{run.run_id}"):
            if is_finished(run, run_dir):
                stage("%s finished earlier, skipped", label)
                out.skipped.append(run.run_id)
                out.summary[run.run_id] = _finished_metrics(run_dir)
                continue
            out.summary[run.run_id] = run_one(run, run_dir, device=device, strict_data=strict_data,
                                              require=require, progress=progress, label=label, min_size=min_size)
        if ddp.is_main():
            stage("%s done in %s: %s", label, fmt_seconds(time.perf_counter() - t0), run_dir)
    if report_dir is not None and ddp.is_main():
        t0 = time.perf_counter()
        out.report = render_report(run_dir_for(results_root, suite.suite, "_").parent, Path(report_dir))
        stage("report written in %s: %s", fmt_seconds(time.perf_counter() - t0), out.report)
    return out


def render_report(results_dir: Path, report_dir: Path) -> Path:
    from gsqbench.report import render_report as render

    return Path(render([results_dir], report_dir))


def format_summary(res: SuiteResult, metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """Plain-text table: one row per run, key metrics as columns (NaN/missing shown as '—')."""
    present = [m for m in metrics if any(m in v for v in res.summary.values())]
    header = ["run", *present]
    rows = [[rid, *(_fmt(vals.get(m)) for m in present)] for rid, vals in res.summary.items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4g}"


# ----------------------------------------------------------------------------------------------- one checkpoint
@dataclass(frozen=True)
class DataChoice:
    """Which images `evaluate_checkpoint` reads (gsqbench.data.build_dataset arguments)."""

    kind: str = "sample-photos"
    path: Optional[str] = None
    split: str = "eval"
    resolution: int = 256
    crop: Optional[str] = None
    n: Optional[int] = None
    seed: int = 0
    strict: bool = False  # an unreadable image stops the evaluation instead of being skipped with a count
    min_size: Optional[int] = None  # refuse images whose shorter side is below this (pixels)

    def label(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind


def _checkpoint_file(path: Path) -> Optional[Path]:
    for name in ("model.safetensors", "checkpoint.pt"):
        if (path / name).is_file():
            return path / name
    return path if path.is_file() else None


def checkpoint_model_info(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Card model fields of a loaded checkpoint: file sha256, step, fairness hash, tokenizer spec hash, source."""
    import hashlib

    from gsqbench.card import canonical_json
    from gsqbench.io import sha256_file

    f = _checkpoint_file(ckpt)
    spec = {"model": meta.get("model_spec"), "quantizer": meta.get("quantizer_spec")}
    return {"checkpoint_sha256": meta.get("checkpoint_sha256") or (sha256_file(f) if f else None),
            "step": meta.get("step"), "fairness_hash": meta.get("fairness_hash"),
            "tokenizer_spec_hash": hashlib.sha256(canonical_json(spec).encode()).hexdigest(),
            "source": meta.get("source", "gsqbench")}


def evaluate_checkpoint(checkpoint: str | Path, data: DataChoice, spec: EvalSpec, *, out_dir: str | Path,
                        device: Optional[str] = None, seed: int = 0, num_workers: Optional[int] = None,
                        progress: bool = True, weights: Optional[str] = None, force: bool = False) -> Any:
    """Load `checkpoint` (gsqbench dir or official release), evaluate it on `data`, write `out_dir` (rank 0).

    `weights` (ema | raw) overrides what the checkpoint says it holds. Works under torchrun: every rank evaluates its
    shard. `out_dir` must be new, empty, or a folder an earlier `gsqbench eval` created; any other folder (a suite's
    run folder, say) is refused unless `force`, and even then only the evaluation files are replaced: the PNGs and
    tables an earlier evaluation left are removed once the new results are written, never mixed in. The folder is
    locked meanwhile (gsqbench.locks). Returns the gsqbench.evaluate.EvalResult.
    """
    import dataclasses

    from gsqbench import distributed as ddp
    from gsqbench.checkpoints import load_tokenizer
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import EvalSettings, evaluate
    from gsqbench.io import safe_name
    from gsqbench.results import eval_dir_state, mark_eval_dir, provenance, write_run

    run_dir = Path(out_dir)
    state = eval_dir_state(run_dir, force=force)  # reads only; every rank decides the same before any write
    settings = EvalSettings.from_spec(spec, seed=seed, num_workers=num_workers, progress=progress,
                                      weights=weights or spec.weights)
    distributed = ddp.init_from_env(device or "auto")
    dev = ddp.resolve_device(device or "auto")
    ckpt = Path(checkpoint)
    try:
        tok, meta = load_tokenizer(ckpt)  # bad input fails here, before the folder is created
        if weights is None and meta.get("weights") in ("ema", "raw"):
            settings = dataclasses.replace(settings, weights=meta["weights"])
        dataset = build_dataset(data.kind, path=data.path, split=data.split, resolution=data.resolution,
                                crop=data.crop, n=data.n, seed=data.seed, strict=data.strict,
                                min_size=data.min_size)
        with ddp.rank0_lock(run_dir, f"gsqbench eval {ckpt}"):
            if state == "new" and ddp.is_main():  # an eval folder keeps its marker; a forced one gets none
                mark_eval_dir(run_dir, ckpt)
            result = evaluate(tok.eval().to(dev), dataset, settings, device=dev, out_dir=run_dir,
                              model_info=checkpoint_model_info(ckpt, meta))
            saved = sorted({i for part in ddp.all_gather_objects(result.samples) for i in part})
            if ddp.is_main():
                info = {
                    "run_id": run_dir.name, "suite": run_dir.parent.name or "eval",
                    "subject": safe_name(str(meta.get("official_name") or meta.get("run_id") or ckpt.name)),
                    "seed": seed, "grid": {}, "spec": {"checkpoint": str(ckpt), "model": meta.get("model_spec"),
                                                       "quantizer": meta.get("quantizer_spec"), "data": data.label()},
                    "fairness_hash": meta.get("fairness_hash"), "card": result.card, "card_hash": result.card_hash,
                    "provenance": provenance(device=str(dev), precision=result.card["precision"]["model"],
                                             world_size=ddp.world_size()),
                }
                write_run(run_dir, info, result.metrics, per_image=result.per_image, code_counts=result.code_counts,
                          samples=saved)
    finally:
        if distributed:
            ddp.shutdown()
    return result


# ----------------------------------------------------------------------------------------------- reference statistics
def reference_stats(data: DataChoice, out: str | Path, *, mode: str = "gsqbench", batch_size: int = 32,
                    device: Optional[str] = None, num_workers: Optional[int] = None,
                    progress: bool = True) -> dict[str, Any]:
    """Real-side FID statistics of `data` written to `out` with their complete key (what `gsqbench stats` calls).

    Works under torchrun (each rank reads its shard). Returns the key fields, N and the number of skipped images.
    """
    from gsqbench import distributed as ddp
    from gsqbench.data import build_dataset
    from gsqbench.evaluate import EvalSettings, reference_statistics

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory; expected a .npz file path")
    settings = EvalSettings(mode=mode, batch_size=batch_size, metrics=("fid",), num_workers=num_workers,
                            progress=progress, samples=0)
    distributed = ddp.init_from_env(device or "auto")
    try:
        dev = ddp.resolve_device(device or "auto")
        dataset = build_dataset(data.kind, path=data.path, split=data.split, resolution=data.resolution,
                                crop=data.crop, n=data.n, seed=data.seed, strict=data.strict, min_size=data.min_size)
        info = reference_statistics(dataset, settings, out, device=dev)
    finally:
        if distributed:
            ddp.shutdown()
    return info
