"""`--save-recon` exports and `gsqbench encode` / `decode` token datasets (gsqbench/export.py, gsqbench/tokens.py).

Oracles: reconstructions recomputed here from the checkpoint with numpy's round-half-even (the §1 rule restated)
in the evaluation's batches; the dataset's own images; a run of `encode` that was never interrupted (byte equality of
shards); the single-process run for the 2-process gloo one. A real SIGKILL stops `encode` while a shard is being
written (a subprocess), and the rerun must finish with byte-identical shards.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from gsqbench.cli import main
from gsqbench.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
N, SIZE, BATCH, SHARD = 10, 32, 2, 4
DATA = {"kind": "synthetic", "path": None, "split": "eval", "resolution": SIZE, "crop": None, "n": N, "seed": 0}
CLI_DATA = ["--data", "synthetic", "--split", "eval", "--resolution", str(SIZE), "--n", str(N)]


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    from gsqbench.checkpoints import save_tokenizer
    from gsqbench.models.tokenizer import build_tokenizer

    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))  # no weights: only pixel metrics run
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    torch.manual_seed(0)
    model = {"preset": "tiny-f8", "latent_dim": 8}
    quantizer = {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}
    tok = build_tokenizer(model, quantizer)
    return save_tokenizer(tmp_path / "ckpt", tok, model, quantizer, {"weights": "raw", "step": 3})


def _dataset():
    from gsqbench.data import build_dataset

    return build_dataset(**DATA)


def _oracle_recon(checkpoint) -> dict[str, np.ndarray]:
    """id → uint8 (H, W, 3) reconstruction: the checkpoint run in eval's batches, numpy round-half-even."""
    from gsqbench.checkpoints import load_tokenizer

    tok, _ = load_tokenizer(Path(checkpoint))
    tok.eval()
    ds = _dataset()
    out = {}
    with torch.no_grad():
        for lo in range(0, N, BATCH):
            ids, images = zip(*(ds[i] for i in range(lo, min(lo + BATCH, N))))
            x = torch.stack(images).float() / 127.5 - 1
            x_hat = tok.decode(tok.encode(x).z_q).numpy()
            u8 = np.round((np.clip(x_hat, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
            out.update({i: im.transpose(1, 2, 0) for i, im in zip(ids, u8)})
    return out


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.npy"))}


def test_save_recon_and_encode_decode_equal_eval_reconstructions(checkpoint, tmp_path):
    run = tmp_path / "run"
    base = ["eval", str(checkpoint), *CLI_DATA, "--batch-size", str(BATCH), "--metrics", "pixel", "--samples", "0",
            "--no-progress", "--out"]
    assert main([*base, str(run), "--save-recon", "npz"]) == 0
    ids = json.loads((run / "export" / "ids.json").read_text())["ids"]
    ds = _dataset()
    assert ids == sorted(ds.ids)
    recon = np.load(run / "export" / "recon.npz")["arr_0"]
    real = np.load(run / "export" / "real.npz")["arr_0"]
    assert recon.dtype == np.uint8 and recon.shape == (N, SIZE, SIZE, 3)
    oracle = _oracle_recon(checkpoint)
    for j, image_id in enumerate(ids):
        np.testing.assert_array_equal(recon[j], oracle[image_id], err_msg=image_id)
        np.testing.assert_array_equal(real[j], ds[ds.ids.index(image_id)][1].numpy().transpose(1, 2, 0))
    assert not (run / "export" / ".parts").exists()

    png_run = tmp_path / "png-run"
    assert main([*base, str(png_run), "--save-recon", "png"]) == 0
    for j, image_id in enumerate(ids):
        np.testing.assert_array_equal(np.asarray(Image.open(png_run / "export" / "recon" / f"{image_id}.png")),
                                      recon[j])
        np.testing.assert_array_equal(np.asarray(Image.open(png_run / "export" / "real" / f"{image_id}.png")),
                                      real[j])

    tokens, decoded = tmp_path / "tokens", tmp_path / "decoded"
    assert main(["encode", str(checkpoint), *CLI_DATA, "--batch-size", str(BATCH), "--shard-size", str(SHARD),
                 "--out", str(tokens), "--no-progress"]) == 0
    manifest = json.loads((tokens / "tokens.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "int16" and manifest["ids"] == ds.ids
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    shard = np.load(tokens / "shard-00000.npy")
    assert shard.dtype == np.int16 and shard.shape == (4, 4, 4, 2)  # (b, h, w, G) at 32 px / f8, 2 groups
    assert main(["decode", str(tokens), "--checkpoint", str(checkpoint), "--out", str(decoded),
                 "--no-progress"]) == 0
    for j, image_id in enumerate(ids):  # bit for bit the evaluation's reconstructions
        np.testing.assert_array_equal(np.asarray(Image.open(decoded / f"{image_id}.png")), recon[j], err_msg=image_id)

    assert main([*base, str(tmp_path / "bad"), "--save-recon", "jpg"]) == 2
    other = tmp_path / "ckpt2"
    from gsqbench.checkpoints import load_tokenizer, save_tokenizer

    tok, meta = load_tokenizer(Path(checkpoint))
    with torch.no_grad():
        next(tok.decoder.parameters()).add_(0.1)
    save_tokenizer(other, tok, meta["model_spec"], meta["quantizer_spec"], {"weights": "raw"})
    assert main(["decode", str(tokens), "--checkpoint", str(other), "--out", str(tmp_path / "d2"),
                 "--no-progress"]) == 2  # tokens of another checkpoint


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from gsqbench import tokens
    from gsqbench.cli import main
    original, calls = tokens._write_shard, []

    def write_then_die(path, array):
        calls.append(path)
        if len(calls) == 2:  # shard 1: a half-written temporary file, then SIGKILL
            (path.parent / f".{path.name}.abc123.tmp").write_bytes(b"\\x93NUMPY half")
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, array)

    tokens._write_shard = write_then_die
    sys.exit(main(sys.argv[1:]))
""")


def test_encode_killed_then_resumed_gives_identical_shards(checkpoint, tmp_path):
    args = ["encode", str(checkpoint), *CLI_DATA, "--batch-size", str(BATCH), "--shard-size", str(SHARD),
            "--no-progress", "--device", "cpu", "--out"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLER, *args, str(killed)], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list(_shards(killed)) == ["shard-00000.npy"] and list(killed.glob(".shard-*.tmp"))
    assert not json.loads((killed / "tokens.json").read_text())["complete"]

    assert main([*args, str(killed)]) == 0  # the same command again resumes
    clean = tmp_path / "clean"
    assert main([*args, str(clean)]) == 0
    assert _shards(killed) == _shards(clean) and len(_shards(clean)) == 3
    assert not list(killed.glob(".shard-*.tmp"))
    assert json.loads((killed / "tokens.json").read_text()) == json.loads((clean / "tokens.json").read_text())
    assert main([*args[:-3], "--shard-size", "6", "--no-progress", "--out", str(clean)]) == 2  # other settings
    with pytest.raises(UserError, match="multiple"):
        from gsqbench.tokens import encode_dataset

        encode_dataset(torch.nn.Identity(), _dataset(), tmp_path / "x", batch_size=4, shard_size=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode_and_export(checkpoint: str, root: str) -> None:
    """Encode the tokens and run an evaluation with the npz export and KID's kept float16 features: what each rank
    (or the single process) does."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from gsqbench import distributed as ddp
    from gsqbench.checkpoints import load_tokenizer
    from gsqbench.evaluate import EvalSettings, evaluate
    from gsqbench.tokens import encode_dataset

    tok, _ = load_tokenizer(Path(checkpoint))
    tok.eval()
    encode_dataset(tok, _dataset(), Path(root) / "tokens", batch_size=BATCH, shard_size=SHARD, progress=False)
    # batches of one image: conv kernels are not bitwise batch-size independent, and the ranks' shards (5 + 5
    # images) split eval's batches differently from one process
    settings = EvalSettings(metrics=("pixel", "kid"), require=("kid@inception",), batch_size=1, samples=0,
                            save_recon="npz", keep_features=True, progress=False)
    size = FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
    FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = 75  # the smallest the stem takes: CPU budget
    try:
        result = evaluate(tok, _dataset(), settings, device="cpu", out_dir=Path(root) / "run")
    finally:
        FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = size
    if ddp.is_main():
        (Path(root) / "kid.json").write_text(json.dumps(result.value("kid@inception")))


def _worker(rank: int, port: int, env: dict, checkpoint: str, root: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", **env})
    torch.set_num_threads(1)
    from gsqbench import distributed as ddp

    assert ddp.init_from_env("cpu", timeout_s=120) and ddp.world_size() == 2
    try:
        _encode_and_export(checkpoint, root)
    finally:
        ddp.shutdown()


@pytest.mark.slow
def test_two_process_gloo_encode_and_export_equal_one_process(checkpoint, tmp_path, monkeypatch):
    from random_weights import inception_file, manifest

    weights = {"inception-fid": inception_file(tmp_path / "weights-inception-2015-12-05-6726825d.pth")}
    env = {"GSQBENCH_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"),
           "GSQBENCH_WEIGHTS_MANIFEST": manifest(weights)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from gsqbench import weights as manager

    manager.import_file(weights["inception-fid"], "inception-fid")
    _encode_and_export(str(checkpoint), str(tmp_path / "one"))
    mp.start_processes(_worker, args=(_free_port(), env, str(checkpoint), str(tmp_path / "two")),
                       nprocs=2, join=True, start_method="spawn")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _shards(two / "tokens") == _shards(one / "tokens") and len(_shards(one / "tokens")) == 3
    assert json.loads((two / "tokens" / "tokens.json").read_text()) == \
        json.loads((one / "tokens" / "tokens.json").read_text())
    for side in ("recon", "real"):  # rank shards assembled by rank 0 in id order
        np.testing.assert_array_equal(np.load(two / "run" / "export" / f"{side}.npz")["arr_0"],
                                      np.load(one / "run" / "export" / f"{side}.npz")["arr_0"])
    assert (two / "run" / "export" / "ids.json").read_text() == (one / "run" / "export" / "ids.json").read_text()
    # KID: each rank's float16 feature chunks assembled by rank 0 in id order, computed there, broadcast
    kept = Path("features") / "kid_inception"
    for name in ("real.npy", "fake.npy", "ids.json"):
        assert (two / "run" / kept / name).read_bytes() == (one / "run" / kept / name).read_bytes(), name
    assert json.loads((two / "kid.json").read_text()) == json.loads((one / "kid.json").read_text())
