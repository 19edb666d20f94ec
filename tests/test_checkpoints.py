"""Tests of gsqbench's own checkpoint format and training state: bit-exact round trip, refusal of other
architectures, corrupted files, and pickle payloads that must never run."""
from __future__ import annotations

import json

import pytest
import torch

from gsqbench.checkpoints import load_tokenizer, load_train_state, save_tokenizer, save_train_state
from gsqbench.errors import UserError
from gsqbench.models.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


MODEL = {"preset": "tiny-f8", "latent_dim": 8}
QUANT = {"name": "gsq", "dim": 8, "codebook_size": 32, "groups": 4}


class _Payload:
    """Unpickling this would create `path`: proves whether a loader executed pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tok = build_tokenizer(MODEL, QUANT).eval()
    save_tokenizer(tmp_path / "ckpt", tok, MODEL, QUANT, {"run": "unit", "step": 3})
    return tok, tmp_path / "ckpt"


def test_round_trip_is_bit_exact(saved):
    tok, path = saved
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loaded, meta = load_tokenizer(path)
    assert not loaded.training
    with torch.no_grad():
        a, qa = tok(x)
        b, qb = loaded(x)
    assert torch.equal(a, b) and torch.equal(qa.indices, qb.indices)
    for k, v in tok.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert meta["run"] == "unit" and meta["step"] == 3
    assert meta["quantizer_spec"] == QUANT
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]
    spec = json.loads((path / "model.json").read_text())
    assert spec["format"] == "gsqbench-tokenizer" and spec["version"] == 1
    assert spec["model"]["preset"] == "tiny-f8" and spec["model"]["hidden_channels"] == 32
    # a path to a file inside the directory is accepted as well
    again, _ = load_tokenizer(path / "model.safetensors")
    assert torch.equal(again.decoder.conv_in.weight, tok.decoder.conv_in.weight)


def test_different_architecture_is_refused_with_key_listing(saved):
    _, path = saved
    spec = json.loads((path / "model.json").read_text())
    spec["model"] = {"preset": "tiny-f4", "embedding_dim": 8}
    (path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(UserError) as err:
        load_tokenizer(path)
    msg = str(err.value)
    assert "do not fit the model architecture" in msg and "\n" not in msg
    assert "unexpected keys: decoder.blocks." in msg or "missing keys:" in msg


def test_shape_mismatch_is_listed(saved):
    _, path = saved
    spec = json.loads((path / "model.json").read_text())
    spec["quantizer"]["codebook_size"] = 64
    (path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"shape mismatches: quantizers\.codebook\.weight checkpoint \(32, 2\) vs model \(64, 2\)"):
        load_tokenizer(path)


def test_corrupted_weights_and_json_are_user_errors(saved, tmp_path):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="sha256 differs"):
        load_tokenizer(path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_tokenizer(path)
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_train_state_round_trip_and_type_check(tmp_path):
    torch.manual_seed(0)
    # the layout of an optimizer state_dict (int keys, tensors, nested lists) without paying torch.optim's import
    optim_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                   "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]}
    state = {"step": 7, "optimizer": optim_state, "rng": torch.get_rng_state(), "note": "x", "lr": [1e-3], "ok": None}
    path = save_train_state(tmp_path / "train_state.pt", state)
    # must load under the strict unpickler on its own, not only through our function
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7
    back = load_train_state(path)
    assert torch.equal(back["rng"], state["rng"])
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], optim_state["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    with pytest.raises(TypeError, match="Linear is not allowed"):
        save_train_state(tmp_path / "bad.pt", {"model": torch.nn.Linear(3, 2)})
    assert not (tmp_path / "bad.pt").exists()


def test_train_state_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(UserError, match=r"refusing to load .*evil\.pt: it contains executable pickle content "
                                         r"\(io\.open\); only tensor checkpoints are accepted$") as err:
        load_train_state(tmp_path / "evil.pt")
    assert "weights_only" not in str(err.value)
    assert not marker.exists()
