"""Orchestration: a suite's runs (train → evaluate → results), and the evaluation of one checkpoint.

`run_suite` expands subjects × seeds × grid into runs (their effective specs resolved first: gsqbench.effective),
skips finished ones, trains, evaluates with the exported (EMA) weights, writes each run's results directory
(gsqbench.results.write_run), optionally renders the report and summarises. A run counts as finished when its
run.json says `status: done` and its exported checkpoint exists, so re-running a suite after a crash redoes only
what is missing (training itself resumes from its last checkpoint). A run whose training diverges (non-finite loss
or gradient norm, gsqbench.train.Diverged) is written with `status: diverged` and the suite carries on; rerunning
it unchanged is refused (it would diverge again), a changed spec trains it afresh. `jobs > 1` runs independent runs
side by side in separate processes, each with the same thread count, so results stay bit-identical to `jobs = 1`.
`evaluate_checkpoint` is the library form of `gsqbench eval`: load a checkpoint (ours or an official release),
evaluate it on a dataset, write the same results layout. A suite subject `{name, load: PATH}` (a published release,
an official GSQ release or a gsqbench checkpoint) goes through `run_loaded`: evaluated with the suite's settings,
never trained; its fairness hash records that it was loaded and the file's SHA-256 (config.loaded_fairness_view), and
it ranks beside other subjects only under the same protocol card (report.data.group_runs).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gsqbench.config import DataSource, EvalSpec, RunSpec, Suite
from gsqbench.effective import expand_runs
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
    diverged: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> run.json `divergence`
    refused: dict[str, str] = field(default_factory=dict)  # run_id -> why it was not trained again (diverged earlier)


@dataclass
class Outcome:
    """What one run produced: its metric values; `status` done | skipped (finished earlier) | diverged | refused
    (diverged earlier with this spec, not trained again: `message` says so), with the divergence record."""

    metrics: dict[str, float]
    divergence: Optional[dict[str, Any]] = None
    status: str = "done"
    message: str = ""


#: DataSource field names where gsqbench.data's messages use its own argument names
_DATA_KEYS = {"n": "limit", "resolution": "size"}


# ----------------------------------------------------------------------------------------------- data
def open_dataset(source: DataSource, *, strict: bool = False, role: str = "train",
                 min_size: Optional[int] = None) -> Any:
    """Build a dataset through gsqbench.data; errors name the config key (`shared.data.<role>.*`)."""
    from gsqbench import data

    try:
        ds = data.build_dataset(source.kind, path=source.path, split=role, resolution=source.size, crop=source.crop,
                                n=source.limit, seed=source.seed, strict=strict or source.strict, min_size=min_size,
                                crops_per_image=source.crops_per_image)
    except UserError as exc:  # data.py names its fields 'data.<field>'; point at the suite's key instead
        raise UserError(_suite_data_message(str(exc), role)) from None
    if len(ds) == 0:
        raise UserError(f"config key 'shared.data.{role}.path': {source.path!r} contains no images")
    return ds


def _suite_data_message(msg: str, role: str) -> str:
    """'data.n: ...' → "shared.data.eval.limit: ...", naming the suite's key (data.py uses its argument names)."""
    if not msg.startswith("data."):
        return f"shared.data.{role}: {msg}"
    key, sep, rest = msg[5:].partition(":")
    key = ".".join(_DATA_KEYS.get(part, part) if i == 0 else part for i, part in enumerate(key.split(".")))
    rest = rest.replace("data.crops_per_image", f"shared.data.{role}.crops_per_image")
    return f"shared.data.{role}.{key}{sep}{rest}"


# ----------------------------------------------------------------------------------------------- per run
def _same_spec(run: RunSpec, info: dict[str, Any]) -> bool:
    return info.get("fairness_hash") == run.fairness_hash and (info.get("spec") or {}).get("quantizer") == run.quantizer


def is_finished(run: RunSpec, run_dir: Path) -> bool:
    """True when run.json says done and the checkpoint exists; a finished run of ANOTHER spec is refused."""
    from gsqbench.results import STATUS_DONE, read_run_info

    if not (run_dir / "run.json").exists():
        return False
    if not run.loaded and not (run_dir / "checkpoint" / "model.safetensors").exists():
        return False
    try:
        info = read_run_info(run_dir)
    except (UserError, ValueError):
        return False
    if info.get("status") != STATUS_DONE:
        return False
    if not _same_spec(run, info):
        raise UserError(f"{run_dir} holds finished results of run {run.run_id!r} with a different spec "
                        "(shared settings or quantizer changed); use another --results root or delete that directory")
    return True


def earlier_divergence(run: RunSpec, run_dir: Path) -> Optional[dict[str, Any]]:
    """The `divergence` of an earlier attempt of this run with the SAME spec (to refuse resuming it), else None.

    An earlier diverged attempt with a different spec (e.g. a lower train.lr) is cleared here, so the run trains
    afresh instead of resuming a checkpoint of the other spec.
    """
    from gsqbench.results import STATUS_DIVERGED, read_run_info

    try:
        info = read_run_info(run_dir)
    except (UserError, ValueError):
        return None
    if info.get("status") != STATUS_DIVERGED:
        return None
    if _same_spec(run, info):
        return dict(info.get("divergence") or {})
    log.info("%s diverged earlier under another spec; training it afresh", run.run_id)
    for name in ("run.json", "metrics.csv", "train_log.csv", "checkpoint/train_state.pt"):
        (run_dir / name).unlink(missing_ok=True)
    return None


def refusal_message(run: RunSpec, run_dir: Path, divergence: dict[str, Any]) -> str:
    return (f"refused to resume {run.run_id}: it diverged at step {divergence.get('step')} "
            f"({divergence.get('term')} = {divergence.get('value')}) with this spec; change the spec "
            f"(e.g. --set train.lr=...) or delete {run_dir}")


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


def _run_info(run: RunSpec) -> dict[str, Any]:
    """run.json fields every run has: names, resolved spec, its effective values and the subject's quantizer
    settings with the quantizer's defaults filled in (what the report's tables show)."""
    return {"run_id": run.run_id, "suite": run.suite, "subject": run.subject, "seed": run.seed,
            "grid": dict(run.grid), "spec": run.spec_json(), "fairness_hash": run.fairness_hash,
            "effective": {**run.effective_json(), "quantizer": quantizer_settings(run.quantizer)}}


def quantizer_settings(qspec: dict[str, Any]) -> dict[str, Any]:
    """The quantizer block with every default of the registered class filled in ({} fields if unknown)."""
    from gsqbench.registry import discover_quantizers, with_defaults

    reg = discover_quantizers()
    name = qspec.get("name")
    if name not in reg:
        return dict(qspec)
    return {"name": name, **with_defaults(reg.get(name), {k: v for k, v in qspec.items() if k != "name"})}


def write_diverged(run: RunSpec, run_dir: Path, exc: Any, device: str) -> None:
    """run.json (status diverged, divergence, train card) and metrics.csv with the train_* rows; no evaluation."""
    from gsqbench import distributed as ddp
    from gsqbench.results import STATUS_DIVERGED, provenance, write_run
    from gsqbench.train import train_metrics

    if not ddp.is_main():
        return
    info = {**_run_info(run), "status": STATUS_DIVERGED, "divergence": exc.record(), "card": {}, "card_hash": "",
            "train_steps": exc.step - 1, "train": exc.card,
            "provenance": provenance(device=str(ddp.resolve_device(device)), precision=run.shared.train.precision,
                                     world_size=ddp.world_size())}
    write_run(run_dir, info, train_metrics(exc))


def run_one(run: RunSpec, run_dir: Path, *, device: str, strict_data: bool, require: Sequence[str],
            progress: bool, label: str = "", min_size: Optional[int] = None) -> Outcome:
    """Train (or resume) then evaluate one run and write its results directory (or record its divergence).

    `label` (e.g. "[2/4] vq-s0") starts the one-line stage messages (gsqbench.progress); `min_size` refuses
    evaluation images whose shorter side is below it (README "Corrupt and small images")."""
    import torch

    from gsqbench import distributed as ddp
    from gsqbench.evaluate import evaluate
    from gsqbench.progress import fmt_seconds, stage
    from gsqbench.results import provenance, write_run
    from gsqbench.train import Diverged, train_metrics, train_run

    label = label or run.run_id
    if run.loaded:
        return run_loaded(run, run_dir, device=device, strict_data=strict_data, require=require, progress=progress,
                          label=label, min_size=min_size)
    train_ds = open_dataset(run.shared.data.train, strict=strict_data, role="train")
    eval_ds = open_dataset(run.shared.data.eval, strict=strict_data, role="eval", min_size=min_size)
    try:
        trained = train_run(run, run_dir, train_ds, device=device, progress=progress)
    except Diverged as exc:
        write_diverged(run, run_dir, exc, device)
        if ddp.is_main():
            stage("%s diverged at step %d: %s = %s", label, exc.step, exc.term, exc.value)
        return Outcome({m.name: m.value for m in train_metrics(exc)}, exc.record(), status="diverged")
    if ddp.is_main():
        resumed = f" (resumed from step {trained.resumed_from})" if trained.resumed_from is not None else ""
        stage("%s trained %d steps in %s%s", label, trained.steps, fmt_seconds(trained.time_s), resumed)
    dev = next(trained.model.parameters()).device
    settings = eval_settings(run, require, trained.weights, progress, str(run_dir.parent / ".fid-cache"))
    ckpt_sha = _checkpoint_sha256(run_dir)
    t0 = time.perf_counter()
    with torch.no_grad():
        ev = evaluate(trained.model, eval_ds, settings, device=dev, out_dir=run_dir,
                      model_info={"fairness_hash": run.fairness_hash, "step": trained.steps,
                                  "weights": trained.weights, "checkpoint_sha256": ckpt_sha})
    metrics = [*ev.metrics, *train_metrics(trained)]
    saved = sorted({i for part in ddp.all_gather_objects(ev.samples) for i in part})
    if ddp.is_main():
        stage("%s evaluated %d images in %s", label, len(ev.per_image.get("image_id", [])),
              fmt_seconds(time.perf_counter() - t0))
        info = {
            **_run_info(run), "card": ev.card, "card_hash": ev.card_hash, "checkpoint_sha256": ckpt_sha,
            "weights": trained.weights, "train_steps": trained.steps, "resumed_from": trained.resumed_from,
            "train": trained.card,
            "provenance": provenance(device=str(dev), precision=run.shared.train.precision,
                                     world_size=ddp.world_size()),
        }
        write_run(run_dir, info, metrics, per_image=ev.per_image, code_counts=ev.code_counts, samples=saved)
    return Outcome({m.name: m.value for m in metrics})


def check_mode_fits(mode_name: str, meta: dict[str, Any], where: str) -> None:
    """A compatibility mode reproducing one tokenizer's protocol (gsqbench.modes `tokenizer`) is refused for a
    checkpoint of another kind, and one that requires EMA weights for a checkpoint holding raw ones."""
    from gsqbench.modes import check_mode

    mode = check_mode(mode_name, "eval.mode")
    kind = meta.get("kind") if meta.get("source") == "published-release" else None
    if mode.tokenizer is not None and kind != mode.tokenizer:
        what = f"a {kind} release" if kind else "not a published release"
        raise UserError(f"{where}: eval.mode {mode.name!r} reproduces the {mode.tokenizer} protocol; this checkpoint "
                        f"is {what} (use --mode gsqbench, or the mode of its own kind)")
    if mode.weights is not None and meta.get("weights") not in (None, mode.weights):
        raise UserError(f"{where}: eval.mode {mode.name!r} evaluates {mode.weights} weights, as its upstream does; this "
                        f"checkpoint holds {meta.get('weights')} weights (import the release with --weights "
                        f"{mode.weights})")


def loaded_info(path: str | Path, meta: dict[str, Any], sha256: Optional[str]) -> dict[str, Any]:
    """run.json `loaded`: where a loaded subject came from (its file's SHA-256 is what its fairness hash records)."""
    source = meta.get("source", "gsqbench")
    kind = meta.get("kind") or {"official-gsq": "gsq-official"}.get(source)
    return {"path": str(path), "sha256": sha256, "source": source, "kind": kind,
            "architecture": meta.get("architecture"), "weights": meta.get("weights"),
            "release_sha256": meta.get("checkpoint_sha256")}


def loaded_model_info(ckpt: Path, meta: dict[str, Any], sha256: Optional[str]) -> dict[str, Any]:
    """Card model fields of a loaded subject: evaluated as released (`weights: as-released` is hashed, so every loaded
    subject shares one card under one protocol); which weights and which file it was (`model.loaded`) is run-specific,
    like the checkpoint hash of a trained run."""
    info = checkpoint_model_info(ckpt, meta)
    info.pop("source", None)
    return {**info, "weights": "as-released", "loaded": loaded_info(ckpt, meta, sha256)}


def run_loaded(run: RunSpec, run_dir: Path, *, device: str, strict_data: bool, require: Sequence[str],
               progress: bool, label: str, min_size: Optional[int] = None) -> Outcome:
    """Evaluate a loaded subject (`{name, load: PATH}`): no training; the same evaluation and results writer as a
    trained run and as `gsqbench eval`, with the suite's eval settings and the checkpoint's own weights."""
    import torch

    from gsqbench import distributed as ddp
    from gsqbench.checkpoints import load_tokenizer
    from gsqbench.evaluate import evaluate
    from gsqbench.progress import fmt_seconds, stage
    from gsqbench.results import provenance, write_run

    ckpt = Path(run.load)  # type: ignore[arg-type]
    tok, meta = load_tokenizer(ckpt)
    check_mode_fits(run.shared.eval.mode, meta, f"subject '{run.subject}' ({ckpt})")
    eval_ds = open_dataset(run.shared.data.eval, strict=strict_data, role="eval", min_size=min_size)
    dev = ddp.resolve_device(device)
    weights = meta["weights"] if meta.get("weights") in ("ema", "raw") else run.shared.eval.weights
    settings = eval_settings(run, require, weights, progress, str(run_dir.parent / ".fid-cache"))
    t0 = time.perf_counter()
    with torch.no_grad():
        ev = evaluate(tok.eval().to(dev), eval_ds, settings, device=dev, out_dir=run_dir,
                      model_info=loaded_model_info(ckpt, meta, run.release_sha256))
    saved = sorted({i for part in ddp.all_gather_objects(ev.samples) for i in part})
    if ddp.is_main():
        stage("%s (loaded, not trained) evaluated %d images in %s", label, len(ev.per_image.get("image_id", [])),
              fmt_seconds(time.perf_counter() - t0))
        info = {**_run_info(run), "card": ev.card, "card_hash": ev.card_hash, "weights": weights,
                "checkpoint_sha256": run.release_sha256, "loaded": loaded_info(ckpt, meta, run.release_sha256),
                "provenance": provenance(device=str(dev), precision=ev.card["precision"]["model"],
                                         world_size=ddp.world_size())}
        write_run(run_dir, info, ev.metrics, per_image=ev.per_image, code_counts=ev.code_counts, samples=saved)
    return Outcome({m.name: m.value for m in ev.metrics})


def _checkpoint_sha256(run_dir: Path) -> Optional[str]:
    """SHA-256 of the exported model.safetensors (model.json records it): equal hashes = identical weights."""
    import json

    try:
        return json.loads((run_dir / "checkpoint" / "model.json").read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError):
        return None


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
              progress: bool = True, jobs: int = 1, threads: Optional[int] = None,
              min_size: Optional[int] = None) -> SuiteResult:
    """Run every (not yet finished) run of `suite` under `results_root/<suite>/<run_id>`.

    Each run folder is locked while its run is checked, trained, evaluated and written (gsqbench.locks, held by
    rank 0): a second process on the same folder is refused with one line naming the holder, so two suites with
    different specs can never mix results in one folder.

    `jobs` > 1 trains and evaluates that many runs at once, each in its own process with `threads` intra-op
    threads (default: the CPU count divided by `jobs`); on several GPUs job k uses device cuda:(k mod count).
    A diverged run is recorded and the others carry on (SuiteResult.diverged, SuiteResult.refused).
    """
    from gsqbench import distributed as ddp
    from gsqbench.progress import fmt_seconds, stage
    from gsqbench.results import run_dir_for
    from gsqbench.validate import validate_suite

    validate_suite(suite, only)
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: expected a positive integer")
    if jobs > 1 and (ddp.world_size() > 1 or ddp.launched_by_torchrun()):  # a torchrun of one process too
        raise UserError("--jobs: not with torchrun (each rank already takes its share of every run); use --jobs 1")
    runs = expand_runs(suite, only)
    if require:  # fail before hours of training, not after
        from gsqbench.metrics.catalogue import check_required_weights

        eval_settings(runs[0], require)
        check_required_weights(tuple(require))
    ddp.init_from_env(device)  # the locks are coordinated across ranks from the first run on
    out = SuiteResult()
    todo: list[tuple[RunSpec, Path, str]] = []
    for i, run in enumerate(runs):
        run_dir = run_dir_for(results_root, suite.suite, run.run_id)
        out.run_dirs.append(run_dir)
        label = f"[{i + 1}/{len(runs)}] {run.run_id}"
        if jobs > 1:
            out.summary[run.run_id] = {}  # keeps the suite's run order; the job checks and runs it under its lock
            todo.append((run, run_dir, label))
            continue
        t0 = time.perf_counter()
        with ddp.rank0_lock(run_dir, f"gsqbench run {suite.suite}/{run.run_id}"):
            outcome = check_and_run(run, run_dir, label, device=device, strict_data=strict_data, require=require,
                                    progress=progress, min_size=min_size)
        _collect(out, run.run_id, outcome)
        if ddp.is_main() and outcome.status == "done":
            stage("%s done in %s: %s", label, fmt_seconds(time.perf_counter() - t0), run_dir)
    if todo:
        outcomes = _run_parallel(suite.suite, todo, jobs, device, threads,
                                 dict(strict_data=strict_data, require=tuple(require), min_size=min_size))
        for run_id, outcome in outcomes.items():
            _collect(out, run_id, outcome)
    if report_dir is not None and ddp.is_main():
        t0 = time.perf_counter()
        out.report = render_report(run_dir_for(results_root, suite.suite, "_").parent, Path(report_dir))
        stage("report written in %s: %s", fmt_seconds(time.perf_counter() - t0), out.report)
    return out


def check_and_run(run: RunSpec, run_dir: Path, label: str, **kwargs: Any) -> Outcome:
    """Skip a run that finished earlier, refuse one that diverged earlier with this spec, else `run_one` it (the
    caller holds the run folder's lock)."""
    from gsqbench.progress import stage

    if is_finished(run, run_dir):
        stage("%s finished earlier, skipped", label)
        return Outcome(_finished_metrics(run_dir), status="skipped")
    divergence = earlier_divergence(run, run_dir)
    if divergence is not None:
        message = refusal_message(run, run_dir, divergence)
        stage("%s %s", label, message)
        return Outcome(_finished_metrics(run_dir), divergence, status="refused", message=message)
    return run_one(run, run_dir, label=label, **kwargs)


def _collect(out: SuiteResult, run_id: str, outcome: Outcome) -> None:
    out.summary[run_id] = outcome.metrics
    if outcome.status == "skipped":
        out.skipped.append(run_id)
    if outcome.status == "refused":
        out.refused[run_id] = outcome.message
    if outcome.divergence is not None:
        out.diverged[run_id] = outcome.divergence


def _job_devices(device: str, jobs: int) -> list[str]:
    """Device per job: cuda:(k mod count) when CUDA is asked for (or 'auto' finds it) on several GPUs."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{k % torch.cuda.device_count()}" for k in range(jobs)]
    return [device] * jobs


def _run_parallel(suite: str, todo: list[tuple[RunSpec, Path, str]], jobs: int, device: str,
                  threads: Optional[int], kwargs: dict[str, Any]) -> dict[str, Outcome]:
    """Each run in a fresh spawned process (fresh RNG and thread settings), at most `jobs` at once; results in
    the order of `todo`. A UserError in a job is raised here once the running jobs have ended."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from gsqbench.progress import stage
    from gsqbench.registry import plugin_dirs

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    devices = _job_devices(device, jobs)
    level = logging.getLogger().getEffectiveLevel()
    verbosity = 0 if level >= logging.WARNING else 1 if level >= logging.INFO else 2
    stage("running %d runs, %d at a time, %d thread(s) each", len(todo), jobs, threads)
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = [pool.submit(_job, suite, run, run_dir, label, devices[k % jobs], threads,
                               [str(d) for d in plugin_dirs()], verbosity, kwargs)
                   for k, (run, run_dir, label) in enumerate(todo)]
        try:
            return {run.run_id: f.result() for (run, _, _), f in zip(todo, futures)}
        except BaseException:  # an error in one job: start no further ones (running ones finish)
            for f in futures:
                f.cancel()
            raise


def _job(suite: str, run: RunSpec, run_dir: Path, label: str, device: str, threads: int, plugins: list[str],
         verbosity: int, kwargs: dict[str, Any]) -> Outcome:
    """One run in a child process of `run --jobs` (spawned: nothing inherited but these arguments)."""
    import torch

    from gsqbench import distributed as ddp
    from gsqbench.progress import CliLogging, fmt_seconds, stage
    from gsqbench.registry import add_plugin_dirs

    logs = CliLogging(verbosity).start()
    try:
        if plugins:
            add_plugin_dirs(plugins)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with ddp.rank0_lock(run_dir, f"gsqbench run {suite}/{run.run_id}"):
            outcome = check_and_run(run, run_dir, label, device=device, progress=False, **kwargs)
        if outcome.status == "done":
            stage("%s done in %s: %s", label, fmt_seconds(time.perf_counter() - t0), run_dir)
        return outcome
    finally:
        logs.finish()


def render_report(results_dir: Path, report_dir: Path) -> Path:
    from gsqbench.report import render_report as render

    return Path(render([results_dir], report_dir))


def format_summary(res: SuiteResult, metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """Plain-text table: one row per run, key metrics as columns (NaN/missing shown as '—'); a diverged run says
    so in the `status` column."""
    present = [m for m in metrics if any(m in v for v in res.summary.values())]
    header = ["run", "status", *present]
    rows = [[rid, _status(res, rid), *(_fmt(vals.get(m)) for m in present)] for rid, vals in res.summary.items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _status(res: SuiteResult, run_id: str) -> str:
    d = res.diverged.get(run_id)
    return "done" if d is None else f"diverged@{d.get('step')} ({d.get('term')})"


def divergence_lines(res: SuiteResult) -> list[str]:
    """One line per diverged run, for the CLI (a run refused because it diverged earlier says so)."""
    return [res.refused.get(rid) or f"{rid}: diverged at step {d.get('step')}: {d.get('term')} = {d.get('value')}"
            for rid, d in res.diverged.items()]


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
    crops_per_image: int = 1
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
    data = mode_data(data, settings.mode)
    distributed = ddp.init_from_env(device or "auto")
    dev = ddp.resolve_device(device or "auto")
    ckpt = Path(checkpoint)
    try:
        tok, meta = load_tokenizer(ckpt)  # bad input fails here, before the folder is created
        check_mode_fits(settings.mode, {**meta, **({"weights": weights} if weights else {})}, str(ckpt))
        if weights is None and meta.get("weights") in ("ema", "raw"):
            settings = dataclasses.replace(settings, weights=meta["weights"])
        dataset = build_dataset(data.kind, path=data.path, split=data.split, resolution=data.resolution,
                                crop=data.crop, n=data.n, seed=data.seed, crops_per_image=data.crops_per_image,
                                strict=data.strict, min_size=data.min_size)
        fairness, loaded = meta.get("fairness_hash"), None
        if meta.get("source", "gsqbench") != "gsqbench":  # a release: its hash records that it was loaded, and the file
            from gsqbench.config import loaded_fairness_hash
            from gsqbench.effective import release_sha256

            sha = release_sha256(str(ckpt))
            fairness, loaded = loaded_fairness_hash(eval_shared(spec, data), sha), loaded_info(ckpt, meta, sha)
        with ddp.rank0_lock(run_dir, f"gsqbench eval {ckpt}"):
            if state == "new" and ddp.is_main():  # an eval folder keeps its marker; a forced one gets none
                mark_eval_dir(run_dir, ckpt)
            result = evaluate(tok.eval().to(dev), dataset, settings, device=dev, out_dir=run_dir,
                              model_info=checkpoint_model_info(ckpt, meta) if loaded is None
                              else loaded_model_info(ckpt, meta, loaded["sha256"]))
            saved = sorted({i for part in ddp.all_gather_objects(result.samples) for i in part})
            if ddp.is_main():
                info = {
                    "run_id": run_dir.name, "suite": run_dir.parent.name or "eval",
                    "subject": safe_name(str(meta.get("official_name") or meta.get("run_id") or ckpt.name)),
                    "seed": seed, "grid": {}, "spec": {"checkpoint": str(ckpt), "model": meta.get("model_spec"),
                                                       "quantizer": meta.get("quantizer_spec"), "data": data.label()},
                    "fairness_hash": fairness, "card": result.card, "card_hash": result.card_hash,
                    "provenance": provenance(device=str(dev), precision=result.card["precision"]["model"],
                                             world_size=ddp.world_size()),
                    **({"loaded": loaded} if loaded else {}),
                }
                write_run(run_dir, info, result.metrics, per_image=result.per_image, code_counts=result.code_counts,
                          samples=saved)
    finally:
        if distributed:
            ddp.shutdown()
    return result


def mode_data(data: DataChoice, mode: str) -> DataChoice:
    """`data` with the crop protocol a compatibility mode prescribes (gsqbench.modes); a different crop given
    explicitly is a one-line UserError (the mode would not reproduce its upstream)."""
    import dataclasses

    from gsqbench.modes import check_mode

    crop = check_mode(mode, "eval.mode").crop
    if crop is None or data.crop == crop:
        return data
    if data.crop is not None:
        raise UserError(f"--crop {data.crop}: eval.mode {mode!r} evaluates {crop!r} crops (its upstream's); leave "
                        f"--crop out or pass --crop {crop}")
    return dataclasses.replace(data, crop=crop)


def eval_shared(spec: EvalSpec, data: DataChoice) -> Any:
    """The shared spec of a single-checkpoint evaluation (its eval settings and images), for its fairness view."""
    from gsqbench.config import DataSpec, SharedSpec

    source = DataSource(kind=data.kind, path=data.path, size=data.resolution, crop=data.crop or "gsq", limit=data.n,
                        seed=data.seed, strict=data.strict, crops_per_image=data.crops_per_image)
    return SharedSpec(data=DataSpec(eval=source), eval=spec)


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
    from gsqbench.modes import check_mode

    if check_mode(mode, "--mode").fid_input != "uint8":
        raise UserError(f"--mode {mode}: its rFID reads float images and computes the real statistics in the same "
                        "pass; there are no reference statistics to precompute")
    data = mode_data(data, mode)
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
