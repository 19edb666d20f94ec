"""torch.distributed plumbing shared by evaluation, metrics and training: init from torchrun env vars, rank/world
helpers, and the reductions metrics-protocol.md §10 prescribes (sum float64 / int64, gather (id, value) pairs).

Backend: NCCL when CUDA is available, gloo otherwise (CPU tests run 2 gloo processes). Every helper is a no-op
(returns its input) when torch.distributed is not initialised, so single-process code needs no branches. A process
started by torchrun is distributed even alone (`--nproc_per_node 1`: the NCCL/DDP path of a multi-GPU run on one
GPU); a plain `python` process is not.

`wrap` is the one place modules become DistributedDataParallel. `find_unused_parameters=True` makes DDP traverse
the autograd graph after every forward to find parameters that will get no gradient (and torch warns when it finds
none), so it is turned on only for modules that need it: `has_unused_parameters` decides with one dry
forward/backward on a copy (no built-in tokenizer or discriminator needs it; a plugin with, say, an eval-only
parameter does, and would otherwise stop DDP at its second step).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from gsqbench.errors import UserError

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets TORCHELASTIC_RUN_ID in every worker it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Initialise the process group when launched by torchrun (any world size) or with WORLD_SIZE > 1 set by a
    launcher. Returns whether DDP is active.

    NCCL when the run computes on CUDA (`device` cuda…, or auto with a GPU), gloo otherwise. Sets the CUDA device to
    LOCAL_RANK first, so NCCL and every later `.cuda()` use the right GPU. Idempotent.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not launched_by_torchrun():
        return False
    use_cuda = _wants_cuda(device) and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("initialised %s process group: rank %d of %d", backend, rank(), world_size())
    return True


def local_device() -> torch.device:
    """The device this rank should compute on (its LOCAL_RANK GPU, else CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(device: str) -> torch.device:
    """`auto | cpu | cuda | cuda:N` → this rank's device (under torchrun a bare `cuda` means its LOCAL_RANK GPU)."""
    if device == "auto":
        return local_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        if device == "cuda" or is_distributed():
            return local_device()
        return torch.device(device)
    if device != "cpu":
        raise UserError(f"--device {device!r} is not valid; expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def wrap(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """`module` as DistributedDataParallel on `device` (unchanged when not distributed)."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def has_unused_parameters(module: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], what: str = "") -> bool:
    """Whether some trainable parameter of `module` gets no gradient from `loss_of(copy)`: one dry forward and
    backward on a deep copy, so the module, its buffers (e.g. VQ-EMA statistics) and every RNG stream are left
    as they were. All ranks must build DDP alike, so the verdict is OR-ed over ranks. A module that cannot be
    copied is assumed to need the search (the safe setting)."""
    try:
        probe = copy.deepcopy(module)
    except Exception as exc:  # e.g. an attribute that does not deep-copy: keep the safe setting
        log.info("DDP %s: cannot copy the module for the unused-parameter check (%s); find_unused_parameters on",
                 what, exc)
        unused = ["?"]
    else:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            loss_of(probe).backward()
        unused = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
        del probe
    flag = bool(all_reduce_max(torch.tensor([1.0 if unused else 0.0])).item())
    log.info("DDP %s: find_unused_parameters=%s (parameters without a gradient in a dry step: %s)", what, flag,
             ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "") if unused else "none on this rank")
    return flag


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned on t's device and dtype (use float64 sums and int64 counts; never means)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable; only ever our own in-process values), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_per_image(image_ids: Sequence[str], values: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """Gather (id, value) pairs from all ranks and sort by id; every id must be unique (§10)."""
    pairs = [p for part in all_gather_objects(list(zip(image_ids, values))) for p in part]
    pairs.sort(key=lambda p: p[0])
    ids = [p[0] for p in pairs]
    dup = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
    if dup is not None:
        raise UserError(f"image id '{dup}' occurs more than once in the evaluation set; image ids must be unique")
    return ids, [p[1] for p in pairs]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def rank0_lock(folder: Any, purpose: str = "") -> Iterator[None]:
    """Hold `folder`'s writer lock (gsqbench.locks) for the body: taken by rank 0 only, which is the rank that
    writes results and checkpoints; its outcome is broadcast, so when rank 0 is refused every rank raises the same
    one-line LockHeld instead of waiting in the next collective."""
    from gsqbench.locks import LockHeld, hold

    with contextlib.ExitStack() as stack:
        error = None
        if is_main():
            try:
                stack.enter_context(hold(folder, purpose))
            except LockHeld as exc:
                error = ("held", str(exc))
            except OSError as exc:  # e.g. a read-only folder: the other ranks must not wait for rank 0 forever
                error = ("os", f"could not lock {folder}: {exc.strerror or exc}")
        error = broadcast_object(error)
        if error is not None:
            raise LockHeld(error[1]) if error[0] == "held" else OSError(error[1])
        yield
