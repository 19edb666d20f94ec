"""Resumable evaluation: one rank's streaming state, saved atomically during a long pass and restored after a kill.

A 50,000-image evaluation that dies near the end must not start over. Every K batches (or every
CHECKPOINT_INTERVAL_S seconds) each rank writes `<out_dir>/.eval-state/rank<r>-of-<w>.pt`: the pass state (image
ids and digests so far, skipped images, samples written, batches done) and every metric's `state_dict()` (sums,
counts, codebook histograms, per-image rows; docs/contracts.md "Metrics"), through one atomic write. A new
evaluation with the same fingerprint (settings, data description, metric classes, model weights digest, rank and
world size) loads it and continues with the next batch; since every metric state is restored exactly and the
batches are the same, the result is bit-identical to an uninterrupted pass (tested with SIGKILL, CPU, fixed threads).
A state of another fingerprint is ignored (with a warning) and replaced. The files hold tensors, numbers, strings
and lists only and are read with `torch.load(weights_only=True)`.

Under DDP each rank saves and restores its own shard's state; ranks need not stop at the same batch.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from gsqbench import distributed as ddp
from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes
from gsqbench.metrics.base import Metric

log = logging.getLogger(__name__)

STATE_DIR = ".eval-state"
STATE_VERSION = 1
CHECKPOINT_INTERVAL_S = 300.0  # default cadence: a killed 50k evaluation loses at most ~5 minutes


def module_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, bytes): which weights an evaluation ran."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class EvalCheckpoint:
    """Saves and restores one rank's evaluation state; inactive without an out_dir, with `every == 0`, or when a
    metric cannot be checkpointed (`state_dict()` is None)."""

    def __init__(self, out_dir: Optional[Path], every: Optional[int], metrics: Sequence[Metric],
                 fingerprint: Callable[[], Mapping[str, Any]]):
        self.path: Optional[Path] = None
        self.every = every
        self._since, self._last = 0, time.monotonic()
        if out_dir is None or every == 0:
            return
        blocked = [type(m).__name__ for m in metrics if m.state_dict() is None]
        if blocked:
            log.info("evaluation is not resumable: %s keep no saveable state", ", ".join(blocked))
            return
        self.path = Path(out_dir) / STATE_DIR / f"rank{ddp.rank()}-of-{ddp.world_size()}.pt"
        self.fingerprint = hashlib.sha256(_canonical(fingerprint()).encode()).hexdigest()

    @property
    def active(self) -> bool:
        return self.path is not None

    def restore(self, metrics: Sequence[Metric]) -> Optional[dict[str, Any]]:
        """Load a matching saved state into `metrics`; returns the saved pass state, or None (start from the top)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file is never trusted: the pass starts over and replaces it
            log.warning("evaluation state %s is unreadable (%s); starting the evaluation over", self.path, exc)
            return None
        names = [type(m).__name__ for m in metrics]
        if (not isinstance(state, dict) or state.get("version") != STATE_VERSION
                or state.get("fingerprint") != self.fingerprint or state.get("metric_names") != names):
            log.warning("evaluation state %s was saved for another model, data or settings; starting over", self.path)
            return None
        try:
            for metric, metric_state in zip(metrics, state["metrics"]):
                metric.load_state_dict(metric_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UserError(f"evaluation state {self.path} does not fit the metrics ({exc}); delete "
                            f"{self.path.parent} to start the evaluation over") from None
        log.info("resuming the evaluation after %d images (%s)", state["pass"].get("images_read", 0), self.path)
        return dict(state["pass"])

    def step(self, pass_state: Callable[[], Mapping[str, Any]], metrics: Sequence[Metric]) -> None:
        """Called after every batch: saves when K batches (or the interval) have passed since the last save."""
        if self.path is None:
            return
        self._since += 1
        due = self._since >= self.every if self.every else time.monotonic() - self._last >= CHECKPOINT_INTERVAL_S
        if due:
            self.save(pass_state(), metrics)

    def save(self, pass_state: Mapping[str, Any], metrics: Sequence[Metric]) -> None:
        payload = {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                   "metric_names": [type(m).__name__ for m in metrics],
                   "metrics": [m.state_dict() for m in metrics], "pass": dict(pass_state)}
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self._since, self._last = 0, time.monotonic()

    def finish(self) -> None:
        """The evaluation completed: remove this rank's state (and the folder once it is empty)."""
        if self.path is None:
            return
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:  # another rank's state is still there, or the folder is already gone
            pass
