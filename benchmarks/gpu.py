"""GPU readiness (issue 18): one command that proves gsqbench's CUDA path and measures it, in minutes.

    python benchmarks/gpu.py --json $OUT/gpu-h200.json     # on a CUDA machine: sized for <= 8 min (--budget-s 470)
    python benchmarks/gpu.py --device cpu --tiny           # every step at toy sizes (CI runs this: < 60 s)

Steps (each prints its table; a summary table closes the run; `--json` gets every number):
1. Correctness on the device, by pytest in a subprocess: the quantizer contract tests, the exact lookup against
   its float64 ground truth, the resume-after-SIGKILL round trip (bitwise), and the tests marked `cuda`
   (tests/test_cuda.py: NCCL init and reductions; `bf16` lookup = the official compute_dist + argmin under
   CUDA autocast; evaluation on CUDA = evaluation on the CPU for PSNR/SSIM/usage, tolerances argued there).
2. Training throughput of the F16 GSQ-GAN (configs/paper/gsq_gan_f16_d16_g8_v256k.yaml) at 256², bf16 autocast,
   batch 32, LPIPS-VGG loss: with the PatchGAN and with the DINO discriminator, torch.compile off and on (on in
   a child process with a time limit), images/s and peak memory beside a bare forward/backward/AdamW step of the
   same generator.
3. Evaluation throughput at 256² (benchmarks/metrics.py): evaluate() with Inception + LPIPS against its bare
   parts, images/s and each stage's share of the pass.
4. The F16 lookup (benchmarks/quantizers.py) at 2,048 and 16,384 positions: `exact` and `bf16` against the
   straightforward full-distance matrix, time and memory.
5. torchrun with one process: `gsqbench train` for 20 steps (4 with --tiny) over NCCL (gloo on CPU), checked to
   initialise, end cleanly and not warn; and benchmarks/ddp_find_unused.py: images/s with DDP's
   find_unused_parameters forced on against gsqbench's choice.

Pretrained weights are random-init stand-ins under the official file names, installed through the weight manager
(benchmarks/_standins.py): same code, same cost, meaningless values. A GPU machine without network needs
torch-fidelity and lpips carried as wheels: README, "GPU check". With --tiny on a CPU, torch.compile runs
Dynamo with the `eager` backend (Inductor's C++ compile takes minutes on two cores); the table says so.
--tiny also runs every child process (pytest, the two torchruns, the compile rows) at once beside the in-process
steps, one thread each, so its step times overlap; the full run does one thing at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# module to import -> the distribution to carry: what this script and its children import (measured on a --tiny
# run; timm's huggingface_hub is optional to it); checked before anything heavy is imported
NEEDS = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "scipy": "scipy", "PIL": "pillow",
         "yaml": "pyyaml", "tqdm": "tqdm", "safetensors": "safetensors", "torch_fidelity": "torch-fidelity",
         "lpips": "lpips", "timm": "timm", "pytest": "pytest"}
MIN_TORCH = (2, 2)  # pyproject.toml's floor
STEPS = ("correctness", "train", "eval", "lookup", "torchrun")
LABELS = {"correctness": "1 correct", "train": "2 train", "eval": "3 eval", "lookup": "4 lookup",
          "torchrun": "5 torchrun"}
PAPER_SUITE = REPO / "configs" / "paper" / "gsq_gan_f16_d16_g8_v256k.yaml"


def missing_dependency() -> Optional[str]:
    """One line naming every package that does not import (a wheel carried with --no-deps can lack one of its
    own dependencies, so each is imported, not only looked up), or None."""
    missing = []
    for module, dist in NEEDS.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install failing inside its import
            why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            missing.append(f"{dist} (import {module}: {why})")
    if not missing:
        return None
    return (f"gpu.py: missing {'; '.join(missing)}. Carry the wheels and install them with pip install --no-deps "
            "(README.md, section 'GPU check')")


# ------------------------------------------------------------------------------------------------- results


@dataclass
class Line:
    """One line of the summary table."""

    step: str
    what: str
    status: str  # PASS, FAIL, SKIP, INFO (a measurement)
    value: str = ""
    note: str = ""


@dataclass
class Report:
    args: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    def add(self, *lines: Line) -> None:
        self.lines += lines

    def save(self) -> None:
        """Written after every step, so a run cut short still leaves what it measured."""
        if self.path is None:
            return
        from gsqbench.io import atomic_write_json

        payload = {"script": "gpu", "args": self.args, "machine": self.machine,
                   "summary": [asdict(x) for x in self.lines], **self.details}
        atomic_write_json(self.path, json.loads(json.dumps(payload, default=str)))


def summary_table(lines: list[Line]) -> str:
    w = max([len(x.what) for x in lines] + [10])
    v = max([len(x.value) for x in lines] + [5])
    head = f"{'step':<12} {'check / case':<{w}} {'result':<6} {'value':<{v}} note"
    out = [head, "-" * min(len(head) + 40, 200)]
    out += [f"{x.step:<12} {x.what:<{w}} {x.status:<6} {x.value:<{v}} {x.note}".rstrip() for x in lines]
    return "\n".join(out)


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """Everything --tiny shrinks."""

    preset: str
    size: int
    batch: int
    codebook: int
    dino_img: int
    train_steps: int
    eval_images: int
    eval_size: int  # LPIPS-Alex needs >= 32 px (its pooling)
    eval_batch: int
    eval_nets: tuple[str, ...]
    lookup_cases: tuple[tuple[int, int, int], ...]  # (V, batch, side): positions = batch · side²
    repeats: int
    ddp_batch: int
    ddp_steps: int
    num_workers: int
    warmup: int  # untimed calls before each timed row (the first includes any compilation)
    compile_discs: tuple[str, ...]  # the discriminators of the torch.compile rows
    compile_bare: bool  # a compiled bare step too (each compiled module costs one more trace)
    torchrun_steps: int  # `gsqbench train` under torchrun (the 20 on a GPU)
    torchrun_size: int
    torchrun_batch: int


FULL = Sizes(preset="f16", size=256, batch=32, codebook=262_144, dino_img=518, train_steps=8, eval_images=256,
             eval_size=256, eval_batch=64, eval_nets=("alex", "vgg"),
             lookup_cases=((262_144, 8, 16), (262_144, 64, 16)), repeats=3, ddp_batch=16, ddp_steps=4,
             num_workers=4, warmup=2, compile_discs=("patchgan", "dino"), compile_bare=True, torchrun_steps=20,
             torchrun_size=32, torchrun_batch=8)
# --tiny: every step and code path once at toy sizes (one timed call per row, one thread): a check that the
# script runs, in well under a minute on two busy cores; its numbers mean nothing
TINY = Sizes(preset="tiny-f8", size=16, batch=2, codebook=4_096, dino_img=14, train_steps=1, eval_images=2,
             eval_size=32, eval_batch=2, eval_nets=("alex",), lookup_cases=((4_096, 1, 4), (4_096, 4, 4)),
             repeats=1, ddp_batch=2, ddp_steps=1, num_workers=0, warmup=1, compile_discs=("patchgan",),
             compile_bare=False, torchrun_steps=4, torchrun_size=16, torchrun_batch=2)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A subprocess of one step, output to files (no pipe fills up while this process works), its time limit
    counted from its start. Started by `start()` (the --tiny run starts every child at once, beside the in-process
    steps) or else by `wait()`, when its step needs it (the GPU run: one thing at a time, clean timings)."""

    def __init__(self, name: str, cmd: list[str], tmp: Path, timeout_s: float) -> None:
        self.name, self.cmd, self.timeout_s = name, cmd, timeout_s
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0

    def start(self) -> "Child":
        if self.proc is None:
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                # its own session: on a timeout the whole group goes (torchrun's worker too)
                self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=child_env(), stdout=out, stderr=err,
                                             start_new_session=True)
            self.started = time.monotonic()
        return self

    def wait(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); exit code 124 when it ran past its limit (then it is killed)."""
        proc = self.start().proc
        assert proc is not None
        try:
            rc = proc.wait(timeout=max(1.0, self.started + self.timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            rc = 124
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return rc, read(self.out_path), read(self.err_path)

    def stop(self) -> None:
        """End it if it still runs (a step skipped or broken after its child was started)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()


# ------------------------------------------------------------------------------------- 1: correctness

CORRECTNESS = {
    "tests/test_quantizers_contract.py": "quantizer contract tests",
    "tests/test_exact_lookup.py": "exact lookup = float64 ground truth",
    "tests/test_resume.py": "resume after SIGKILL = uninterrupted run",
    "tests/test_cuda.py": "cuda-marked tests",
}
TINY_SELECTION = ("tests/test_cuda.py", "tests/test_quantizers_contract.py::test_contract",
                  "tests/test_exact_lookup.py::test_exact_resolves_constructed_near_ties_and_takes_the_lowest_of_"
                  "exact_ties")


def pytest_child(args: argparse.Namespace, tmp: Path) -> Child:
    targets = list(TINY_SELECTION) if args.tiny else list(CORRECTNESS)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--device={args.device}",
           f"--junitxml={tmp / 'pytest.xml'}", *targets]
    if args.device == "cpu":
        cmd.insert(-len(targets), "--cuda-dry-run")
    return Child("pytest", cmd, tmp, args.pytest_timeout)


def parse_junit(xml: Path) -> list[dict[str, Any]]:
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], \
                    (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        cases.append({"file": file, "name": case.get("name"), "time_s": float(case.get("time", 0.0)),
                      "outcome": outcome, "message": message, "properties": props})
    return cases


def correctness_lines(cases: list[dict[str, Any]], tiny: bool) -> list[Line]:
    lines = []
    for file, label in CORRECTNESS.items():
        mine = [c for c in cases if c["file"].endswith(file)]
        if not mine:
            lines.append(Line("1 correct", label, "SKIP", note="not in --tiny (the CPU test suite runs it)"
                              if tiny else "not collected"))
            continue
        if file.endswith("test_cuda.py"):
            for c in mine:
                status = {"passed": "PASS", "skipped": "SKIP"}.get(c["outcome"], "FAIL")
                props = ", ".join(f"{k}={_short(v)}" for k, v in c["properties"].items())
                lines.append(Line("1 correct", c["name"][5:60], status, f"{c['time_s']:.1f} s",
                                  (c["message"] + "; " if c["message"] else "") + props))
            continue
        bad = [c for c in mine if c["outcome"] in ("failed", "error")]
        n = {k: sum(c["outcome"] == k for c in mine) for k in ("passed", "skipped")}
        value = f"{n['passed']} passed" + (f", {len(bad)} failed" if bad else "") + \
            (f", {n['skipped']} skipped" if n["skipped"] else "")
        note = "; ".join(f"{c['name']}: {c['message']}" for c in bad[:3])
        lines.append(Line("1 correct", label, "FAIL" if bad else "PASS", value,
                          note or f"{sum(c['time_s'] for c in mine):.1f} s"))
    return lines


def _short(value: Any) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{int(f)}" if f.is_integer() else f"{f:.3g}"


def step_correctness(args: argparse.Namespace, report: Report, tmp: Path, child: Child) -> None:
    xml = tmp / "pytest.xml"
    say(f"\n== 1. correctness: pytest --device {args.device} "
        f"{'(tiny selection, cuda-marked tests as a CPU dry run)' if args.tiny else ''}")
    rc, out, err = child.wait()
    output = (f"pytest timed out after {child.timeout_s:.0f} s\n" if rc == 124 else "") + out[-4000:] + err[-2000:]
    say(output.strip().splitlines()[-1] if output.strip() else "(no output)")
    if not xml.exists():
        report.add(Line("1 correct", "pytest", "FAIL", f"exit {rc}", output.strip().splitlines()[-1][:150]
                        if output.strip() else ""))
        report.details["pytest_output"] = output
        return
    cases = parse_junit(xml)
    report.details["pytest_cases"] = cases
    if rc not in (0, 1):
        report.details["pytest_output"] = output
    report.add(*correctness_lines(cases, args.tiny))


# --------------------------------------------------------------------------------------------- 2: train


def train_raw(sizes: Sizes, discriminator: str, compile_on: bool) -> dict[str, Any]:
    """The paper's F16 GSQ-GAN suite with synthetic data at `sizes`, one step per call, no checkpoints."""
    import yaml

    raw = yaml.safe_load(PAPER_SUITE.read_text())
    shared = raw["shared"]
    shared["model"]["preset"] = sizes.preset
    shared["data"] = {"train": {"kind": "synthetic", "size": sizes.size, "limit": 8 * sizes.batch},
                      "eval": {"kind": "synthetic", "size": sizes.size}, "num_workers": sizes.num_workers}
    shared["train"].update(batch_size=sizes.batch, steps=10**6, checkpoint_every=10**6, log_every=10**6,
                           compile=compile_on)
    shared["gan"]["discriminator"] = discriminator
    if discriminator == "dino":
        shared["gan"]["options"] = {"img_size": sizes.dino_img}
    elif sizes.preset != "f16":
        shared["gan"]["options"] = {"num_filters": 16, "num_layers": 2}
    raw["subjects"][0]["quantizer"]["codebook_size"] = sizes.codebook
    return raw


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: Any) -> Iterator[dict[str, float]]:
    """CUDA: peak allocated memory (GB, total); CPU: extra peak resident memory (GB) above the start."""
    import torch

    import _common as C

    out: dict[str, float] = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        _sync(device)
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return
    with C.PeakMemory(device) as mem:
        yield out
    out["peak_gb"] = (mem.peak_mb or 0.0) / 1024


def time_steps(fn: Callable[[], Any], device: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Median seconds per call after `warmup` calls (the first of which, timed apart, includes any compilation)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    with peak_memory(device) as mem:
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "warmup_s": first,
            "peak_gb": mem.get("peak_gb")}


def bare_step(model: Any, x: Any, bf16: bool, lr: float) -> Callable[[], None]:
    """zero_grad → generator forward (autocast) → MSE + quantizer losses → backward → AdamW: no harness."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.05)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            x_hat, qout = model(x)
            loss = F.mse_loss(x_hat.float(), x) + sum(qout.losses.values())
        loss.backward()
        opt.step()
    return step


def train_rows(sizes: Sizes, device: Any, compile_backend: Optional[str], emit: Callable[[dict], None]) -> None:
    """Bare step, then per discriminator the harness G+D step on fixed batches and train_step with the data
    stream. compile_backend None = eager; 'inductor' = train.compile (build_trainer compiles); other backends
    wrap the same module by hand (the --tiny CPU run uses Dynamo's 'eager' backend)."""
    import torch

    from gsqbench.config import expand_runs, suite_from_dict
    from gsqbench.runner import open_dataset
    from gsqbench.train import build_trainer, discriminator_step, generator_step, train_step

    compile_on = compile_backend is not None
    label = "compile " + (compile_backend if compile_on else "off")
    warmup = sizes.warmup + (1 if compile_on and sizes.warmup > 1 else 0)  # Dynamo may recompile at call 2
    for disc in sizes.compile_discs if compile_on else ("patchgan", "dino"):
        run = expand_runs(suite_from_dict(train_raw(sizes, disc, compile_backend == "inductor")))[0]
        try:
            tr = build_trainer(run, open_dataset(run.shared.data.train), device)
            if compile_on and compile_backend != "inductor":
                tr.ddp_model = torch.compile(tr.ddp_model, backend=compile_backend)
            xa, xb = tr.stream.next(device), tr.stream.next(device)
            if disc == "patchgan" and (sizes.compile_bare or not compile_on):
                # the bare step of the same generator (a copy: its own optimiser state)
                import copy

                model = copy.deepcopy(tr.model).train()
                if compile_on:
                    model = torch.compile(model, backend=compile_backend)
                emit({"case": label, "impl": "bare fwd/bwd/AdamW (generator)",
                      **time_steps(bare_step(model, xa, run.shared.train.precision == "bf16", run.shared.train.lr),
                                   device, warmup, sizes.train_steps)})
                del model

            def fixed() -> None:
                generator_step(tr, xa)
                discriminator_step(tr, xb)

            emit({"case": label, "impl": f"harness G+D step, {disc}",
                  **time_steps(fixed, device, warmup, sizes.train_steps)})
            emit({"case": label, "impl": f"harness train_step (+data), {disc}",
                  **time_steps(lambda: train_step(tr), device, 1, sizes.train_steps)})
            if disc == "dino":
                emit({"case": label, "impl": "dino backbone source", "note": tr.card.get("discriminator_backbone")})
        except Exception as exc:  # one failing configuration must not hide the others' numbers
            emit({"case": label, "impl": f"{disc}", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                  if str(exc) else type(exc).__name__})
        finally:
            tr = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _train_line(row: dict[str, Any], batch: int, bare: Optional[float]) -> Line:
    if "error" in row:
        return Line("2 train", f"{row['case']}: {row['impl']}", "FAIL", note=row["error"])
    if "median_s" not in row:
        return Line("2 train", f"{row['case']}: {row['impl']}", "INFO", note=str(row.get("note")))
    ips = batch / row["median_s"]
    mem = f", peak {row['peak_gb']:.2f} GB" if row.get("peak_gb") is not None else ""
    rel = f"; {bare / row['median_s']:.2f}x the bare step's speed" if bare and "bare" not in row["impl"] else ""
    return Line("2 train", f"{row['case']}: {row['impl']}", "INFO", f"{ips:.1f} img/s{mem}",
                f"{row['median_s'] * 1000:.1f} ms/step, first {row['warmup_s']:.1f} s{rel}")


def train_table(rows: list[dict[str, Any]], batch: int) -> str:
    head = f"{'setting':<16} {'implementation':<42} {'ms/step':>9} {'images/s':>9} {'peak GB':>8} {'vs bare':>8}"
    out = [head, "-" * len(head)]
    bare = {r["case"]: r["median_s"] for r in rows if r.get("impl", "").startswith("bare") and "median_s" in r}
    for r in rows:
        if "median_s" not in r:
            out.append(f"{r['case']:<16} {r['impl']:<42} {r.get('error') or r.get('note') or ''}")
            continue
        b = bare.get(r["case"])
        rel = f"{b / r['median_s']:.2f}x" if b else ""
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "?"
        out.append(f"{r['case']:<16} {r['impl']:<42} {r['median_s'] * 1000:>9.1f} {batch / r['median_s']:>9.1f} "
                   f"{peak:>8} {rel:>8}")
    return "\n".join(out)


def backend_of(args: argparse.Namespace) -> str:
    return args.compile_backend or ("inductor" if args.device.startswith("cuda") or not args.tiny else "eager")


def step_train(args: argparse.Namespace, sizes: Sizes, report: Report, device: Any, tmp: Path,
               deadline: float, child: Optional[Child]) -> None:
    say(f"\n== 2. training throughput: {sizes.preset} GSQ-GAN {sizes.size}px, batch {sizes.batch}, bf16, "
        f"LPIPS-VGG loss; PatchGAN and DINO (random DINOv2 stand-in)")
    rows: list[dict[str, Any]] = []
    train_rows(sizes, device, None, rows.append)
    backend = backend_of(args)
    if child is None:
        rows.append({"case": "compile", "impl": "all rows", "note": "skipped: --no-compile"})
    elif child.proc is None and deadline - time.monotonic() - 10 < 20:
        rows.append({"case": "compile", "impl": "all rows", "note": "skipped: the time budget is used up"})
    else:
        if child.proc is None:  # started now, after the eager rows: limited to what the budget leaves
            child.timeout_s = min(child.timeout_s, deadline - time.monotonic() - 10)
        rows += compile_rows(child, backend, tmp)
    say(train_table(rows, sizes.batch))
    bare = {r["case"]: r["median_s"] for r in rows if r.get("impl", "").startswith("bare") and "median_s" in r}
    report.details["train_rows"] = rows
    report.add(*[_train_line(r, sizes.batch, bare.get(r["case"])) for r in rows])
    if device.type == "cpu" and backend == "eager":
        report.add(Line("2 train", "torch.compile backend", "INFO", "eager",
                        "Inductor skipped on CPU --tiny: its C++ compile takes minutes on 2 cores; Dynamo runs"))


def compile_child_process(args: argparse.Namespace, tmp: Path) -> Optional[Child]:
    """The compile-on rows in a child process with a time limit: a slow or failing compile cannot eat the run."""
    if args.no_compile:
        return None
    out = tmp / f"compile-{backend_of(args)}.jsonl"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--_compile-child", str(out),
           "--compile-backend", backend_of(args)] + (["--tiny"] if args.tiny else [])
    return Child("compile", cmd, tmp, args.compile_timeout)


def compile_rows(child: Child, backend: str, tmp: Path) -> list[dict[str, Any]]:
    say(f"   compile rows from a child process ({backend}, limit {child.timeout_s:.0f} s) ...")
    rc, _, err = child.wait()
    note = None
    if rc == 124:
        note = f"not finished within the {child.timeout_s:.0f} s limit (compilation time)"
    elif rc != 0:
        note = f"child exited {rc}: {(err.strip().splitlines() or [''])[-1][:200]}"
    out = tmp / f"compile-{backend}.jsonl"
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    if note:
        rows.append({"case": f"compile {backend}", "impl": "remaining rows", "note": note})
    return rows


def compile_child(args: argparse.Namespace) -> int:
    import torch

    from gsqbench import distributed as ddp

    device = ddp.resolve_device(args.device)
    sizes = TINY if args.tiny else FULL
    with open(args._compile_child, "a") as f:
        def emit(row: dict) -> None:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
        torch.manual_seed(0)
        train_rows(sizes, device, args.compile_backend, emit)
    return 0


# ---------------------------------------------------------------------------------------------- 3: eval


def step_eval(args: argparse.Namespace, sizes: Sizes, report: Report, device: Any, tmp: Path) -> None:
    import metrics

    import _common as C

    model = ({"preset": sizes.preset, "latent_dim": 16},
             {"name": "gsq", "dim": 16, "codebook_size": sizes.codebook, "groups": 8})
    say(f"\n== 3. evaluation throughput: {sizes.eval_images} images {sizes.eval_size}px, batch {sizes.eval_batch}, "
        f"{sizes.preset} GSQ (random init), Inception + LPIPS {'+'.join(sizes.eval_nets)} (random stand-ins)")
    rows, info = metrics.bench_eval(sizes.eval_images, sizes.eval_batch, sizes.eval_nets, device, sizes.repeats,
                                    tmp / "eval", size=sizes.eval_size, tokenizer=model, warmup=sizes.warmup - 1)
    info["weights"] = "random stand-ins (benchmarks/_standins.py)"
    say(C.format_table(rows))
    timings = info.get("eval_stage_timings_s", {})
    whole = rows[0].median
    shares = {k: v / whole for k, v in sorted(timings.items(), key=lambda kv: -kv[1])}
    shares["other (construction, weight checks, card)"] = max(0.0, 1 - sum(timings.values()) / whole)
    say("   share of evaluate()'s time: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items() if v >= 0.005))
    report.details["eval_rows"] = [dataclasses.asdict(r) for r in rows]
    report.details["eval_info"] = info
    top = ", ".join(f"{k} {100 * v:.0f} %" for k, v in list(shares.items())[:4])
    report.add(Line("3 eval", f"evaluate() {sizes.eval_images} images {sizes.eval_size}px", "INFO",
                    f"{sizes.eval_images / whole:.1f} img/s", f"{whole:.2f} s per pass; {top}"),
               Line("3 eval", "streaming pass vs its bare parts", "INFO",
                    f"{100 * info['eval_in_pass_overhead']:+.1f} %", "model + Inception + LPIPS forwards alone"))


# -------------------------------------------------------------------------------------------- 4: lookup


def step_lookup(args: argparse.Namespace, sizes: Sizes, report: Report, device: Any) -> None:
    import quantizers as Q

    import _common as C

    say("\n== 4. the F16 lookup (d = 2, G = 8): exact and bf16 against the straightforward full matrix")
    rows = []
    for v, batch, side in sizes.lookup_cases:
        rows += Q.bench_lookup(Q.LookupCase("F16", 2, 8, v, batch, side), device, sizes.repeats,
                               modes=("exact", "bf16"), vq=False)
    say(C.format_table(rows))
    report.details["lookup_rows"] = [dataclasses.asdict(r) for r in rows]
    for r in rows:
        if r.impl.startswith("search only"):
            continue
        if r.skipped:
            report.add(Line("4 lookup", f"{r.case}: {r.impl}", "SKIP", note=r.skipped))
        else:
            report.add(Line("4 lookup", f"{r.case}: {r.impl}", "INFO", f"{r.median * 1000:.1f} ms",
                            f"peak +{(r.peak_mb or 0):.0f} MB"))


# ------------------------------------------------------------------------------------------ 5: torchrun


def torchrun_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


WARNINGS = {"find_unused_parameters=True was specified": "DDP find_unused warning",
            "destroy_process_group": "process group not destroyed",
            "Traceback": "traceback"}


def torchrun_children(args: argparse.Namespace, sizes: Sizes, tmp: Path) -> tuple[Child, Child]:
    """`gsqbench train` under torchrun (G alone, then G + D from step n/4; a checkpoint half-way and at the end),
    and benchmarks/ddp_find_unused.py under torchrun."""
    import yaml

    device, n = args.device.split(":")[0], sizes.torchrun_steps
    suite = tmp / "torchrun.yaml"
    suite.write_text(yaml.safe_dump({
        "suite": "gpu-torchrun",
        "shared": {"model": {"preset": "tiny-f8", "latent_dim": 8},
                   "data": {"train": {"kind": "synthetic", "size": sizes.torchrun_size,
                                      "limit": 8 * sizes.torchrun_batch}},
                   "train": {"steps": n, "batch_size": sizes.torchrun_batch, "precision": "bf16",
                             "checkpoint_every": n // 2, "log_every": max(1, n // 4)},
                   "loss": {"perceptual_weight": 0.0},
                   "gan": {"discriminator": "patchgan", "start_step": n // 4,
                           "options": {"num_filters": 16, "num_layers": 2}}},
        "subjects": [{"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 64, "groups": 2}}],
        "seeds": [0]}))
    train = Child("torchrun-train", torchrun_cmd(["-m", "gsqbench", "-v", "train", str(suite), "--results",
                                                  str(tmp / "torchrun-results"), "--device", device,
                                                  "--no-progress"]), tmp, 240)
    extra = ["--preset", sizes.preset, "--size", str(sizes.size), "--batch", str(sizes.ddp_batch),
             "--precision", "bf16" if device == "cuda" else "fp32", "--steps", str(sizes.ddp_steps),
             "--repeats", "1" if args.tiny else str(max(2, sizes.repeats - 1))]
    unused = Child("torchrun-find-unused", torchrun_cmd([str(HERE / "ddp_find_unused.py"), "--device", device,
                                                         "--json", str(tmp / "ddp_find_unused.json"), *extra]),
                   tmp, 300)
    return train, unused


def step_torchrun(args: argparse.Namespace, sizes: Sizes, report: Report, device: Any, tmp: Path,
                  children: tuple[Child, Child]) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    n = sizes.torchrun_steps
    what = f"gsqbench train, {n} steps, {backend}"
    say(f"\n== 5. torchrun, 1 process ({backend}): gsqbench train {n} steps; find_unused_parameters on vs chosen")
    train, unused = children
    rc, out, err = train.wait()
    if rc == 124:
        report.add(Line("5 torchrun", what, "FAIL", note=f"timed out ({train.timeout_s:.0f} s)"))
    else:
        text = out + err
        state = tmp / "torchrun-results" / "gpu-torchrun" / "gsq-s0" / "checkpoint" / "train_state.pt"
        step = None
        if state.exists():
            from gsqbench.checkpoints import load_train_state

            step = load_train_state(state)["step"]
        found = [label for key, label in WARNINGS.items() if key in text]
        init = f"initialised {backend} process group" in text
        speed = re.search(rf"{n} steps, ([\d.]+) images/s", out)
        ok = rc == 0 and step == n and init and not found
        note = f"exit {rc}, checkpoint step {step}, {backend} init {'seen' if init else 'NOT seen'}" + \
            (f", found: {', '.join(found)}" if found else ", no warnings")
        report.add(Line("5 torchrun", what, "PASS" if ok else "FAIL", f"{speed.group(1)} img/s" if speed else "",
                        note))
        report.details["torchrun_train_output"] = text[-6000:]
        say(note)
        if not ok:
            say(text[-3000:])

    rc, out, err = unused.wait()
    say(out.strip())
    result = tmp / "ddp_find_unused.json"
    if rc != 0 or not result.exists():
        report.add(Line("5 torchrun", "find_unused_parameters on vs chosen", "FAIL", f"exit {rc}",
                        "timed out" if rc == 124 else (err.strip().splitlines() or [""])[-1][:200]))
        return
    data = json.loads(result.read_text())
    rate, dec, warned = data["images_per_s"], data["decision"], data["warned"]
    report.details["ddp_find_unused"] = data
    report.add(Line("5 torchrun", "DDP find_unused_parameters: gsqbench's choice", "PASS" if not
                    (dec["generator"] or dec["discriminator"]) and not warned["chosen"] else "FAIL",
                    f"G={dec['generator']}, D={dec['discriminator']}",
                    f"torch warned when forced on: {'yes' if warned['forced on'] else 'no'}, "
                    f"with the choice: {'yes' if warned['chosen'] else 'no'}"),
               Line("5 torchrun", f"images/s, forced on vs chosen ({data['case'].split(',')[0]})", "INFO",
                    f"{rate['forced on']:.1f} vs {rate['chosen']:.1f}", f"{rate['chosen'] / rate['forced on']:.3f}x"))


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every step in well under a minute on a CPU")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="results file (default benchmarks/results/gpu-<device>[-tiny].json)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget; later steps are skipped once it is used up (default 470 s, tiny 300 s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager with "
                                                           "--tiny on a CPU)")
    p.add_argument("--compile-timeout", type=float, default=200.0, help="seconds for the compile rows (default 200)")
    p.add_argument("--pytest-timeout", type=float, default=300.0, help="seconds for step 1's pytest (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--_compile-child", dest="_compile_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = set(args.only.split(","))
    if not steps <= set(STEPS):
        p.error(f"--only: unknown step(s) {sorted(steps - set(STEPS))}; valid: {', '.join(STEPS)}")
    args.steps = steps
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is None and args.tiny:
        # one thread per process: the --tiny run's children share two busy CI cores, and BLAS or OpenMP threads
        # that wait on each other there crawl (numpy's 2048² eigvals of the FID: 6 s on one thread, 31 s on two)
        args.threads = 1
    if args.threads:  # before numpy and torch load their thread pools; the child processes inherit it
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    problem = None if args._compile_child else missing_dependency()  # the parent checked for its child
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_TORCH:
        print(f"gpu.py: torch {torch.__version__} is older than gsqbench supports "
              f"({'.'.join(map(str, MIN_TORCH))} or newer)", file=sys.stderr)
        return 2
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu.py: --device {args.device}, but torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}); use --device cpu --tiny for the CPU run", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.distributed.is_nccl_available():
        print(f"gpu.py: this torch ({torch.__version__}) has no NCCL; step 5 needs it", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._compile_child:
        return compile_child(args)
    return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    import torch

    import _common as C
    import _standins
    from gsqbench import distributed as ddp

    device = ddp.resolve_device(args.device)
    sizes = TINY if args.tiny else FULL
    budget = args.budget_s or (300.0 if args.tiny else 470.0)
    start = time.monotonic()
    deadline = start + budget
    name = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower())
    report = Report(args={k: v for k, v in vars(args).items() if k != "steps"},
                    path=args.json or REPO / "benchmarks" / "results" / f"gpu-{name.strip('-')}"
                    f"{'-tiny' if args.tiny else ''}.json")
    report.machine = C.machine_info(device)
    say(f"# gsqbench GPU check on {report.machine.get('gpu', 'cpu')}: torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), Python {report.machine['python']}, "
        f"{'tiny sizes' if args.tiny else 'full sizes'}, budget {budget:.0f} s")
    with tempfile.TemporaryDirectory(prefix="gsqbench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        _standins.install(("inception-fid", "alexnet", "vgg16", "dinov2-vits14-reg"), tmp / "weights")
        pytest_proc = pytest_child(args, tmp)
        torchrun_procs = torchrun_children(args, sizes, tmp)
        compile_proc = compile_child_process(args, tmp)
        if args.tiny:  # toy numbers: the child processes run beside the in-process steps (two cores, one thread each)
            wanted = {"correctness": [pytest_proc], "torchrun": list(torchrun_procs), "train": [compile_proc]}
            for step in STEPS:
                for child in wanted.get(step, []) if step in args.steps else []:
                    if child is not None:
                        child.start()
        # correctness first (most important), compile (slowest) last; the table lists steps in issue order
        order = [("correctness", lambda: step_correctness(args, report, tmp, pytest_proc)),
                 ("torchrun", lambda: step_torchrun(args, sizes, report, device, tmp, torchrun_procs)),
                 ("lookup", lambda: step_lookup(args, sizes, report, device)),
                 ("eval", lambda: step_eval(args, sizes, report, device, tmp)),
                 ("train", lambda: step_train(args, sizes, report, device, tmp, deadline, compile_proc))]
        if args.tiny:  # the in-process steps first, while the children run
            order = order[2:] + order[:2]
        for step, fn in order:
            if step not in args.steps:
                continue
            if time.monotonic() > deadline:
                report.add(Line(LABELS[step], "all", "SKIP", note=f"time budget of {budget:.0f} s used up"))
                continue
            t0 = time.monotonic()
            try:
                fn()
            except Exception as exc:  # a step that breaks is a finding; the other steps still run
                report.add(Line(LABELS[step], "step raised", "FAIL", type(exc).__name__, str(exc).splitlines()[0][:200]
                                if str(exc) else ""))
            report.details.setdefault("step_seconds", {})[step] = round(time.monotonic() - t0, 1)
            report.save()
        for child in (pytest_proc, *torchrun_procs, compile_proc):
            if child is not None:
                child.stop()
    report.lines.sort(key=lambda x: x.step)
    report.details["total_seconds"] = round(time.monotonic() - start, 1)
    report.save()
    say(f"\n== summary ({report.details['total_seconds']:.0f} s; step seconds "
        f"{report.details.get('step_seconds')}; written to {report.path})")
    say(summary_table(report.lines))
    failed = [x for x in report.lines if x.status == "FAIL"]
    say(f"# {len(failed)} failed" if failed else "# all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
