"""Plumbing shared by the metric implementations: uint8 input checks, exact-fp32 numerics, weight resolution and
per-image (id, value) bookkeeping with the DDP gather of metrics-protocol.md §10.

Every metric receives the same uint8 (real, fake) pair (§1) unless it reads the official float pair of `gsq-compat`
(`pixel_input`); this module is where the uint8 contract is checked once.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence

import torch

from gsqbench import distributed
from gsqbench.errors import UserError
from gsqbench.metrics.base import Metric, MetricContext, MetricInput, MetricValue, mean_with_interval

log = logging.getLogger(__name__)


def check_image_pair(real: torch.Tensor, fake: torch.Tensor, *, what: str = "images") -> None:
    """Both sides uint8 (b, 3, H, W) of one shape: the §1 rule that every metric sees the same converter output."""
    for side, t in (("real", real), ("fake", fake)):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{what} {side}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise UserError(f"{what} {side}: dtype {t.dtype}; expected torch.uint8 (convert with round-half-even)")
        if t.ndim != 4 or t.shape[1] != 3:
            raise UserError(f"{what} {side}: shape {tuple(t.shape)}; expected (b, 3, H, W)")
    if real.shape != fake.shape:
        raise UserError(f"{what}: real shape {tuple(real.shape)} != fake shape {tuple(fake.shape)}")


def pixel_input(ctx: MetricContext) -> MetricInput:
    """The pair PSNR, SSIM and LPIPS read: the official float images in `gsq-compat` (the official evaluation never
    quantises them, gsq-reference.md §6), the uint8 pair otherwise (metrics-protocol.md §1)."""
    return "official-float" if getattr(ctx.settings, "mode", "gsqbench") == "gsq-compat" else "uint8"


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmul and cuDNN and autocast disabled, restored afterwards (§5, §6: metrics run in full fp32)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        # an evaluator running the model under bf16 autocast must not leak it into the metric networks
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def resolve_weights(name: str, explicit: Optional[str | Path], required: bool) -> tuple[Optional[Path], Optional[str]]:
    """(verified path, None) or (None, reason). An explicit path bypasses the manager (tests, callers that verified).

    Follows docs/contracts.md: a missing/unverified file makes the metric unavailable with the fix command, unless
    the user required the metric, in which case it is a UserError.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"weights file for '{name}': {path} does not exist; pass an existing file")
        return path, None
    from gsqbench.weights import WeightsUnavailable, weight_path

    try:
        return weight_path(name), None
    except WeightsUnavailable as exc:
        if required:
            raise UserError(f"required metric needs weights '{name}': {exc}") from None
        log.warning("metric unavailable: %s", exc)
        return None, str(exc)


def shared_object(shared: Optional[dict], key: Hashable, build: Callable[[], Any]) -> Any:
    """`shared[key]`, built on first use: one network per evaluation for every metric that needs it (the dict is
    MetricContext.shared); without a dict, a private instance."""
    if shared is None:
        return build()
    if key not in shared:
        shared[key] = build()
    return shared[key]


class SharedExtractor:
    """A feature network several metrics of one pass call on the same batches; each batch is run through it once.

    Every metric receives the very same (real, fake) tensors per batch (evaluate.py converts once), so the output
    for the last few input tensors is kept and handed to the next metric asking for it. The memo is keyed by the
    tensor object, held weakly (a freed batch can never match a new tensor at the same address), and its in-place
    version counter (a modified tensor is recomputed). The caller's `exact_fp32()` context applies as usual.
    """

    def __init__(self, model: Any, device: torch.device | str, slots: int = 2) -> None:
        self.model, self.device, self.slots = model, torch.device(device), slots
        self._memo: list[tuple[weakref.ref, int, Any]] = []
        self.calls = 0  # forwards actually run (tests check the sharing)

    def __call__(self, images: torch.Tensor) -> Any:
        for ref, version, out in self._memo:
            if ref() is images and version == images._version:
                return out
        out = self.model(images.to(self.device))
        self.calls += 1
        self._memo = [*self._memo, (weakref.ref(images), images._version, out)][-self.slots:]
        return out


class PerImageMetric(Metric):
    """Keeps (image_id, value) per column; `sync` gathers all ranks and sorts by id (§10), then means with intervals.

    `columns` are the per-image values kept (default: `keys`); names starting with '_' are internal (e.g. exact
    squared-error sums for pooled PSNR) and not reported per image.
    """

    columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.columns = self.columns or self.keys
        self._ids: list[str] = []
        self._values: dict[str, list[float]] = {k: [] for k in self.columns}
        self._unavailable: Optional[str] = None
        self._synced = False

    def _append(self, image_ids: Sequence[str], values: dict[str, torch.Tensor]) -> None:
        if self._synced:
            raise RuntimeError(f"{type(self).__name__}.update after sync(): create a new metric per evaluation")
        ids = [str(i) for i in image_ids]
        for key, v in values.items():
            v = v.detach().to("cpu", torch.float64).reshape(-1)
            if v.numel() != len(ids):
                raise UserError(f"{key}: got {len(ids)} image ids for a batch of {v.numel()} images")
            self._values[key].extend(v.tolist())
        self._ids.extend(ids)

    def sync(self) -> None:
        """Gather (id, values) from every rank, sorted by image id on any world size so outputs never depend on it.

        Runs once (a second gather would duplicate every image). Duplicate ids are checked on the gathered list,
        which every rank sees identically, so all ranks fail together instead of leaving the others waiting.
        """
        if self._synced:
            return
        rows = list(zip(*(self._values[k] for k in self.columns))) if self._ids else []
        parts = distributed.all_gather_objects(list(zip(self._ids, rows)))
        pairs = sorted((p for part in parts for p in part), key=lambda p: p[0])
        ids = [p[0] for p in pairs]
        if len(set(ids)) != len(ids):
            dup = next(i for i, j in zip(ids, ids[1:]) if i == j)
            raise UserError(f"per-image metric: image id '{dup}' was evaluated twice; every image needs a unique id")
        self._ids = ids
        self._values = {k: [float(p[1][j]) for p in pairs] for j, k in enumerate(self.columns)}
        self._synced = True

    def image_ids(self) -> list[str]:
        """Image ids in the order of `per_image()` values (sorted by id after `sync`)."""
        return list(self._ids)

    def state_dict(self) -> dict:
        """The (id, values) rows so far: ids as strings, each column as one float64 tensor (exact)."""
        return {"ids": list(self._ids), "synced": self._synced,
                "values": {k: torch.tensor(v, dtype=torch.float64) for k, v in self._values.items()}}

    def load_state_dict(self, state) -> None:
        if set(state["values"]) != set(self.columns):
            raise ValueError(f"{type(self).__name__}: saved columns {sorted(state['values'])} != {list(self.columns)}")
        self._ids = [str(i) for i in state["ids"]]
        self._values = {k: state["values"][k].to(torch.float64).tolist() for k in self.columns}
        self._synced = bool(state["synced"])

    def per_image(self) -> dict[str, list[float]]:
        if self._unavailable is not None:
            return {}
        return {k: list(v) for k, v in self._values.items() if not k.startswith("_")}

    def compute(self) -> list[MetricValue]:
        if self._unavailable is not None:
            return [MetricValue.missing(k, self._unavailable, self.outputs[k]) for k in self.keys]
        return [mean_with_interval(self._values[k], k, self.outputs[k], ids=self._ids) for k in self.keys]
