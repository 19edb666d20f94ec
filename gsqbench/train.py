"""The training loop for one run: AdamW, LR schedule, grad clipping, EMA, bf16 autocast, GAN G/D steps,
atomic checkpoints with exact resume, and DDP under torchrun.

Follows the official GSQ-GAN trainer (HelmholtzAI-FZJ/flex_gen `VideoTokenizerTrainer.py::train_step`,
gsq-reference.md §5.1): per step a G step on batch A (rec + quantizer aux + LPIPS + adversarial, clip, AdamW,
scheduler, EMA of parameters), then, when a discriminator is configured and active, a D step on a FRESH batch B
with the generator re-run. Deliberate differences, each recorded here:
- the D step re-runs the generator under `no_grad` (same values as the official wasted forward, less memory);
- EMA averages parameters only (as the official) but copies buffers from the live model, so a VQ-EMA codebook
  (a buffer) is evaluated as trained rather than at its initial value;
- the data order is owned here: a seeded permutation per epoch, sliced into global batches, each DDP rank
  taking its contiguous slice. Resuming needs only the number of batches consumed, and N ranks see exactly the
  images a single process sees at the same global batch;
- divergence stops the run (the official trainer keeps stepping on NaN): every loss term is checked before the
  backward pass and the gradient norm before the optimiser step; the first non-finite one raises `Diverged`
  (step, term, value) before any weight is touched, and the runner records the run as `diverged`.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from gsqbench import distributed as ddp
from gsqbench.config import Effective, GanSpec, LossSpec, RunSpec, TrainSpec
from gsqbench.effective import resolve as resolve_effective
from gsqbench.errors import UserError
from gsqbench.results import read_train_log_rows, write_train_log

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


class Diverged(Exception):
    """A loss term or gradient norm went non-finite at `step` (1-based, the step being taken): the run stops.

    `term` names it as the train log does (`loss_rec`, `loss_aux`, `loss`, `grad_norm`, `loss_d`, `grad_norm_d`,
    ...), `value` is its repr ('nan', 'inf'), `row` holds the step's values computed so far. `train_run` fills
    `time_s` and `images_per_s` before re-raising.
    """

    def __init__(self, step: int, term: str, value: float, row: dict[str, float]):
        super().__init__(f"training diverged at step {step}: {term} = {value!r}")
        self.step, self.term, self.value, self.row = step, term, repr(float(value)), dict(row)
        self.time_s = float("nan")
        self.images_per_s = float("nan")
        self.card: dict[str, Any] = {}  # the trainer's card (perceptual loss, discriminator, ...)

    def record(self) -> dict[str, Any]:
        """run.json `divergence`."""
        return {"step": self.step, "term": self.term, "value": self.value}


# ----------------------------------------------------------------------------------------------- data order
class BatchStream:
    """This rank's training batches as float (b, 3, S, S) in [-1, 1], from gsqbench.data.TrainLoader.

    The loader's order is a pure function of (seed, batches drawn), so the checkpointed `position` is all a
    resume needs, and rank r of W takes the r-th block of every global batch (same images as one process).
    """

    def __init__(self, dataset: Any, global_batch: int, seed: int, num_workers: Optional[int] = 0):
        from gsqbench.data import train_loader

        world = ddp.world_size()
        if global_batch % world:
            raise UserError(f"config key 'shared.train.batch_size': {global_batch} is not divisible by the "
                            f"world size {world}")
        from gsqbench.data import resolve_num_workers

        batch = global_batch // world
        # decoding runs in worker processes (chosen from the cores when num_workers is None) and, on CUDA, lands
        # in pinned memory so the copy to the GPU overlaps the step
        self.loader = train_loader(dataset, batch, seed, ddp.rank(), world,
                                   num_workers=resolve_num_workers(num_workers, dataset, batch),
                                   pin_memory=torch.cuda.is_available())
        self._it: Optional[Any] = None

    @property
    def position(self) -> int:
        return self.loader.step  # global batches drawn so far

    @position.setter
    def position(self, value: int) -> None:
        self.loader.step, self._it = int(value), None  # restart the (worker) iterator at the new position

    def next(self, device: torch.device) -> Tensor:
        # DataLoader draws a base seed from the global RNG when its iterator starts (lazily, on the first next);
        # keep data loading out of the training RNG stream, or a resumed run (whose iterator starts later)
        # would diverge from an uninterrupted one
        state = torch.get_rng_state()
        if self._it is None:
            self._it = iter(self.loader)
        _, u8 = next(self._it)
        torch.set_rng_state(state)
        return u8.to(device, non_blocking=True).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- optimiser, LR, EMA
def build_optimizer(params: list[tuple[str, nn.Parameter]], lr: float, betas: tuple[float, float],
                    weight_decay: float, eps: float, no_decay_norm_bias: bool) -> torch.optim.AdamW:
    """AdamW in one group like the official; optionally no decay on 1-d tensors (norms, biases)."""
    params = [(n, p) for n, p in params if p.requires_grad]
    if no_decay_norm_bias:
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, t: TrainSpec) -> float:
    """Multiplier on the base LR at `step`: linear warmup, then constant, optionally linear/cosine decay."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.decay == "none":
        return 1.0
    start = max(t.decay_start, t.warmup_steps)
    if step < start:
        return 1.0
    frac = min(1.0, (step - start) / max(1, t.steps - start))
    shape = frac if t.decay == "linear" else 0.5 * (1 - math.cos(math.pi * frac))
    return 1.0 - (1.0 - t.min_lr_ratio) * shape


class Ema:
    """Exponential moving average of parameters (β, initialised as a copy); buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# ----------------------------------------------------------------------------------------------- losses
def build_perceptual(loss: LossSpec, eff: Effective, device: torch.device) -> tuple[Optional[nn.Module], dict[str, Any]]:
    """LPIPS-VGG (gsqbench.losses.PerceptualLoss) from the trunk the effective spec resolved, and its card; None
    when the effective spec has it off (weight 0, or the fallback when the VGG16 weights are missing)."""
    if eff.perceptual == "off":
        notes = [f for f in eff.fallbacks if f.startswith("loss.perceptual_weight")]
        return None, {"perceptual_loss": "off", **({"perceptual_unavailable": notes[0]} if notes else {})}
    from gsqbench.losses import PerceptualLoss

    from gsqbench.weights import display_path

    net = PerceptualLoss(trunk=eff.perceptual_trunk, required=True, input_range=loss.perceptual_input_range)
    card = {**net.card(), "perceptual_trunk": display_path(Path(eff.perceptual_trunk)),
            "perceptual_trunk_sha256": eff.perceptual_trunk_sha256}
    return net.to(device), card


def _make_discriminator(gan: GanSpec, eff: Effective) -> Optional[nn.Module]:
    """The registered discriminator named by the suite, or None. One that augments inside (the DINO one, official
    layout) gets the suite's DiffAugment policy as its own `diffaug`/`aug_policy` options. A pretrained backbone is
    loaded from the file the effective spec resolved (and checked to be that one)."""
    if gan.discriminator == "none":
        return None
    from gsqbench.registry import build_discriminator, discover_discriminators

    cls = discover_discriminators().get(gan.discriminator)
    kwargs = dict(gan.options)
    if getattr(cls, "augments_inside", False):
        kwargs.setdefault("diffaug", bool(gan.diffaug))
        if gan.diffaug:
            kwargs.setdefault("aug_policy", gan.diffaug)
    if eff.backbone == "random":
        kwargs.update(weights=None, allow_random_backbone=True)
    elif eff.backbone is not None:
        kwargs["weights"] = eff.backbone_path
    disc = build_discriminator(gan.discriminator, kwargs)
    if eff.backbone is not None and getattr(disc, "backbone_source", None) != (eff.backbone_path or "random"):
        raise UserError(f"discriminator backbone changed after the run was planned (now "
                        f"{getattr(disc, 'backbone_source', None)!r}, planned {eff.backbone}); run again")
    return disc


def build_diffaug(policy: str) -> Callable[[Tensor], Tensor]:
    if not policy:
        return lambda x: x
    from gsqbench import augment

    return lambda x: augment.diff_augment(x, policy)


# ----------------------------------------------------------------------------------------------- state
@dataclass
class Trainer:
    """Everything that changes during training; `state_dict()` is the resumable checkpoint."""

    run: RunSpec
    device: torch.device
    model: nn.Module
    ddp_model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[Ema]
    disc: Optional[nn.Module] = None
    ddp_disc: Optional[nn.Module] = None
    opt_d: Optional[torch.optim.Optimizer] = None
    stream: Optional[BatchStream] = None
    perceptual: Optional[Callable] = None
    augment: Callable = lambda x: x
    step: int = 0
    elapsed_s: float = 0.0
    lecam: Any = None  # gsqbench.losses.LeCamEMA when LeCAM is on
    log_rows: list = field(default_factory=list)
    card: dict = field(default_factory=dict)  # what the training actually used (perceptual loss on/off, D, ...)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": "gsqbench-train-state", "version": 1, "step": self.step, "elapsed_s": self.elapsed_s,
            "run_id": self.run.run_id, "fairness_hash": self.run.fairness_hash, "quantizer": dict(self.run.quantizer),
            "seed": self.run.seed, "data_position": self.stream.position if self.stream else 0,
            "model": _cpu(self.model.state_dict()), "opt": _cpu(self.opt.state_dict()),
            "sched": self.sched.state_dict(), "lecam": self.lecam.state_dict() if self.lecam else {},
            "rng": _rng_state(),
        }
        if self.ema is not None:
            state["ema"] = _cpu(self.ema.model.state_dict())
        if self.disc is not None:
            state["disc"] = _cpu(self.disc.state_dict())
            state["opt_d"] = _cpu(self.opt_d.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None and "ema" in state:
            self.ema.model.load_state_dict(state["ema"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        if self.lecam is not None and state.get("lecam"):
            self.lecam.load_state_dict(state["lecam"])
        self.stream.position = int(state["data_position"])
        _set_rng_state(state["rng"])


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),  # plain string: train_state stays weights_only-loadable
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(ast.literal_eval(state["python"])))
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj: Any) -> Any:
    return tuple(_tuplify(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


# ----------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def model_spec(run: RunSpec) -> dict[str, Any]:
    m = run.shared.model
    return {"preset": m.preset, "latent_dim": m.latent_dim, **m.options}


def build_trainer(run: RunSpec, dataset: Any, device: torch.device, find_unused: Optional[bool] = None) -> Trainer:
    """Model, EMA, optimisers, scheduler, discriminator, loss helpers and data stream for one run.

    find_unused: DDP's find_unused_parameters; None = on only for a module that needs it (a dry step decides,
    gsqbench.distributed.has_unused_parameters); benchmarks force it to compare."""
    from gsqbench.models.tokenizer import build_tokenizer

    t, g = run.shared.train, run.shared.gan
    eff = run.effective if run.effective is not None else resolve_effective(run.shared)
    seed_everything(run.seed, t.deterministic)
    model = build_tokenizer(model_spec(run), dict(run.quantizer)).to(device)
    ema = Ema(model, t.ema_decay) if t.ema_decay > 0 else None
    opt = build_optimizer(list(model.named_parameters()), t.lr, t.betas, t.weight_decay, t.eps, t.no_decay_norm_bias)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t))
    ddp_model = _wrap_ddp(model, device, _generator_probe(run, device), find_unused, "generator")
    disc = _make_discriminator(g, eff)
    trainer = Trainer(run=run, device=device, model=model, ddp_model=ddp_model, opt=opt, sched=sched, ema=ema)
    if disc is not None:
        disc = disc.to(device)
        trainer.disc, trainer.ddp_disc = disc, _wrap_ddp(disc, device, _disc_probe(run, device), find_unused,
                                                          "discriminator")
        trainer.opt_d = build_optimizer(list(disc.named_parameters()), g.lr, g.betas, g.weight_decay, t.eps,
                                        t.no_decay_norm_bias)
        if not getattr(disc, "augments_inside", False):  # DINO augments inside; PatchGAN needs it here
            trainer.augment = build_diffaug(g.diffaug)
        if g.lecam_weight > 0:
            from gsqbench.losses import LeCamEMA

            trainer.lecam = LeCamEMA()
    trainer.perceptual, trainer.card = build_perceptual(run.shared.loss, eff, device)
    trainer.card.update(discriminator=g.discriminator, world_size=ddp.world_size(), device=str(device),
                        precision=t.precision, fallbacks=list(eff.fallbacks))
    if disc is not None and hasattr(disc, "backbone_source"):
        from gsqbench.weights import display_path

        source = disc.backbone_source  # 'random' marks a non-conformant run
        trainer.card["discriminator_backbone"] = source if source == "random" else display_path(Path(source))
        trainer.card["discriminator_backbone_sha256"] = eff.backbone_sha256
    trainer.stream = BatchStream(dataset, t.batch_size, run.seed, run.shared.data.num_workers)
    if t.compile:
        trainer.ddp_model = torch.compile(trainer.ddp_model)
    return trainer


def _wrap_ddp(module: nn.Module, device: torch.device, probe: Callable[[nn.Module], Tensor],
              find_unused: Optional[bool], what: str) -> nn.Module:
    if not ddp.is_distributed():
        return module
    # The official code always sets find_unused_parameters (an autograd-graph search after every forward); here
    # only a module with parameters that get no gradient needs it: none of the built-ins (VQ-EMA's codebook does
    # not require grad, FSQ/LFQ have no parameters, the DINO backbone is frozen), a plugin may.
    if find_unused is None:
        find_unused = ddp.has_unused_parameters(module, probe, what)
    return ddp.wrap(module, device, find_unused)


def _dry_images(run: RunSpec, device: torch.device, n: int) -> Tensor:
    size = run.shared.data.train.size
    return torch.rand(n, 3, size, size, device=device)  # [0, 1]


def _generator_probe(run: RunSpec, device: torch.device) -> Callable[[nn.Module], Tensor]:
    """Reconstruction + quantizer losses of one image: every generator parameter the G step can reach."""
    def loss_of(model: nn.Module) -> Tensor:
        bf16 = run.shared.train.precision == "bf16"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            x = _dry_images(run, device, 1) * 2 - 1
            x_hat, qout = model(x)
            return (x_hat.float() - x).square().mean() + sum(qout.losses.values(), x.new_zeros(()))
    return loss_of


def _disc_probe(run: RunSpec, device: torch.device) -> Callable[[nn.Module], Tensor]:
    def loss_of(disc: nn.Module) -> Tensor:
        bf16 = run.shared.train.precision == "bf16"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return disc(_dry_images(run, device, 2)).float().mean()  # 2: BatchNorm needs > 1 value per channel
    return loss_of


# ----------------------------------------------------------------------------------------------- one step
def _autocast(tr: Trainer):
    enabled = tr.run.shared.train.precision == "bf16"
    return torch.autocast(device_type=tr.device.type, dtype=torch.bfloat16, enabled=enabled)


def _disc_active(tr: Trainer) -> bool:
    return tr.disc is not None and tr.step >= tr.run.shared.gan.start_step


def generator_step(tr: Trainer, x: Tensor) -> dict[str, float]:
    """G step (official §5.1 step 1): losses, backward, clip, AdamW, LR schedule, EMA."""
    from gsqbench import losses as L

    loss_spec, g = tr.run.shared.loss, tr.run.shared.gan
    tr.ddp_model.train()
    tr.opt.zero_grad(set_to_none=True)
    with _autocast(tr):
        x_hat, qout = tr.ddp_model(x)
        rec = L.reconstruction_loss(x, x_hat, loss_spec.reconstruction)
        aux = sum(qout.losses.values()) if qout.losses else rec.new_zeros(())
        terms = {"rec": rec, "aux": aux}
        rec_total = loss_spec.reconstruction_weight * rec
        if tr.perceptual is not None:
            terms["perceptual"] = tr.perceptual(x, x_hat.float())
            rec_total = rec_total + loss_spec.perceptual_weight * terms["perceptual"]
        loss = rec_total + loss_spec.quantizer_weight * aux
        if _disc_active(tr):
            tr.disc.requires_grad_(False)  # the G step must not leave gradients in D
            logits = tr.disc(tr.augment(0.5 * x_hat.float() + 0.5))  # D sees [0, 1] images (official)
            adv = L.generator_loss(g.g_loss, logits)
            w = loss_spec.adversarial_weight
            if g.adaptive_weight:
                w = w * L.adaptive_weight(rec_total, adv, _last_decoder_weight(tr.model))
            terms["adv"] = adv
            loss = loss + w * adv
            tr.disc.requires_grad_(True)
    row = {"loss": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}}
    _stop_if_nonfinite(tr, row, [f"loss_{k}" for k in terms] + ["loss"])
    loss.backward()
    row["grad_norm"] = _clip(tr.model.parameters(), tr.run.shared.train.grad_clip)
    _stop_if_nonfinite(tr, row, ["grad_norm"], per_rank=False)
    tr.opt.step()
    tr.sched.step()
    if tr.ema is not None:
        tr.ema.update(tr.model)
    return row


def discriminator_step(tr: Trainer, x: Tensor) -> dict[str, float]:
    """D step on a fresh batch (official §5.1 step 2): generator re-run, D loss on real vs detached fake."""
    from gsqbench import losses as L

    g = tr.run.shared.gan
    tr.ddp_disc.train()
    tr.opt_d.zero_grad(set_to_none=True)
    with torch.no_grad(), _autocast(tr):
        x_hat = tr.ddp_model(x)[0].float()
    out = {}
    with _autocast(tr):
        real = tr.ddp_disc(tr.augment(0.5 * x + 0.5))
        fake = tr.ddp_disc(tr.augment(0.5 * x_hat + 0.5))
        loss = L.discriminator_loss(g.d_loss, real, fake)
        if tr.lecam is not None:
            tr.lecam.update(real, fake)  # official order: EMA first, then the regulariser
            reg = L.lecam_loss(real, fake, tr.lecam)
            loss = loss + g.lecam_weight * reg
            out["loss_lecam"] = float(reg.detach())
    out["loss_d"] = float(loss.detach())
    _stop_if_nonfinite(tr, out, [k for k in ("loss_lecam", "loss_d") if k in out])
    loss.backward()
    out["grad_norm_d"] = _clip(tr.disc.parameters(), g.grad_clip)
    _stop_if_nonfinite(tr, out, ["grad_norm_d"], per_rank=False)
    tr.opt_d.step()
    return out


def _clip(params, max_norm: float) -> float:
    """Clip the gradients to `max_norm` (0 = off) and return their total L2 norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    norms = torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in grads])
    return float(torch.linalg.vector_norm(norms))  # read only: the step is unchanged


def _stop_if_nonfinite(tr: Trainer, row: dict[str, float], keys: list[str], per_rank: bool = True) -> None:
    """Raise Diverged at the first of `keys` whose value is not finite, on every rank together.

    Loss values are per rank under DDP (each rank sees its own slice of the batch), so the ranks agree on the flags
    by an all-reduce before any of them stops; gradient norms (`per_rank=False`) are identical after DDP's
    all-reduce of the gradients already.
    """
    flags = [not math.isfinite(row[k]) for k in keys]
    if per_rank and ddp.world_size() > 1:
        flags = [bool(f) for f in ddp.all_reduce_max(torch.tensor(flags, dtype=torch.int64)).tolist()]
    for key, bad in zip(keys, flags):
        if bad:
            raise Diverged(tr.step + 1, key, row[key], row)


def _last_decoder_weight(model: nn.Module) -> Tensor:
    convs = [m.weight for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def train_step(tr: Trainer) -> dict[str, float]:
    row = generator_step(tr, tr.stream.next(tr.device))
    if _disc_active(tr):
        row.update(discriminator_step(tr, tr.stream.next(tr.device)))
    tr.step += 1
    return row


# ----------------------------------------------------------------------------------------------- checkpoints, log
def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint" / STATE_FILE


def save_checkpoint(tr: Trainer, run_dir: Path) -> None:
    """Full trainer state, atomically (rank 0 only); the log is rewritten atomically alongside."""
    from gsqbench.checkpoints import save_train_state

    if ddp.is_main():
        write_train_log(run_dir, tr.log_rows)
        save_train_state(state_path(run_dir), tr.state_dict())
    ddp.barrier()


def try_resume(tr: Trainer, run_dir: Path) -> bool:
    """Continue from the last checkpoint if there is one for this exact run; refuse a mismatched one."""
    from gsqbench.checkpoints import load_train_state

    path = state_path(run_dir)
    if not path.exists():
        return False
    state = load_train_state(path)
    if state.get("fairness_hash") != tr.run.fairness_hash or state.get("quantizer") != dict(tr.run.quantizer) \
            or state.get("seed") != tr.run.seed:
        raise UserError(f"checkpoint {path} belongs to a different spec of run {tr.run.run_id!r}; "
                        "delete that run directory or use another --results root")
    tr.load_state_dict(state)
    tr.log_rows = [r for r in read_train_log_rows(run_dir) if int(r["step"]) <= tr.step]
    log.info("resumed %s at step %d", tr.run.run_id, tr.step)
    return True


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: int
    images_per_s: float
    time_s: float
    resumed_from: Optional[int]
    weights: str  # "ema" or "raw": which weights were exported for evaluation
    model: nn.Module  # the exported (EMA by default) tokenizer, eval mode
    card: dict = field(default_factory=dict)  # training facts for run.json (perceptual loss, discriminator, ...)


def train_run(run: RunSpec, run_dir: str | Path, dataset: Any, *, device: str = "cpu",
              progress: bool = True, stop_after: Optional[int] = None) -> TrainResult:
    """Train one run to `run.shared.train.steps` (resuming if a checkpoint exists) and export the tokenizer.

    `stop_after` ends the process early after that many steps in total (tests of kill/resume use it as a
    barrier-free way to cut a run short; a real interruption is just a killed process). The run folder is locked
    for the duration (gsqbench.locks; rank 0 holds it): a second process training the same run is refused.
    """
    run_dir = Path(run_dir)
    ddp.init_from_env(device)
    with ddp.rank0_lock(run_dir, f"train {run.suite}/{run.run_id}"):
        return _train_locked(run, run_dir, dataset, device, progress, stop_after)


def _train_locked(run: RunSpec, run_dir: Path, dataset: Any, device: str, progress: bool,
                  stop_after: Optional[int]) -> TrainResult:
    dev = ddp.resolve_device(device)
    tr = build_trainer(run, dataset, dev)
    resumed = tr.step if try_resume(tr, run_dir) else None
    t = run.shared.train
    bar = _progress_bar(progress and ddp.is_main(), tr.step, t.steps, run.run_id)
    t_start = time.perf_counter() - tr.elapsed_s
    try:
        while tr.step < t.steps and (stop_after is None or tr.step < stop_after):
            row = train_step(tr)
            tr.elapsed_s = time.perf_counter() - t_start
            _record(tr, row, t, bar)
            if tr.step % t.checkpoint_every == 0 or tr.step == t.steps:
                save_checkpoint(tr, run_dir)
    except Diverged as exc:
        tr.elapsed_s = time.perf_counter() - t_start
        _record_divergence(tr, exc, run_dir)
        raise
    finally:
        bar.close()
    weights = run.shared.eval.weights if tr.ema is not None else "raw"
    exported = tr.ema.model if weights == "ema" else tr.model
    if tr.step >= t.steps and ddp.is_main():
        export_tokenizer(run, run_dir, exported, tr.step, weights)
    return TrainResult(steps=tr.step, images_per_s=_images_per_s(tr), time_s=tr.elapsed_s,
                       resumed_from=resumed, weights=weights, model=exported.eval(), card=dict(tr.card))


def _record_divergence(tr: Trainer, exc: Diverged, run_dir: Path) -> None:
    """The diverged step's values go into train_log.csv (column `diverged` names the term); no checkpoint is saved,
    so the last one on disk holds the last finite state."""
    exc.time_s, exc.images_per_s, exc.card = tr.elapsed_s, _images_per_s(tr), dict(tr.card)
    tr.log_rows.append({"step": exc.step, **exc.row, "lr": tr.sched.get_last_lr()[0],
                        "images_per_s": round(exc.images_per_s, 3), "time_s": round(tr.elapsed_s, 3),
                        "diverged": exc.term})
    if ddp.is_main():
        write_train_log(run_dir, tr.log_rows)
    log.error("%s diverged at step %d: %s = %s; training stopped (lower train.lr or check the data)",
              tr.run.run_id, exc.step, exc.term, exc.value)


def _images_per_s(tr: Trainer) -> float:
    return tr.step * tr.run.shared.train.batch_size / tr.elapsed_s if tr.elapsed_s > 0 else float("nan")


def _record(tr: Trainer, row: dict[str, float], t: TrainSpec, bar: Any) -> None:
    if tr.step % t.log_every and tr.step != t.steps and tr.step != 1:
        bar.update(1)
        return
    row = {"step": tr.step, **row, "lr": tr.sched.get_last_lr()[0],
           "images_per_s": round(_images_per_s(tr), 3), "time_s": round(tr.elapsed_s, 3)}
    tr.log_rows.append(row)
    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "loss_rec", "loss_d", "images_per_s")})
    bar.update(1)


def _progress_bar(enabled: bool, start: int, total: int, name: str):
    from gsqbench.progress import Progress

    # a bar on a terminal, one line per 10 % in a log (gsqbench.progress)
    return Progress(total, f"{name} train", enabled=enabled, initial=start, unit="steps")


def export_tokenizer(run: RunSpec, run_dir: Path, model: nn.Module, step: int, weights: str) -> None:
    """Write checkpoint/model.safetensors + model.json (the weights evaluation uses)."""
    from gsqbench.checkpoints import save_tokenizer

    meta = {"run_id": run.run_id, "step": step, "weights": weights, "fairness_hash": run.fairness_hash,
            "seed": run.seed, "suite": run.suite}
    save_tokenizer(Path(run_dir) / "checkpoint", model, model_spec(run), dict(run.quantizer), meta)


def train_metrics(result: "TrainResult | Diverged") -> list:
    """`train_images_per_s` and `train_time_s` as MetricValues for results.py (of a finished or diverged run)."""
    from gsqbench.metrics.base import MetricValue

    return [MetricValue("train_images_per_s", float(result.images_per_s), direction="higher"),
            MetricValue("train_time_s", float(result.time_s), direction="lower")]
