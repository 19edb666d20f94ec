"""Importer for the official GSQ releases (gsq-reference.md §4, HelmholtzAI-FZJ/flex_gen `basic_tokenizer.py`).

A release folder holds `checkpoint.pt` (`{"model_state_dict": ..., "config": pickle bytes}`) and `config.yaml`.
The checkpoint is read with `torch.load(weights_only=True)` only, and the pickled `config` bytes are never
unpickled: the model is built from `config.yaml`, anything missing there is inferred from tensor shapes (§4.4), and
the quantizer flags that shapes cannot tell (`use_l2_norm`, `use_uniform_init`, `force_1d_clip`,
`commitment_loss_weight`) must come from `config.yaml` or be given explicitly. The load is strict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from gsqbench.checkpoints import (
    MODEL_JSON, OFFICIAL_CHECKPOINT, OFFICIAL_CONFIG, load_state_strict, save_tokenizer, short_list,
    state_dict_mismatch,
)
from gsqbench.tensorfile import torch_load_tensors
from gsqbench.errors import UserError, did_you_mean
from gsqbench.io import sha256_file
from gsqbench.models.autoencoder import AutoencoderConfig, Decoder, Encoder
from gsqbench.models.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


# Quantizer flags the weights cannot tell, and the values our `gsq` quantizer accepts for them.
OFFICIAL_FLAG_CHOICES: dict[str, tuple[str, ...]] = {"norm": ("l2", "l1", "none", "clip"), "init": ("spherical", "uniform")}
REQUIRED_FLAGS = ("norm", "init", "commitment_weight")
_OFFICIAL_TYPES = ("vq", "gvq", "gsq")
_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderConfig))
_NOT_FROM_SHAPES = ("dropout_probability", "quantizer_aux_loss_weight")  # inference-irrelevant: class defaults
# training-only options of the official quantizers: recorded, never needed to evaluate
_TRAINING_ONLY = ("lambda_entropy_loss", "lambda_tcr_loss", "entropy_loss_type", "entropy_temperature",
                  "norm_distirbution_radius", "argmin_func", "argmin_softmax_tau")


@dataclasses.dataclass
class OfficialRelease:
    """An official folder read without building anything: our specs, the raw state dict, provenance."""

    model: dict[str, Any]
    quantizer: dict[str, Any]
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]


def _read_official_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of FlexTokenizer kwargs, got {type(data).__name__}")
    if "quantizer_config" in data and not isinstance(data["quantizer_config"], dict):
        raise UserError(f"{path}: quantizer_config must be a mapping, got {data['quantizer_config']!r}")
    return data


def _read_official_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    obj = torch_load_tensors(path)
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and "model_state_dict" in obj:
        state = obj["model_state_dict"]
        if isinstance(obj.get("config"), (bytes, bytearray)):
            # kept as opaque bytes on purpose: unpickling them could run code (spec §4.2)
            info["pickled_config_sha256"] = hashlib.sha256(obj["config"]).hexdigest()
    else:
        state = obj
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected {{'model_state_dict': {{name: tensor}}, 'config': bytes}} "
                        "(official GSQ layout) or a plain state dict")
    return dict(state), info


def _blocks(state: Mapping[str, Tensor], prefix: str) -> list[dict[str, Tensor]]:
    """`prefix.blocks.{i}.rest` keys grouped per block index, in index order."""
    found: dict[int, dict[str, Tensor]] = {}
    pat = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        m = pat.match(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if sorted(found) != list(range(len(found))):
        raise UserError(f"checkpoint: {prefix}.blocks indices {sorted(found)} are not contiguous from 0")
    return [found[i] for i in range(len(found))]


def _kind(block: Mapping[str, Tensor], where: str) -> tuple[str, int]:
    """(kind, channels) of one block from its parameter names and shapes."""
    if "net.2.weight" in block:
        return ("T" if block["net.0.weight"].shape[0] != block["net.2.weight"].shape[0] else "R",
                int(block["net.2.weight"].shape[0]))
    if "qkv_conv.weight" in block:
        return "A", int(block["proj_conv.weight"].shape[0])
    if "gamma.weight" in block:
        return "N", int(block["gamma.weight"].shape[0])
    if "conv.weight" in block:
        w = block["conv.weight"]
        return ("D2S" if w.shape[0] == 4 * w.shape[1] else "S"), int(w.shape[1])
    raise UserError(f"checkpoint: {where} has unrecognised parameters {sorted(block)[:4]}")


def _segments(kinds: list[tuple[str, int]], split: set[str]) -> list[list[tuple[str, int]]]:
    """Split the block sequence after each resampling block."""
    out: list[list[tuple[str, int]]] = [[]]
    for k in kinds:
        out[-1].append(k)
        if k[0] in split:
            out.append([])
    return out


def _get(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise UserError(f"checkpoint: key '{key}' not found; not a FlexTokenizer state dict (keys: "
                        f"{short_list(sorted(state))})")
    return state[key]


def infer_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """FlexTokenizer kwargs recovered from tensor names and shapes (spec §4.4), verified by a meta-device build.

    Where shapes cannot separate a stage's last ResBlocks from the middle blocks, every split consistent
    with the weights gives the same module sequence and therefore the same function; the first one found wins.
    """
    conv_in = _get(state, "encoder.conv_in.weight")
    hidden = int(conv_in.shape[0])
    res_kernel = [int(v.shape[-1]) for k, v in state.items() if k.startswith("encoder.blocks.") and k.endswith("net.2.weight")]
    base = {
        "input_channels": int(conv_in.shape[1]),
        "hidden_channels": hidden,
        "input_conv_kernel_size": int(conv_in.shape[-1]),
        "embedding_dim": int(_get(state, "encoder.fianl_layers.2.weight").shape[0]),
        "output_conv_kernel_size": int(_get(state, "decoder.final_layers.2.weight").shape[-1]),
        "residual_conv_kernel_size": res_kernel[0] if res_kernel else int(_get(state, "decoder.conv_in.weight").shape[-1]),
    }
    enc = [_kind(b, f"encoder.blocks.{i}") for i, b in enumerate(_blocks(state, "encoder"))]
    dec = [_kind(b, f"decoder.blocks.{i}") for i, b in enumerate(_blocks(state, "decoder"))]
    enc_segs = _segments(enc, {"S"})
    dec_segs = _segments(dec, {"D2S", "S"})
    last_ch = int(_get(state, "encoder.fianl_layers.0.weight").shape[0])
    stage_ch = [next(c for k, c in seg if k == "S") for seg in enc_segs[:-1]] + [last_ch]
    if any(c % hidden for c in stage_ch):
        raise UserError(f"checkpoint: stage widths {stage_ch} are not multiples of hidden width {hidden}")
    n_stages = len(stage_ch)
    if len(dec_segs) != n_stages:
        raise UserError(f"checkpoint: encoder has {n_stages} stages but decoder {len(dec_segs)}")
    base["channel_multipliers"] = [c // hidden for c in stage_ch]
    base["use_adaptive_norm"] = any(k == "N" for k, _ in dec)
    base["use_learnable_up_down_sample"] = any(k == "D2S" for k, _ in dec)
    enc_counts = [sum(k == "R" for k, _ in seg) for seg in enc_segs]
    dec_counts = [sum(k == "R" for k, _ in seg) for seg in dec_segs]  # reversed stage order
    attn_res = sorted({2 ** i for i, seg in enumerate(enc_segs[:-1]) if any(k == "A" for k, _ in seg)})
    has_attn = any(k == "A" for k, _ in enc + dec)
    known_dec_mid = None
    if base["use_adaptive_norm"]:
        first = dec_segs[0]
        known_dec_mid = sum(k == "R" for k, _ in first[: next(i for i, (k, _) in enumerate(first) if k == "N")])
    for cand in _candidates(base, enc_counts, dec_counts, attn_res, has_attn, known_dec_mid, n_stages):
        if _fits(cand, state):
            return cand
    raise UserError("checkpoint: could not infer the FlexTokenizer architecture from tensor shapes; "
                    f"put the release's {OFFICIAL_CONFIG} next to {OFFICIAL_CHECKPOINT}")


def _candidates(
    base: dict[str, Any], enc_counts: list[int], dec_counts: list[int], attn_res: list[int], has_attn: bool,
    known_dec_mid: int | None, n_stages: int,
) -> Iterator[dict[str, Any]]:
    """Plausible kwargs in order of preference (released layout first).

    enc_counts: same-width ResBlocks per encoder stage (last = last stage + middle blocks); dec_counts: the
    same per decoder stage in decoder order (first = middle blocks + first stage).
    """
    def order(total: int, prefer: int | None) -> list[int]:
        first = [v for v in (prefer, 2, total // 2) if v is not None and 0 <= v <= total]
        return list(dict.fromkeys(first + list(range(total + 1))))

    last_factor = 2 ** (n_stages - 1)
    attn_options = [(False, attn_res)] if not has_attn else [
        (mid, res) for mid in (False, True) for res in (attn_res, sorted(set(attn_res) | {last_factor}))
    ]
    dec_mid_choices = [known_dec_mid] if known_dec_mid is not None else None
    for mid_attn, res in attn_options:
        for enc_mid in order(enc_counts[-1], known_dec_mid):
            for dec_mid in dec_mid_choices or order(dec_counts[0], enc_mid):
                if dec_mid > dec_counts[0]:
                    continue
                dec_stages = dec_counts[::-1]  # back to encoder stage order
                dec_stages[-1] = dec_counts[0] - dec_mid
                yield {
                    **base, "mid_block_attn": mid_attn, "attention_resolutions": list(res),
                    "encoder_layer_configs": enc_counts[:-1] + [enc_counts[-1] - enc_mid, enc_mid],
                    "decoder_layer_configs": dec_stages + [dec_mid],
                }


def _fits(kwargs: Mapping[str, Any], state: Mapping[str, Tensor]) -> bool:
    try:
        cfg = AutoencoderConfig.from_dict(kwargs)
    except UserError:
        return False
    with torch.device("meta"):
        enc, dec = Encoder(cfg), Decoder(cfg)
    expected = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    expected.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    given = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    return state_dict_mismatch(expected, given) is None


def _official_architecture(state: Mapping[str, Tensor], yaml_cfg: Mapping[str, Any] | None) -> tuple[dict, list[str]]:
    given = {k: v for k, v in (yaml_cfg or {}).items() if k in _ARCH_FIELDS}
    ignored = sorted(k for k in (yaml_cfg or {}) if k not in _ARCH_FIELDS and k not in ("name", "quantizer_config"))
    if ignored:
        log.warning("%s: ignoring keys %s (not FlexTokenizer kwargs)", OFFICIAL_CONFIG, ", ".join(ignored))
    missing = [k for k in _ARCH_FIELDS if k not in given and k not in _NOT_FROM_SHAPES]
    inferred: dict[str, Any] = {}
    if missing:
        shapes = infer_architecture(state)
        inferred = {k: shapes[k] for k in missing}
    cfg = AutoencoderConfig.from_dict({**inferred, **given}, where=OFFICIAL_CONFIG)
    return cfg.to_dict(), sorted(inferred)


def _flags_from_yaml(qcfg: Mapping[str, Any], qtype: str, d: int) -> dict[str, Any]:
    """Our quantizer flags from an official quantizer_config, missing keys taking the official class defaults."""
    uniform = bool(qcfg.get("use_uniform_init", qtype == "vq"))  # `vq` class default True, `gvq`/`gsq` False
    l1, l2 = bool(qcfg.get("use_l1_norm", False)), bool(qcfg.get("use_l2_norm", False))
    clip = qtype != "vq" and bool(qcfg.get("force_1d_clip", False)) and uniform and d == 1
    norm = "l1" if l1 else "l2" if l2 else "clip" if clip else "none"  # upstream precedence: l1 > l2 > clip
    return {"norm": norm, "init": "uniform" if uniform else "spherical",
            "commitment_weight": float(qcfg.get("commitment_loss_weight", 0.25))}


def _check_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        if key in OFFICIAL_FLAG_CHOICES and value not in OFFICIAL_FLAG_CHOICES[key]:
            raise UserError(f"--{key}: {value!r} is not valid{did_you_mean(str(value), OFFICIAL_FLAG_CHOICES[key])}")
        if key == "commitment_weight" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UserError(f"--commitment-weight: {value!r} must be a non-negative number")
        if key not in (*REQUIRED_FLAGS, "lookup_precision"):
            raise UserError(f"official flags: unknown key {key!r}{did_you_mean(key, [*REQUIRED_FLAGS, 'lookup_precision'])}")
        out[key] = value
    return out


def _official_quantizer(
    state: Mapping[str, Tensor], yaml_cfg: Mapping[str, Any] | None, dim: int, flags: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our `gsq` quantizer spec for an official vq/gvq/gsq quantizer, plus notes for the provenance meta."""
    codebook = _get(state, "quantizers.codebook.weight")
    if codebook.ndim != 2:
        raise UserError(f"checkpoint: quantizers.codebook.weight has shape {tuple(codebook.shape)}, expected (V, d)")
    V, d = (int(s) for s in codebook.shape)
    qcfg = dict((yaml_cfg or {}).get("quantizer_config") or {})
    qtype = str(qcfg.get("quantize_type", "vq" if d == dim else "gvq")).lower()
    if qtype not in _OFFICIAL_TYPES:
        raise UserError(f"{OFFICIAL_CONFIG}: quantize_type '{qtype}' is not supported; supported: "
                        f"{', '.join(_OFFICIAL_TYPES)} (the GSQ family)")
    embed_dim = int(qcfg.get("embed_dim", dim))
    if embed_dim != dim:
        raise UserError(f"{OFFICIAL_CONFIG}: quantizer_config.embed_dim {embed_dim} differs from embedding_dim {dim}")
    if qtype == "vq" and "num_group" in qcfg and int(qcfg["num_group"]) != 1:
        raise UserError(f"{OFFICIAL_CONFIG}: num_group {qcfg['num_group']} is not valid for quantize_type vq (use gvq)")
    groups = int(qcfg.get("num_group", 1 if qtype == "vq" else max(1, dim // d)))
    flags = _check_flags(flags)
    if qcfg:
        derived = _flags_from_yaml(qcfg, qtype, dim // groups)
        for key, value in flags.items():
            if key in derived and value != derived[key]:
                raise UserError(f"--{key.replace('_', '-')} {value!r} conflicts with {OFFICIAL_CONFIG} (which gives "
                                f"{derived[key]!r}); drop the option")
        chosen, source = {**derived, **flags}, OFFICIAL_CONFIG
    else:
        absent = [k for k in REQUIRED_FLAGS if k not in flags]
        if absent:
            raise UserError(
                f"{OFFICIAL_CONFIG}: missing, and the weights cannot tell {', '.join(absent)}; put the release's "
                f"{OFFICIAL_CONFIG} next to {OFFICIAL_CHECKPOINT} or pass e.g. --norm l2 --init spherical "
                "--commitment-weight 0.25 (released GSQ models; see the repo name: -no_l2 means --norm none)"
            )
        chosen, source = dict(flags), "command line"
    spec = {"name": "gsq", "dim": dim, "codebook_size": int(qcfg.get("num_embed", V)), "groups": groups, **chosen}
    notes = {"official_quantize_type": qtype, "quantizer_flags_from": source,
             "ignored_training_options": {k: qcfg[k] for k in _TRAINING_ONLY if k in qcfg}}
    if qtype == "gsq":
        notes["tie_breaking"] = "deterministic first-index argmin (official gsq class defaults to random ties)"
    return spec, notes


def read_official(folder: str | Path, flags: Mapping[str, Any] | None = None) -> OfficialRelease:
    """Read an official release folder into our model/quantizer specs (no model is built, no pickle runs)."""
    folder = Path(folder)
    if folder.is_file() and folder.name in (OFFICIAL_CHECKPOINT, OFFICIAL_CONFIG):
        folder = folder.parent
    ckpt = folder / OFFICIAL_CHECKPOINT
    if not ckpt.is_file():
        raise UserError(f"{folder}: no {OFFICIAL_CHECKPOINT} (an official GSQ release folder has "
                        f"{OFFICIAL_CHECKPOINT} and {OFFICIAL_CONFIG})")
    yaml_cfg = _read_official_yaml(folder / OFFICIAL_CONFIG)
    state, info = _read_official_state(ckpt)
    model, inferred = _official_architecture(state, yaml_cfg)
    quantizer, notes = _official_quantizer(state, yaml_cfg, model["embedding_dim"], flags or {})
    meta = {
        "source": "official-gsq",
        "official_path": str(folder.resolve()),
        "checkpoint_sha256": sha256_file(ckpt),
        "official_config": yaml_cfg,
        "official_name": folder.resolve().name,  # the release repo name, e.g. GSQ-F16-D16-G8-V256k
        "official_model_class": (yaml_cfg or {}).get("name"),
        "inferred_from_shapes": inferred,
        **info,
        **notes,
        "model_spec": model,
        "quantizer_spec": quantizer,
    }
    return OfficialRelease(model=model, quantizer=quantizer, state_dict=state, meta=meta)


def import_official(
    folder: str | Path, out: str | Path, flags: Mapping[str, Any] | None = None, *, overwrite: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Strict-load an official release and write it in our format; returns (out dir, meta)."""
    out = Path(out)
    if (out / MODEL_JSON).exists() and not overwrite:
        raise UserError(f"--out {out}: already holds a checkpoint; choose another directory or pass --force")
    release = read_official(folder, flags)
    tok = build_tokenizer(release.model, release.quantizer)
    load_state_strict(tok, release.state_dict, str(Path(release.meta["official_path"]) / OFFICIAL_CHECKPOINT))
    save_tokenizer(out, tok, release.model, release.quantizer, release.meta)
    return out, release.meta
