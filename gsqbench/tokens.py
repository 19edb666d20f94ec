"""Token datasets: the token ids of a whole image set as sharded `.npy` files (`gsqbench encode`), and images decoded
back from them (`gsqbench decode`). What a researcher runs before training an autoregressive generator on tokens.

Layout of a token folder:
- `shard-00000.npy`, `shard-00001.npy`, …: int16 (when V ≤ 32,768) or int32 arrays (b, h, w, G) of the codes of
  dataset images [k·S, (k+1)·S) in dataset order (S = `shard_size`);
- `tokens.json`: format, version, the image ids in dataset order, N, S, the batch size, dtype, V, G, the token grid,
  the checkpoint and data it came from, and once complete, every shard's file name, row range and SHA-256.

The model runs as in the evaluation pass in `gsqbench` mode (metrics-protocol.md §1, §9): x = u8/127.5 − 1, eval
mode, fp32 with TF32 off, the exact nearest-code lookup (first index on ties); a shard's images are encoded in
batches [k·S + j·B, …), so with S a multiple of B the batches are those of `gsqbench eval --batch-size B` and
`decode` (`Tokenizer.decode_indices`, then the gsqbench uint8 rule) reproduces eval's reconstructions bit for bit.

Streamed (one shard in memory), resumable (a shard is written atomically once complete; a rerun with the same
settings keeps finished shards, drops half-written temporary files and redoes the rest: byte-identical shards), and
DDP-aware (shard k is encoded by rank k mod world size with the same batches, so any world size gives the same
bytes; rank 0 writes `tokens.json`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from gsqbench import distributed as ddp
from gsqbench.errors import UserError
from gsqbench.io import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

FORMAT, VERSION = "gsqbench-tokens", 1
MANIFEST = "tokens.json"
INT16_MAX_V = 32768  # codes 0 … 32,767 fit int16


@dataclass
class EncodeResult:
    out_dir: Path
    n: int
    shards: int
    encoded: list[int] = field(default_factory=list)  # shard numbers this rank encoded now
    kept: list[int] = field(default_factory=list)  # shard numbers found complete from an earlier run


def token_dtype(codebook_size: int) -> np.dtype:
    """int16 when every code (0 … V−1) fits, else int32."""
    if codebook_size <= INT16_MAX_V:
        return np.dtype(np.int16)
    if codebook_size <= 2**31:
        return np.dtype(np.int32)
    raise UserError(f"codebook size {codebook_size} does not fit int32 token ids")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


@contextlib.contextmanager
def pinned_model(tokenizer: nn.Module) -> Iterator[None]:
    """No grad, eval mode asserted, the exact nearest-code lookup and TF32 off (evaluate.py's gsqbench mode)."""
    from gsqbench.config import EvalSpec
    from gsqbench.evaluate import pinned_model as pinned

    with torch.no_grad(), pinned(tokenizer, EvalSpec().lookup_mode):
        yield


# ---------------------------------------------------------------------------------------------------------------
# encode


def _dataset_ids(dataset: Any) -> list[str]:
    ids = getattr(dataset, "ids", None)
    if ids is not None and len(ids) == len(dataset):
        return [str(i) for i in ids]
    return [str(dataset[i][0]) for i in range(len(dataset))]


def _header(tokenizer: nn.Module, dataset: Any, ids: list[str], shard_size: int, batch_size: int,
            source: Mapping[str, Any]) -> dict:
    quantizer = getattr(tokenizer, "quantizer", None)
    v, g = getattr(quantizer, "codebook_size", None), getattr(quantizer, "groups", None)
    if not isinstance(v, int) or not isinstance(g, int):
        raise UserError("encode: the tokenizer's quantizer declares no integer codebook_size/groups")
    return {"format": FORMAT, "version": VERSION, "n": len(ids), "shard_size": shard_size, "batch_size": batch_size,
            "dtype": token_dtype(v).name, "codebook_size": v, "groups": g, "layout": "(b, h, w, G), dataset order",
            "model_input": "u8/127.5-1 fp32, lookup exact, tf32 off", "source": dict(source),
            "data": _data_fields(dataset), "ids": ids}


def _data_fields(dataset: Any) -> dict:
    from gsqbench.card import dataset_fields

    data = dict(dataset_fields(dataset))
    if "root" in data:  # the same folder however it was spelled on the command line
        data["root"] = str(Path(data["root"]).resolve())
    return data


def _check_resume(out: Path, header: dict) -> Optional[dict]:
    """The existing manifest when it describes the same encoding, None when there is none; else a UserError."""
    path = out / MANIFEST
    if not path.is_file():
        if any(out.glob("shard-*.npy")):
            raise UserError(f"encode --out {out}: holds shard files but no {MANIFEST}; use an empty folder")
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"encode --out {out}: cannot read {MANIFEST} ({exc}); use an empty folder") from None
    differs = sorted(k for k in header if old.get(k) != header[k])
    if differs:
        raise UserError(f"encode --out {out}: holds tokens of another encoding ({', '.join(differs)} differ); "
                        "use another --out or delete the folder to start over")
    return old


def _shard_ok(path: Path, rows: int, dtype: np.dtype) -> bool:
    """A finished shard from an earlier run: loadable, the expected rows and dtype (files are renamed into place
    only once complete, so this catches foreign or damaged files, not half-written ones)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.ndim == 4 and arr.shape[0] == rows and arr.dtype == dtype


def _write_shard(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _encode_rows(tokenizer: nn.Module, dataset: Any, rows: range, batch_size: int, device: torch.device,
                 dtype: np.dtype, num_workers: int) -> np.ndarray:
    from gsqbench.data import to_model_input

    subset = torch.utils.data.Subset(dataset, list(rows))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, drop_last=False,
                                         num_workers=num_workers, collate_fn=_collate)
    parts = []
    for images in loader:
        qout = tokenizer.encode(to_model_input(images.to(device)))
        idx = qout.indices.detach().cpu()
        if idx.ndim != 4:
            raise UserError(f"encode: the quantizer returned indices of shape {tuple(idx.shape)}; "
                            "expected (b, h, w, G)")
        if int(idx.min()) < 0 or int(idx.max()) > np.iinfo(dtype).max:
            raise UserError(f"encode: code {int(idx.max())} does not fit {dtype.name}")
        parts.append(idx.numpy().astype(dtype))
    return np.concatenate(parts)


def _collate(items: list) -> torch.Tensor:
    for image_id, image in items:
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
            raise UserError(f"dataset image '{image_id}': expected uint8 (3, S, S)")
    return torch.stack([im for _, im in items])


def encode_dataset(tokenizer: nn.Module, dataset: Any, out_dir: str | Path, *, batch_size: int = 32,
                   shard_size: int = 1024, device: torch.device | str = "cpu", source: Optional[Mapping] = None,
                   num_workers: int = 0, progress: bool = True) -> EncodeResult:
    """Write the token ids of `dataset` under `out_dir` (see the module docstring); every rank calls this."""
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size:
        raise UserError(f"encode: --shard-size {shard_size} must be a positive multiple of --batch-size {batch_size} "
                        "(so a shard's batches are those of the evaluation pass)")
    device = torch.device(device)
    out = Path(out_dir)
    ids = _dataset_ids(dataset)
    if not ids:
        raise UserError("encode: the dataset has no images")
    header = _header(tokenizer, dataset, ids, shard_size, batch_size, source or {})
    dtype = np.dtype(header["dtype"])
    n_shards = -(-len(ids) // shard_size)
    error = None
    if ddp.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            old = _check_resume(out, header)
            for stale in out.glob(".shard-*.tmp"):  # left by a killed run: never complete, always redone
                stale.unlink()
            if old is None:
                atomic_write_json(out / MANIFEST, {**header, "complete": False})
        except UserError as exc:
            error = str(exc)
    error = ddp.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    result = EncodeResult(out, len(ids), n_shards)
    from tqdm import tqdm

    mine = list(range(ddp.rank(), n_shards, ddp.world_size()))
    bar = tqdm(total=len(mine), unit="shard", desc="encode", disable=None if progress and ddp.is_main() else True)
    with pinned_model(tokenizer):
        for k in mine:
            rows = range(k * shard_size, min((k + 1) * shard_size, len(ids)))
            path = out / shard_name(k)
            if path.is_file() and _shard_ok(path, len(rows), dtype):
                result.kept.append(k)
            else:
                _write_shard(path, _encode_rows(tokenizer, dataset, rows, batch_size, device, dtype, num_workers))
                result.encoded.append(k)
            bar.update(1)
    bar.close()
    ddp.barrier()
    if ddp.is_main():
        _finish_manifest(out, header, n_shards, shard_size)
    ddp.barrier()
    return result


def _finish_manifest(out: Path, header: dict, n_shards: int, shard_size: int) -> None:
    first = np.load(out / shard_name(0), mmap_mode="r", allow_pickle=False)
    shards = [{"file": shard_name(k), "start": k * shard_size, "count": min(shard_size, header["n"] - k * shard_size),
               "sha256": sha256_file(out / shard_name(k))} for k in range(n_shards)]
    atomic_write_json(out / MANIFEST, {**header, "token_grid": list(first.shape[1:3]), "shards": shards,
                                       "complete": True})
    log.info("wrote %d token shards for %d images to %s", n_shards, header["n"], out)


# ---------------------------------------------------------------------------------------------------------------
# decode


def read_manifest(token_dir: str | Path) -> dict:
    """`tokens.json` of a complete token folder, with every shard's SHA-256 verified."""
    root = Path(token_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"decode {root}: cannot read {MANIFEST} ({exc}); expected a folder written by "
                        "gsqbench encode") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise UserError(f"decode {root}: not a complete {FORMAT} folder (rerun gsqbench encode to finish it)")
    for shard in manifest["shards"]:
        path = root / Path(shard["file"]).name
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            raise UserError(f"decode {root}: shard {path.name} is missing or fails its SHA-256 check")
    return manifest


def decode_tokens(tokenizer: nn.Module, token_dir: str | Path, out_dir: str | Path, *,
                  batch_size: Optional[int] = None, device: torch.device | str = "cpu",
                  checkpoint_sha256: Optional[str] = None, progress: bool = True) -> list[str]:
    """Decode every shard to PNGs `out_dir/<id>.png` (id folders mirrored, gsqbench uint8 rule); every rank calls
    this and decodes shards k ≡ rank (mod world). Returns the ids this rank wrote."""
    from gsqbench.evaluate import to_uint8
    from gsqbench.export import encode_png, id_path

    root, out, device = Path(token_dir), Path(out_dir), torch.device(device)
    manifest = read_manifest(root)
    quantizer = getattr(tokenizer, "quantizer", None)
    mismatch = [f"{k} {manifest[k]} vs {getattr(quantizer, k, None)}" for k in ("codebook_size", "groups")
                if manifest[k] != getattr(quantizer, k, None)]
    if mismatch:
        raise UserError(f"decode {root}: tokens do not fit this checkpoint's quantizer ({'; '.join(mismatch)})")
    encoded_with = (manifest.get("source") or {}).get("checkpoint_sha256")
    if checkpoint_sha256 and encoded_with and encoded_with != checkpoint_sha256:
        raise UserError(f"decode {root}: tokens were encoded with checkpoint sha256 {encoded_with[:16]}…, "
                        f"--checkpoint has {checkpoint_sha256[:16]}…; decode with the encoding checkpoint")
    batch = batch_size or int(manifest["batch_size"])
    ids, written = manifest["ids"], []
    with pinned_model(tokenizer):
        for shard in manifest["shards"][ddp.rank()::ddp.world_size()]:
            codes = np.load(root / Path(shard["file"]).name, allow_pickle=False)
            for j in range(0, len(codes), batch):
                idx = torch.from_numpy(codes[j:j + batch].astype(np.int64)).to(device)
                images = to_uint8(tokenizer.decode_indices(idx)).cpu().numpy().transpose(0, 2, 3, 1)
                for image_id, img in zip(ids[shard["start"] + j:], images):
                    atomic_write_bytes(id_path(out, image_id), encode_png(img), durable=False)
                    written.append(image_id)
    ddp.barrier()
    if ddp.is_main():
        atomic_write_json(out / "ids.json", {"ids": ids, "source": str(root), "n": len(ids)})
    return written


# ---------------------------------------------------------------------------------------------------------------
# from a checkpoint (what the CLI calls)


def checkpoint_digest(path: Path) -> Optional[str]:
    """SHA-256 of a checkpoint's weight file (our model.safetensors, an official checkpoint.pt, or a file)."""
    for name in ("model.safetensors", "checkpoint.pt"):
        if (path / name).is_file():
            return sha256_file(path / name)
    return sha256_file(path) if path.is_file() else None


def _spec_hash(meta: Mapping[str, Any]) -> str:
    spec = {"model": meta.get("model_spec"), "quantizer": meta.get("quantizer_spec")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _load(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The tokenizer in eval mode on `device`, and what identifies it (recorded in tokens.json, checked on resume)."""
    from gsqbench.checkpoints import load_tokenizer

    path = Path(checkpoint)
    tok, meta = load_tokenizer(path)
    source = {"checkpoint_sha256": meta.get("checkpoint_sha256") or checkpoint_digest(path),
              "tokenizer_spec_hash": _spec_hash(meta), "step": meta.get("step"),
              "weights": meta.get("weights"), "source": meta.get("source", "gsqbench")}
    return tok.eval().to(device), source


def encode_checkpoint(checkpoint: str | Path, data: Mapping[str, Any], out_dir: str | Path, *,
                      batch_size: int = 32, shard_size: int = 1024, device: Optional[str] = None,
                      num_workers: int = 0, progress: bool = True) -> EncodeResult:
    """Load a checkpoint (ours, an official GSQ release, a published tokenizer) and encode `data`
    (gsqbench.data.build_dataset keyword arguments); under torchrun every rank takes its shards."""
    from gsqbench.data import build_dataset

    distributed = ddp.init_from_env(device or "auto")
    try:
        dev = ddp.resolve_device(device or "auto")
        tok, source = _load(checkpoint, dev)
        dataset = build_dataset(**dict(data))
        return encode_dataset(tok, dataset, out_dir, batch_size=batch_size, shard_size=shard_size, device=dev,
                              source=source, num_workers=num_workers, progress=progress)
    finally:
        if distributed:
            ddp.shutdown()


def decode_checkpoint(token_dir: str | Path, checkpoint: str | Path, out_dir: str | Path, *,
                      batch_size: Optional[int] = None, device: Optional[str] = None,
                      progress: bool = True) -> list[str]:
    distributed = ddp.init_from_env(device or "auto")
    try:
        dev = ddp.resolve_device(device or "auto")
        tok, source = _load(checkpoint, dev)
        return decode_tokens(tok, token_dir, out_dir, batch_size=batch_size, device=dev,
                             checkpoint_sha256=source.get("checkpoint_sha256"), progress=progress)
    finally:
        if distributed:
            ddp.shutdown()
