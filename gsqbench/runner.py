"""Suite orchestration: expand subjects × seeds × grid into runs, skip finished ones, train, evaluate with the
exported (EMA) weights, write the per-run results directory, optionally render the report, summarise.

One run flows train → evaluate → results (design.md); a run counts as finished when its run.json says
`status: done` and its exported checkpoint exists, so re-running a suite after a crash redoes only what is
missing (training itself resumes from its last checkpoint).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gsqbench.config import DataSource, RunSpec, Suite, expand_runs
from gsqbench.errors import UserError

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("rfid@inception", "psnr", "ssim", "lpips@alex", "usage_pooled", "ppl_pooled", "bits_per_token",
                   "train_images_per_s", "train_time_s")
DONE = "done"


@dataclass
class SuiteResult:
    run_dirs: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # run_id -> metric -> value
    report: Optional[Path] = None


# ----------------------------------------------------------------------------------------------- data
def open_dataset(source: DataSource, *, strict: bool = False, role: str = "train") -> Any:
    """Build a dataset through gsqbench.data; errors name the config key (`shared.data.<role>.*`)."""
    from gsqbench import data

    try:
        ds = data.build_dataset(source.kind, path=source.path, split=role, resolution=source.size, crop=source.crop,
                                n=source.limit, seed=source.seed, strict=strict or source.strict)
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
    from gsqbench.results import read_run_info

    if not (run_dir / "run.json").exists() or not (run_dir / "checkpoint" / "model.safetensors").exists():
        return False
    try:
        info = read_run_info(run_dir)
    except (UserError, ValueError):
        return False
    if info.get("status") != DONE:
        return False
    if info.get("fairness_hash") != run.fairness_hash or (info.get("spec") or {}).get("quantizer") != run.quantizer:
        raise UserError(f"{run_dir} holds finished results of run {run.run_id!r} with a different spec "
                        "(shared settings or quantizer changed); use another --results root or delete that directory")
    return True


def eval_settings(run: RunSpec, require: Sequence[str] = (), weights: str = "ema", progress: bool = True,
                  fid_cache_dir: Optional[str] = None) -> Any:
    """gsqbench.evaluate.EvalSettings from the shared eval spec (its `options` were checked at load time).

    `fid_cache_dir` (unless the suite sets its own) lets every subject of a suite reuse the real-side FID
    statistics, keyed by data + extractor (metrics-protocol §6), instead of re-running Inception on the originals.
    """
    from gsqbench.evaluate import EvalSettings

    e = run.shared.eval
    options = dict(e.options)
    if fid_cache_dir is not None:
        options.setdefault("fid_cache_dir", fid_cache_dir)
    return EvalSettings(mode=e.mode, batch_size=e.batch_size, samples=e.samples, metrics=tuple(e.metrics),
                        require=tuple(sorted({*e.require, *require})), seed=run.seed, weights=weights,
                        num_workers=run.shared.data.num_workers, progress=progress, **options)


def run_one(run: RunSpec, run_dir: Path, *, device: str, strict_data: bool, require: Sequence[str],
            progress: bool) -> dict[str, float]:
    """Train (or resume) then evaluate one run and write its results directory; returns metric -> value."""
    import torch

    from gsqbench.evaluate import evaluate
    from gsqbench.train import train_metrics, train_run

    train_ds = open_dataset(run.shared.data.train, strict=strict_data, role="train")
    eval_ds = open_dataset(run.shared.data.eval, strict=strict_data, role="eval")
    trained = train_run(run, run_dir, train_ds, device=device, progress=progress)
    dev = next(trained.model.parameters()).device
    with torch.no_grad():
        ev = evaluate(trained.model, eval_ds, eval_settings(run, require, trained.weights, progress, str(run_dir.parent / ".fid-cache")), device=dev,
                      out_dir=run_dir, model_info={"fairness_hash": run.fairness_hash, "step": trained.steps,
                                                   "weights": trained.weights})
    metrics = [*ev.metrics, *train_metrics(trained)]
    if _is_main():
        _write_results(run, run_dir, ev, metrics, trained, device=str(dev))
    return {m.name: m.value for m in metrics}


def _write_results(run: RunSpec, run_dir: Path, ev: Any, metrics: list, trained: Any, device: str) -> None:
    from gsqbench import results

    if ev.per_image:
        results.write_per_image(run_dir, ev.per_image)
    if ev.code_counts is not None:
        results.write_code_counts(run_dir, ev.code_counts)
    info = {
        "run_id": run.run_id, "suite": run.suite, "subject": run.subject, "seed": run.seed, "grid": dict(run.grid),
        "spec": run.spec_json(),
        "fairness_hash": run.fairness_hash, "card": ev.card, "card_hash": ev.card_hash,
        "weights": trained.weights, "train_steps": trained.steps, "resumed_from": trained.resumed_from,
        "train": trained.card,
        "provenance": results.provenance(device=device, precision=run.shared.train.precision,
                                         world_size=_world_size()),
        "status": DONE,
    }
    results.write_run_results(run_dir, info, metrics)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


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
              progress: bool = True) -> SuiteResult:
    """Run every (not yet finished) run of `suite` under `results_root/<suite>/<run_id>`."""
    from gsqbench.results import run_dir_for

    runs = expand_runs(suite, only)
    if require:  # fail before hours of training, not after
        from gsqbench.evaluate import check_required_weights

        eval_settings(runs[0], require)
        check_required_weights(tuple(require))
    out = SuiteResult()
    for i, run in enumerate(runs):
        run_dir = run_dir_for(results_root, suite.suite, run.run_id)
        out.run_dirs.append(run_dir)
        if is_finished(run, run_dir):
            log.info("[%d/%d] %s: finished earlier, skipped", i + 1, len(runs), run.run_id)
            out.skipped.append(run.run_id)
            out.summary[run.run_id] = _finished_metrics(run_dir)
            continue
        log.info("[%d/%d] %s: training %d steps", i + 1, len(runs), run.run_id, run.shared.train.steps)
        out.summary[run.run_id] = run_one(run, run_dir, device=device, strict_data=strict_data, require=require,
                                          progress=progress)
    if report_dir is not None and _is_main():
        out.report = render_report(run_dir_for(results_root, suite.suite, "_").parent, Path(report_dir))
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
