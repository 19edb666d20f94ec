"""Suite configuration: frozen typed dataclasses loaded from YAML, `--set` overrides, grid expansion, fairness hash.

A suite is one `shared` spec (backbone, data, recipe, losses, GAN, precision, checkpointing, evaluation) plus a
list of `subjects` that may differ ONLY in their quantizer block (gsq-reference.md §8.5 "identical
hyperparameters"), a list of seeds and an optional `grid` (the paper's scaling studies, §7.7/§7.9).

This module is a leaf: typed dataclasses and parsing only. It imports nothing from later stages (no torch, no
registry), so loading a suite is cheap; checks that need later stages (quantizer kwargs against the registry,
regress tolerances, eval metric names, backbone presets) live in `gsqbench.validate.validate_suite`.

Fairness hash: SHA-256 of the canonical JSON of the *effective* shared spec of one run (`fairness_view`): the
spec after `--set` overrides and the run's grid values for shared fields (e.g. `model.latent_dim`), plus what the
run actually uses after every fallback (`Effective`: the perceptual loss on or off and the SHA-256 of its VGG16
trunk, the discriminator and the source and SHA-256 of its backbone weights, the precision), which
`gsqbench.effective.resolve` looks up before training. Left out: quantizer kwargs, seed and names; fields that
cannot change a result (`RESULT_FREE_FIELDS`, each proven bit-identical by tests/test_fairness.py); fields with no
effect in this run (`no_effect_fields`, e.g. every `gan.*` field without a discriminator). Two runs are comparable
only if their hashes are equal, so grid points at different shared settings are never put into one comparison,
while grid points that only change the quantizer (e.g. `quantizer.groups`) share a hash.

Grid syntax: `grid: {dotted.key: [v1, v2, ...]}` expands to the cartesian product over keys. To move several
keys together, join them with commas and give one list per point:
`grid: {"model.latent_dim,quantizer.dim": [[8, 8], [16, 16]]}`. Keys starting with `quantizer.` are applied to
every subject's quantizer block; every other key must be a shared field.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from gsqbench.errors import UserError, did_you_mean
from gsqbench.io import read_text_utf8, safe_name
from gsqbench.modes import MODES, PINNED, check_mode, get_mode


# ----------------------------------------------------------------------------------------------- spec dataclasses
@dataclass(frozen=True)
class ModelSpec:
    """Backbone: a preset of gsqbench.models.autoencoder plus the encoder latent dim (D)."""

    preset: str = "tiny-f8"
    latent_dim: int = 8
    options: dict[str, Any] = field(default_factory=dict)  # AutoencoderConfig overrides (hidden, ch_mult, ...)


@dataclass(frozen=True)
class DataSource:
    """One dataset (gsqbench.data.build_dataset): kind sample-photos | image-folder | synthetic."""

    kind: str = "sample-photos"
    path: Optional[str] = None
    size: int = 64
    crop: str = "train"
    limit: Optional[int] = None  # N images (gsqbench.data picks them deterministically); None = all
    seed: int = 0  # synthetic / sample-photos generation seed (a data property, not the run seed)
    strict: bool = False  # corrupt image => error instead of skip-with-warning
    crops_per_image: int = 1  # > 1: the protocol crop plus seeded random crops of each image (gsqbench.data)


@dataclass(frozen=True)
class DataSpec:
    """Training draws a seeded permutation per epoch (gsqbench.data.TrainLoader); there is no unshuffled mode."""

    train: DataSource = field(default_factory=DataSource)
    eval: DataSource = field(default_factory=lambda: DataSource(crop="gsq"))
    num_workers: Optional[int] = None  # decoding worker processes per rank; None = chosen from the cores


@dataclass(frozen=True)
class TrainSpec:
    """Optimiser, schedule, precision and checkpointing (official recipe: gsq-reference.md §5.1, §5.4)."""

    steps: int = 100
    batch_size: int = 8  # GLOBAL batch; each DDP rank takes batch_size / world_size
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.05
    eps: float = 1e-8
    no_decay_norm_bias: bool = False  # official: one param group, decay on everything
    warmup_steps: int = 0
    decay: Literal["none", "linear", "cosine"] = "none"
    decay_start: int = 0  # step at which decay begins (after warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float = 2.0  # 0 = off
    ema_decay: float = 0.999  # 0 = no EMA
    precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False
    checkpoint_every: int = 5000
    log_every: int = 10
    deterministic: bool = False


@dataclass(frozen=True)
class LossSpec:
    """Generator loss weights (gsq-reference.md §5.2): rec + aux + perceptual + adversarial."""

    reconstruction: Literal["l2", "l1"] = "l2"
    reconstruction_weight: float = 1.0
    quantizer_weight: float = 1.0  # multiplies the quantizer's already-weighted aux losses
    perceptual_weight: float = 0.0
    perceptual_input_range: Literal["[0,1]", "[-1,1]"] = "[0,1]"  # official quirk feeds [0, 1] to LPIPS
    perceptual_required: bool = False  # missing LPIPS weights: error instead of "off with a message"
    adversarial_weight: float = 0.1


@dataclass(frozen=True)
class GanSpec:
    """Discriminator and its optimiser; `none` trains a plain autoencoder (recipe A)."""

    discriminator: str = "none"  # a registered discriminator (gsqbench list discriminators) or "none"
    g_loss: Literal["ns", "hinge", "vanilla"] = "ns"
    d_loss: Literal["hinge", "vanilla", "ns"] = "hinge"
    start_step: int = 0
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    diffaug: str = "color,translation,cutout"  # "" = off
    adaptive_weight: bool = False
    lecam_weight: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # discriminator constructor kwargs


@dataclass(frozen=True)
class EvalSpec:
    """How runs are evaluated (gsqbench.evaluate.EvalSettings adds the per-run fields: seed, workers, progress).

    `metrics` lists metric families, registered metric names or metric keys (empty = all); `require` lists metric
    keys that must not come out unavailable. Names are checked against the metric registry by validate_suite.
    """

    mode: str = PINNED  # a mode of gsqbench.modes.MODES (checked when the suite is parsed)
    weights: Literal["ema", "raw"] = "ema"
    batch_size: int = 16
    samples: int = 8  # first k (real, recon) pairs saved as PNG under samples/
    metrics: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    fid_reference_stats: Optional[str] = None  # real-side statistics file (the FID metric verifies its key)
    fid_cache_dir: Optional[str] = None  # cache real-side statistics here, keyed by data + extractor
    precision: Optional[Literal["fp32", "bf16"]] = None  # model precision; None = the mode's (fp32 / bf16)
    lpips_nets: tuple[Literal["alex", "vgg"], ...] = ("alex", "vgg")
    keep_features: bool = False  # keep the float16 feature files KID / precision-recall write under <run>/features
    save_recon: Optional[Literal["npz", "png"]] = None  # export reconstructions and originals under <run>/export
    # nearest-code lookup the evaluation pins for quantizers that have one; None = the mode's (exact / official bf16)
    lookup: Optional[Literal["exact", "fp32-expanded", "bf16"]] = None
    # gsq-compat SSIM averaging: the valid interior (torchmetrics <= 1.4.1) or the full reflect-padded map
    # (torchmetrics >= 1.4.2); None = valid. gsqbench mode pins valid (metrics-protocol.md §4, §14)
    ssim_border: Optional[Literal["valid", "reflect-full"]] = None

    @property
    def lookup_mode(self) -> str:
        """The nearest-code lookup the evaluation pins: `lookup` when given, else the mode's (gsqbench.modes): the
        exact nearest code in gsqbench mode, the official bf16-autocast lookup in gsq-compat, ..."""
        if self.lookup is not None:
            return self.lookup
        return get_mode(self.mode).lookup if self.mode in MODES else "exact"

    @property
    def precision_mode(self) -> str:
        """The model precision: `precision` when given, else the mode's (fp32; bf16 in gsq-compat)."""
        if self.precision is not None:
            return self.precision
        return get_mode(self.mode).precision if self.mode in MODES else "fp32"

    @property
    def ssim_border_mode(self) -> str:
        """The SSIM averaging the evaluation uses: `ssim_border` when given, else the valid interior (the pinned
        protocol; in gsq-compat torchmetrics <= 1.4.1, one of the two behaviours the official code may have had)."""
        return self.ssim_border or "valid"


@dataclass(frozen=True)
class SharedSpec:
    """Everything the subjects share; its canonical JSON is the fairness hash."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    gan: GanSpec = field(default_factory=GanSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


@dataclass(frozen=True)
class Subject:
    """A subject is trained from its `quantizer` block, or `load`ed: a published release file, an official GSQ
    release folder or a gsqbench checkpoint, evaluated (never trained) with the suite's eval settings. A loaded
    subject may add evaluation `modes` (e.g. its own compatibility mode): one more run per mode, each with its own
    fairness and card hash."""

    name: str
    quantizer: dict[str, Any] = field(default_factory=dict)  # {"name": "gsq", **kwargs}; empty when loaded
    load: Optional[str] = None
    modes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    suite: str
    shared: SharedSpec
    subjects: tuple[Subject, ...]
    seeds: tuple[int, ...] = (0,)
    grid: dict[str, list] = field(default_factory=dict)
    regress: dict[str, Union[float, str]] = field(default_factory=dict)  # metric -> tolerance (0.1 or "2%")


@dataclass(frozen=True)
class Effective:
    """What a run actually uses once every fallback is resolved; part of the fairness hash (see `hashed`).

    `gsqbench.effective.resolve` fills it from the environment (weight files present, their SHA-256) before any
    training, and the trainer builds exactly this. `intent` is the spec's own request with nothing looked up
    (`resolved=False`; its hash never equals a resolved one). Paths say where the trainer finds the files; only
    the files' SHA-256 is hashed, so the same weights at another path hash the same.
    """

    perceptual: str = "off"  # "lpips-vgg-v0.1" | "off"
    perceptual_trunk: Optional[str] = None
    perceptual_trunk_sha256: Optional[str] = None
    discriminator: str = "none"
    backbone: Optional[str] = None  # pretrained discriminator backbone: "weights:<name>" | "file" | "random" | None
    backbone_path: Optional[str] = None
    backbone_sha256: Optional[str] = None
    precision: str = "fp32"  # training autocast: bf16 | fp32
    fallbacks: tuple[str, ...] = ()  # one line per fallback, e.g. "loss.perceptual_weight 1.0 → off: VGG16 ..."
    resolved: bool = True

    @classmethod
    def intent(cls, shared: "SharedSpec") -> "Effective":
        """The spec's request, nothing looked up (every weight assumed present)."""
        return cls(perceptual="lpips-vgg-v0.1" if shared.loss.perceptual_weight > 0 else "off",
                   discriminator=shared.gan.discriminator, precision=shared.train.precision, resolved=False)

    def hashed(self) -> dict[str, Any]:
        """The fields the fairness hash covers (no paths, no prose)."""
        out = {"perceptual": self.perceptual, "perceptual_trunk_sha256": self.perceptual_trunk_sha256,
               "discriminator": self.discriminator, "backbone": self.backbone, "backbone_sha256": self.backbone_sha256,
               "precision": self.precision}
        if not self.resolved:
            out["resolved"] = False
        return out


@dataclass(frozen=True)
class RunSpec:
    """One concrete run: subject × seed × grid point, with everything resolved."""

    run_id: str
    suite: str
    subject: str
    seed: int
    grid: dict[str, Any]
    shared: SharedSpec
    quantizer: dict[str, Any]
    fairness_hash: str
    regress: dict[str, Any] = field(default_factory=dict)  # the suite's regress tolerances, stored with each run
    effective: Optional[Effective] = None  # None: not resolved (config.expand_runs without a resolver)
    load: Optional[str] = None  # a loaded subject: the checkpoint / release evaluated instead of training
    release_sha256: Optional[str] = None  # its file's SHA-256 (None: not resolved)

    @property
    def loaded(self) -> bool:
        return self.load is not None

    @property
    def used(self) -> Effective:
        """What this run uses: the resolved Effective, or the spec's intent when nothing was resolved."""
        return self.effective if self.effective is not None else Effective.intent(self.shared)

    def spec_json(self) -> dict[str, Any]:
        """The resolved spec as run.json stores it (regress reads `spec.regress`)."""
        out = {"shared": spec_to_dict(self.shared), "quantizer": dict(self.quantizer), "regress": dict(self.regress)}
        if self.loaded:
            out.update(load=self.load, release_sha256=self.release_sha256)
        return out

    def effective_json(self) -> dict[str, Any]:
        """run.json `effective`: the values used, each fallback, the fields without effect and the result-free ones."""
        if self.loaded:
            return {"values": {"subject": "loaded", "release_sha256": self.release_sha256},
                    "resolved": self.release_sha256 is not None, "fallbacks": [],
                    "no_effect": loaded_no_effect_fields(), "result_free": dict(RESULT_FREE_FIELDS)}
        eff = self.used
        return {"values": {k: v for k, v in spec_to_dict(eff).items() if k not in ("fallbacks", "resolved")},
                "resolved": eff.resolved, "fallbacks": list(eff.fallbacks),
                "no_effect": no_effect_fields(self.shared, eff), "result_free": dict(RESULT_FREE_FIELDS)}


SHARED_SECTIONS = tuple(f.name for f in dataclasses.fields(SharedSpec))
_TOP_KEYS = tuple(f.name for f in dataclasses.fields(Suite))


# ----------------------------------------------------------------------------------------------- typed parsing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, value: Any, tp: Any) -> UserError:
    return UserError(f"config key '{key}': {value!r} is not valid; expected {_type_name(tp)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (converting int->float, list->tuple); UserError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _bad(key, value, dict)
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise _bad(key, value, tp)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}': {value!r} is not valid; expected {_type_name(tp)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(key, value, tp)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, value, tp)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, value, tp)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, value, tp)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _bad(key, value, tp)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(key, value, tp)
        return {str(k): (_coerce(v, args[1], f"{key}.{k}") if args else v) for k, v in value.items()}
    raise AssertionError(f"unsupported annotation {tp!r} at {key}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """Construct dataclass `cls` from a dict; unknown keys -> UserError naming the dotted key + did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise UserError(f"unknown config key '{dotted}'{did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        where = f"'{prefix}'" if prefix else "the suite"
        raise UserError(f"config key '{(prefix + '.') if prefix else ''}{missing[0]}' is required in {where}")
    return cls(**kwargs)


def spec_to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: spec_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [spec_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): spec_to_dict(v) for k, v in obj.items()}
    return obj


#: Shared fields that cannot change a result (weights or metric values), left out of the fairness hash, with the
#: reason; tests/test_fairness.py trains and evaluates with each changed and compares bit for bit (CPU, 1 thread).
#: eval.batch_size stays hashed: on GPUs the batch shape picks the convolution algorithm (not bit-identical).
RESULT_FREE_FIELDS: dict[str, str] = {
    "train.checkpoint_every": "checkpoints only; a resumed run continues bit-exactly",
    "train.log_every": "which steps train_log.csv keeps",
    "data.num_workers": "loader processes; every image is a pure function of its index and seed",
    "eval.samples": "how many sample PNGs are saved",
    "eval.require": "turns an unavailable metric into an error; never changes a value",
    "eval.fid_cache_dir": "where real-side FID statistics are cached; the cache is keyed and verified",
    "loss.perceptual_required": "turns missing VGG16 weights into an error; the effective perceptual loss is hashed",
    "eval.keep_features": "keeps the feature files KID / precision-recall wrote; never changes a value",
    "eval.save_recon": "exports reconstructions and originals; never changes a value",
}
#: gan.options keys a pretrained-backbone discriminator resolves into Effective.backbone (hashed by SHA-256 there)
_BACKBONE_OPTIONS = ("weights", "allow_random_backbone")


def no_effect_fields(shared: SharedSpec, effective: Effective) -> dict[str, str]:
    """Fields this run never reads (dotted key → why); they are shown as such and not hashed."""
    out: dict[str, str] = {}
    if effective.discriminator == "none":
        for f in dataclasses.fields(GanSpec):
            if f.name != "discriminator":
                out[f"gan.{f.name}"] = "no discriminator"
        out["loss.adversarial_weight"] = "no discriminator"
    if effective.perceptual == "off":
        why = "perceptual loss off" + (" (fallback)" if shared.loss.perceptual_weight > 0 else "")
        out["loss.perceptual_weight"] = why
        out["loss.perceptual_input_range"] = why
    if shared.train.decay == "none":
        out["train.decay_start"] = out["train.min_lr_ratio"] = "train.decay is none"
    if shared.train.ema_decay == 0:
        out["eval.weights"] = "no EMA (train.ema_decay 0): the raw weights are evaluated"
    return out


def _pop_path(view: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        view = view.get(key)
        if not isinstance(view, dict):
            return
    view.pop(leaf, None)


def fairness_view(shared: SharedSpec, effective: Optional[Effective] = None) -> dict[str, Any]:
    """The JSON-able view of a resolved shared spec that the fairness hash covers (module docstring).

    `effective` None hashes the spec's intent (marked unresolved). `eval.precision` and `eval.lookup` null are
    hashed as the values they mean (the mode's: bf16 / bf16 lookup for gsq-compat, fp32 / exact otherwise).
    `eval.ssim_border` is hashed only when it is not the valid interior (null and `valid` mean the same SSIM; runs
    made before the field existed keep their hash).
    """
    eff = effective if effective is not None else Effective.intent(shared)
    view = spec_to_dict(shared)
    view["eval"]["precision"] = shared.eval.precision_mode  # null means the mode's precision: hash what it means
    view["eval"]["lookup"] = shared.eval.lookup_mode  # null means the mode's lookup: hash what it means
    if shared.eval.ssim_border_mode == "valid":
        view["eval"].pop("ssim_border")
    for key in [*RESULT_FREE_FIELDS, *no_effect_fields(shared, eff)]:
        _pop_path(view, key)
    if eff.backbone is not None:
        for key in _BACKBONE_OPTIONS:
            _pop_path(view, f"gan.options.{key}")
    view["effective"] = eff.hashed()
    return view


def fairness_hash(shared: SharedSpec, effective: Optional[Effective] = None) -> str:
    """SHA-256 of the canonical JSON of `fairness_view` (no quantizer, seed or names)."""
    return _sha256_json(fairness_view(shared, effective))


def _sha256_json(view: dict[str, Any]) -> str:
    canonical = json.dumps(view, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


#: the shared sections a loaded subject never reads: it is evaluated, not trained
_TRAINING_SECTIONS = ("model", "train", "loss", "gan", "data.train")
_LOADED_WHY = "loaded subject: evaluated, not trained"


def loaded_no_effect_fields() -> dict[str, str]:
    """What a loaded subject's run never reads (dotted key → why): every training section, and eval.weights (the
    checkpoint says which weights it holds; the card records them)."""
    return {**{key: _LOADED_WHY for key in _TRAINING_SECTIONS},
            "eval.weights": "loaded subject: the checkpoint holds its own weights (recorded in the card)"}


def loaded_fairness_view(shared: SharedSpec, release_sha256: Optional[str]) -> dict[str, Any]:
    """The fairness view of a loaded subject's run: that it was loaded and from which file (SHA-256), plus the
    evaluation settings (eval, data.eval; the mode's defaults hashed as the values they mean). Nothing of the
    training recipe: it was not trained here. None as the SHA-256 is the unresolved intent (marked so)."""
    full = fairness_view(shared, Effective.intent(shared))
    view = {"eval": full["eval"], "data": {"eval": full["data"]["eval"]}}
    view["eval"].pop("weights", None)
    view["subject"] = {"source": "loaded", "release_sha256": release_sha256}
    if release_sha256 is None:
        view["subject"]["resolved"] = False
    return view


def loaded_fairness_hash(shared: SharedSpec, release_sha256: Optional[str]) -> str:
    return _sha256_json(loaded_fairness_view(shared, release_sha256))


# ----------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001); the value is parsed with YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserError(f"--set {key}: value {raw!r} is not valid YAML ({problem})") from None
    # YAML 1.1 reads "1e-4" as a string; numbers in scientific notation are what users type for LRs
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") and value.strip() else value
        except ValueError:
            pass
    return key, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted `--set` overrides to the raw YAML mapping (shared sections may omit the `shared.` prefix)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts[0] in SHARED_SECTIONS:
            parts = ["shared", *parts]
        if parts[0] == "subjects" and len(parts) > 2:
            target = _subject_by_name(raw, parts[1], key)
            _set_path(target, parts[2:], value, key)
        else:
            _set_path(raw, parts, value, key)
    return raw


def _subject_by_name(raw: dict, name: str, key: str) -> dict:
    subjects = raw.get("subjects") or []
    names = [s.get("name") for s in subjects if isinstance(s, dict)]
    for s in subjects:
        if isinstance(s, dict) and s.get("name") == name:
            return s
    raise UserError(f"--set {key}: no subject named {name!r}{did_you_mean(name, [str(n) for n in names])}")


def _set_path(node: dict, parts: list[str], value: Any, key: str) -> None:
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------- YAML
class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain PyYAML silently keeps the last)."""


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key; SafeLoader reports it itself
            continue
        if first != key_node.start_mark.line:
            raise _DuplicateKey(problem=f"duplicate key {key!r} (first given at line {first + 1})",
                                problem_mark=key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text parsed strictly (safe types, no duplicate keys); errors are one line with the source, line, column
    and the offending line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise UserError(_yaml_error(exc, text, source)) from None


def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if mark is None:
        return f"{source} is not valid YAML: {problem}"
    lines = text.splitlines()
    offending = lines[mark.line].strip() if 0 <= mark.line < len(lines) else "(end of file)"
    if len(offending) > 80:
        offending = offending[:77] + "..."
    return f"{source}, line {mark.line + 1}, column {mark.column + 1}: {problem}: {offending!r}"


# ----------------------------------------------------------------------------------------------- shipped configs
def shipped_configs_dir() -> Optional[Path]:
    """The suites shipped with gsqbench: the copy inside an installed wheel (gsqbench/_configs), else the source
    checkout's top-level `configs/` (recognised by the pyproject.toml beside it)."""
    here = Path(__file__).resolve().parent
    if (here / "_configs").is_dir():
        return here / "_configs"
    root = here.parent
    pyproject = root / "pyproject.toml"
    if (root / "configs").is_dir() and pyproject.is_file() and 'name = "gsqbench"' in pyproject.read_text("utf-8"):
        return root / "configs"
    return None


def shipped_config_names() -> list[str]:
    """Names `run`/`train` accept for the shipped suites from any directory: `demo`, `paper/vae_f8_quantizers`."""
    folder = shipped_configs_dir()
    if folder is None:
        return []
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def resolve_suite_path(name: str | Path) -> Path:
    """A suite argument as a file: an existing path as given, else a shipped config by name (`demo`,
    `demo.yaml` and `configs/demo.yaml` all name configs/demo.yaml, from any directory)."""
    path = Path(name)
    if path.exists():
        return path
    names = shipped_config_names()
    key = str(name).replace("\\", "/").removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    if key in names:
        return shipped_configs_dir() / f"{key}.yaml"  # type: ignore[operator]
    hint = did_you_mean(key, names) if names else ""
    raise UserError(f"suite file '{name}' does not exist and is not the name of a shipped config{hint} "
                    "(`gsqbench list configs` lists them)")


# ----------------------------------------------------------------------------------------------- loading
def load_suite(path: str | Path, overrides: list[str] | None = None) -> Suite:
    """Read a suite YAML (a path, or the name of a shipped config), apply `--set` overrides, type-check everything;
    UserError on any problem, including a file that is not UTF-8, a duplicate key, or a YAML syntax error (with its
    line and column).

    Parsing only: call gsqbench.validate.validate_suite before running it.
    """
    path = resolve_suite_path(path)
    raw = parse_yaml(read_text_utf8(path, "suite file"), f"suite file '{path}'")
    if not isinstance(raw, dict):
        raise UserError(f"suite file '{path}': expected a mapping with keys {', '.join(_TOP_KEYS)}, "
                        f"found {'an empty file' if raw is None else type(raw).__name__}")
    return suite_from_dict(apply_overrides(raw, overrides or []))


def suite_from_dict(raw: dict) -> Suite:
    """Typed Suite from a raw mapping (the YAML document after overrides); UserError naming the key otherwise."""
    for key in raw:
        if key not in _TOP_KEYS:
            raise UserError(f"unknown config key '{key}'{did_you_mean(str(key), _TOP_KEYS)}")
    if "suite" not in raw or not isinstance(raw["suite"], str) or not raw["suite"]:
        raise UserError(f"config key 'suite': {raw.get('suite')!r} is not valid; expected a non-empty name")
    _refuse_eval_options(raw.get("shared"))
    _refuse_removed_keys(raw.get("shared"))
    shared = _coerce(raw.get("shared") or {}, SharedSpec, "shared")
    subjects = _parse_subjects(raw.get("subjects"))
    seeds = _coerce(raw.get("seeds", [0]), tuple[int, ...], "seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"config key 'seeds': {list(seeds)!r} must be a non-empty list of distinct integers")
    grid = _parse_grid(raw.get("grid") or {})
    regress = _coerce(raw.get("regress") or {}, dict[str, Union[float, str]], "regress")
    suite = Suite(suite=raw["suite"], shared=shared, subjects=subjects, seeds=seeds, grid=grid, regress=regress)
    _check_semantics(suite)
    return suite


def _refuse_eval_options(shared: Any) -> None:
    """`shared.eval.options` (a free-form dict in earlier versions) became typed fields of shared.eval."""
    ev = shared.get("eval") if isinstance(shared, dict) else None
    if isinstance(ev, dict) and "options" in ev:
        keys = ", ".join(map(str, ev["options"])) if isinstance(ev["options"], dict) else "its keys"
        raise UserError(f"config key 'shared.eval.options' is no longer used; set {keys} directly under "
                        "'shared.eval' (e.g. shared.eval.lpips_nets)")


def _refuse_removed_keys(shared: Any) -> None:
    """Keys that were hashed but never read: refused with what happens instead, not silently ignored."""
    data = shared.get("data") if isinstance(shared, dict) else None
    if isinstance(data, dict) and "shuffle" in data:
        raise UserError("config key 'shared.data.shuffle' was removed (it was never read): training always draws a "
                        "seeded permutation per epoch; delete the key")


_SUBJECT_KEYS = ("name", "quantizer", "load", "modes")


def _parse_subjects(raw: Any) -> tuple[Subject, ...]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"config key 'subjects': {raw!r} is not valid; expected a non-empty list of "
                        "{name, quantizer: {name, ...}} or {name, load: PATH}")
    subjects, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UserError(f"config key 'subjects[{i}]': {item!r} is not a mapping")
        for key in item:
            _refuse_shared_in_subject(key, item[key])
            if key not in _SUBJECT_KEYS:
                raise UserError(f"unknown config key 'subjects[{i}].{key}'{did_you_mean(str(key), _SUBJECT_KEYS)}")
        name, q = item.get("name"), item.get("quantizer")
        if not isinstance(name, str) or not name:
            raise UserError(f"config key 'subjects[{i}].name': {name!r} is not valid; expected a non-empty string")
        if name in seen:
            raise UserError(f"config key 'subjects[{i}].name': duplicate subject name {name!r}")
        seen.add(name)
        if "load" in item:
            subjects.append(_loaded_subject(i, name, item))
            continue
        if "modes" in item:
            raise UserError(f"config key 'subjects[{i}].modes': only a loaded subject ({{name, load: PATH}}) takes "
                            "extra evaluation modes")
        if not isinstance(q, dict) or not isinstance(q.get("name"), str):
            raise UserError(f"config key 'subjects[{i}].quantizer': {q!r} is not valid; expected {{name: gsq|vq|lfq|fsq, ...}}"
                            " (or give 'load: PATH' to evaluate a checkpoint or published release)")
        subjects.append(Subject(name=name, quantizer=dict(q)))
    return tuple(subjects)


def _loaded_subject(i: int, name: str, item: dict) -> Subject:
    """{name, load: PATH, modes: [...]}: evaluated, not trained; a quantizer block would never be read."""
    if "quantizer" in item:
        raise UserError(f"config key 'subjects[{i}]': give either 'quantizer' (a subject to train) or 'load' (a "
                        "checkpoint to evaluate), not both")
    load = item["load"]
    if not isinstance(load, str) or not load.strip():
        raise UserError(f"config key 'subjects[{i}].load': {load!r} is not valid; expected the path of a published "
                        "release file, an official GSQ release folder or a gsqbench checkpoint")
    modes = _coerce(item.get("modes") or [], tuple[str, ...], f"subjects[{i}].modes")
    for j, mode in enumerate(modes):
        check_mode(mode, f"config key 'subjects[{i}].modes[{j}]'")
    if len(set(modes)) != len(modes):
        raise UserError(f"config key 'subjects[{i}].modes': {list(modes)!r} names a mode twice")
    return Subject(name=name, load=load, modes=modes)


def _refuse_shared_in_subject(key: str, value: Any) -> None:
    """A subject that sets a shared field would break 'identical hyperparameters': name the field."""
    parts = str(key).split(".")
    if parts == ["shared"]:
        raise UserError("subjects may only differ in quantizer; 'shared' belongs at the top level of the suite")
    if parts[0] == "shared":
        parts = parts[1:]
    if parts and parts[0] in SHARED_SECTIONS:
        if len(parts) == 1 and isinstance(value, dict) and value:
            parts.append(sorted(value)[0])
        dotted = ".".join(parts)
        raise UserError(f"subjects may only differ in quantizer; '{dotted}' is shared (set it under 'shared')")


def _parse_grid(raw: Any) -> dict[str, list]:
    if not isinstance(raw, dict):
        raise UserError(f"config key 'grid': {raw!r} is not valid; expected a mapping dotted.key -> list of values")
    grid = {}
    for key, values in raw.items():
        keys = [k.strip() for k in str(key).split(",")]
        if not isinstance(values, list) or not values:
            raise UserError(f"config key 'grid.{key}': {values!r} is not valid; expected a non-empty list")
        for k in keys:
            _check_grid_key(k)
        if len(keys) > 1:
            for v in values:
                if not isinstance(v, list) or len(v) != len(keys):
                    raise UserError(f"config key 'grid.{key}': point {v!r} must be a list of {len(keys)} values")
        grid[str(key)] = list(values)
    return grid


def _check_grid_key(key: str) -> None:
    parts = key.split(".")
    if parts[0] == "quantizer" and len(parts) == 2 and parts[1] != "name":
        return
    if parts[0] == "shared":
        parts = parts[1:]
    if parts and parts[0] in SHARED_SECTIONS and len(parts) >= 2:
        _shared_field_type(parts, f"grid.{key}")
        return
    raise UserError(f"config key 'grid.{key}': expected 'quantizer.<kwarg>' or a shared field such as "
                    f"'model.latent_dim'{did_you_mean(parts[0], [*SHARED_SECTIONS, 'quantizer'])}")


def _shared_field_type(parts: list[str], where: str) -> Any:
    cls: Any = SharedSpec
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise UserError(f"config key '{where}': '{'.'.join(parts[:i])}' has no field '{part}'")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise UserError(f"unknown config key '{where}'{did_you_mean(part, names)}")
        cls = typing.get_type_hints(cls)[part]
    return cls


def _check_semantics(suite: Suite) -> None:
    t = suite.shared.train
    if t.steps < 1:
        raise UserError(f"config key 'shared.train.steps': {t.steps} is not valid; expected >= 1")
    if t.batch_size < 1:
        raise UserError(f"config key 'shared.train.batch_size': {t.batch_size} is not valid; expected >= 1")
    if t.lr <= 0:
        raise UserError(f"config key 'shared.train.lr': {t.lr} is not valid; expected > 0")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"config key 'shared.train.ema_decay': {t.ema_decay} is not valid; expected 0 <= x < 1")
    if t.checkpoint_every < 1:
        raise UserError(f"config key 'shared.train.checkpoint_every': {t.checkpoint_every} is not valid; expected >= 1")
    if suite.shared.data.train.size < 8 or suite.shared.data.eval.size < 8:
        raise UserError("config key 'shared.data.*.size': image size must be >= 8")
    check_mode(suite.shared.eval.mode, "config key 'shared.eval.mode'")
    for i, subject in enumerate(suite.subjects):
        if suite.shared.eval.mode in subject.modes:
            raise UserError(f"config key 'subjects[{i}].modes': {suite.shared.eval.mode!r} is shared.eval.mode "
                            "already (every subject is evaluated in it); list only the extra modes")


# ----------------------------------------------------------------------------------------------- grid expansion
def _grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Cartesian product over grid entries; comma-joined keys move together."""
    if not grid:
        return [{}]
    axes = []
    for key, values in grid.items():
        keys = [k.strip() for k in key.split(",")]
        axes.append([dict(zip(keys, v if len(keys) > 1 else [v])) for v in values])
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


def _apply_shared_grid(shared: SharedSpec, point: dict[str, Any]) -> SharedSpec:
    raw = spec_to_dict(shared)
    for key, value in point.items():
        parts = key.split(".")
        if parts[0] == "quantizer":
            continue
        if parts[0] == "shared":
            parts = parts[1:]
        _set_path(raw, parts, value, f"grid.{key}")
    return _coerce(raw, SharedSpec, "shared")


def _point_label(point: dict[str, Any]) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())


def run_id(subject: str, seed: int, point: dict[str, Any]) -> str:
    """Stable, path-safe run id `<subject>-s<seed>[-<grid point>]`."""
    label = _point_label(point)
    return safe_name(f"{subject}-s{seed}" + (f"-{label}" if label else ""))


def _reaches_loaded(key: str) -> bool:
    """Whether a grid key can change a loaded subject's run (only evaluation settings can)."""
    parts = key.split(".")
    parts = parts[1:] if parts[0] == "shared" else parts
    return parts[0] == "eval" or parts[:2] == ["data", "eval"]


def mode_shared(shared: SharedSpec, mode: str) -> SharedSpec:
    """The shared spec of a loaded subject's extra `mode`: eval.mode replaced, eval.precision and eval.lookup left
    to the mode, and the mode's crop protocol (if it prescribes one) for the evaluation images."""
    crop = get_mode(mode).crop
    data = shared.data if crop is None else dataclasses.replace(
        shared.data, eval=dataclasses.replace(shared.data.eval, crop=crop))
    return dataclasses.replace(shared, data=data, eval=dataclasses.replace(
        shared.eval, mode=mode, precision=None, lookup=None))


def _loaded_runs(suite: Suite, subject: Subject, digest: Optional[Callable[[str], str]]) -> list[RunSpec]:
    """A loaded subject's runs: one per distinct evaluation setting of the grid and per mode (shared.eval.mode,
    then `subject.modes`), with the suite's first seed (its weights do not depend on the seed)."""
    sha = digest(subject.load) if digest is not None else None  # type: ignore[arg-type]
    seed, runs, seen = suite.seeds[0], [], set()
    for point in _grid_points(suite.grid):
        base = _apply_shared_grid(suite.shared, point)
        label = {k: v for k, v in point.items() if _reaches_loaded(k)}
        for mode in (None, *subject.modes):
            shared = base if mode is None else mode_shared(base, mode)
            fhash = loaded_fairness_hash(shared, sha)
            if fhash in seen:
                continue
            seen.add(fhash)
            rid = run_id(subject.name, seed, label) + (f"-{safe_name(mode)}" if mode else "")
            runs.append(RunSpec(run_id=rid, suite=suite.suite, subject=subject.name, seed=seed, grid=dict(label),
                                shared=shared, quantizer={}, fairness_hash=fhash, regress=dict(suite.regress),
                                load=subject.load, release_sha256=sha))
    return runs


def expand_runs(suite: Suite, only: list[str] | None = None,
                resolve: Optional[Callable[[SharedSpec], Effective]] = None,
                digest: Optional[Callable[[str], str]] = None) -> list[RunSpec]:
    """All runs: subjects × seeds × grid points, with resolved shared spec and fairness hash each.

    `resolve` (gsqbench.effective.resolve; what training callers pass, via gsqbench.effective.expand_runs) looks up
    what each shared spec will actually use; without it the hash covers the spec's intent, marked unresolved.
    `digest` (gsqbench.effective.release_sha256) gives a loaded subject's file SHA-256, which its fairness hash
    records (`loaded_fairness_view`); loaded subjects run once per evaluation setting (`_loaded_runs`).
    """
    names = [s.name for s in suite.subjects]
    for name in only or []:
        if name not in names:
            raise UserError(f"--only {name!r}: no such subject{did_you_mean(name, names)}")
    runs = []
    trained = [s for s in suite.subjects if s.load is None and (not only or s.name in only)]
    for point in _grid_points(suite.grid) if trained else []:
        shared = _apply_shared_grid(suite.shared, point)
        eff = resolve(shared) if resolve is not None else None
        fhash = fairness_hash(shared, eff)
        q_over = {k.split(".", 1)[1]: v for k, v in point.items() if k.startswith("quantizer.")}
        for subject in trained:
            for seed in suite.seeds:
                runs.append(RunSpec(
                    run_id=run_id(subject.name, seed, point), suite=suite.suite, subject=subject.name, seed=seed,
                    grid=dict(point), shared=shared, quantizer={**subject.quantizer, **q_over}, fairness_hash=fhash,
                    regress=dict(suite.regress), effective=eff,
                ))
    for subject in suite.subjects:
        if subject.load is not None and (not only or subject.name in only):
            runs += _loaded_runs(suite, subject, digest)
    ids = [r.run_id for r in runs]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise UserError(f"two runs map to the same id {dup!r}; rename the subjects or grid values")
    return runs
