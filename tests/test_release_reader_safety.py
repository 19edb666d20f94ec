"""Safety of the release reader (gsqbench.importers.lightning), issue 19 "Must show" 2.

Lightning-style checkpoints that pickle a callback class (PL 1.x keys `callbacks` by the callback type) or an
argparse.Namespace load, with those globals read as inert stand-ins; a checkpoint with any other pickled global
is refused with one line before anything is unpickled, and a payload that would create a marker file never runs.
`torch.load` is only ever called with weights_only=True.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

from gsqbench.checkpoints import load_tokenizer
from gsqbench.cli import main
from gsqbench.errors import UserError
from gsqbench.importers.lightning import STAND_INS, InertStandIn, read_checkpoint

CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class MarkerPayload:
    """Unpickling this would run `touch <marker>` (os.system, pickled as posix.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling this would create the marker file through open()."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def weights_only_calls(monkeypatch):
    """Record every torch.load call's weights_only flag."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def lightning_ckpt(path, **extra):
    torch.save({"epoch": 1, "global_step": 7, "pytorch-lightning_version": "1.0.8",
                "state_dict": {"w": torch.ones(2)}, "optimizer_states": [], **extra}, path)
    return path


def test_allow_listed_callback_and_namespace_load_as_inert_stand_ins(tmp_path, monkeypatch, weights_only_calls, fake_global):
    callback = fake_global(CALLBACK)
    early = fake_global("pytorch_lightning.callbacks.early_stopping.EarlyStopping")
    path = lightning_ckpt(tmp_path / "last.ckpt",
                          callbacks={callback: {"best_model_score": torch.tensor(0.25)}, early: {"wait_count": 3}},
                          hyper_parameters=argparse.Namespace(lr=1e-4, name="vq"))
    monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks.model_checkpoint")  # nothing is imported at load
    obj, stand_ins = read_checkpoint(path)
    assert stand_ins == sorted(["argparse.Namespace", CALLBACK,
                                "pytorch_lightning.callbacks.early_stopping.EarlyStopping"])
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    keys = list(obj["callbacks"])
    assert len(keys) == 2 and all(issubclass(k, InertStandIn) for k in keys)  # two types stay two keys
    assert {k.pickled_name for k in keys} == {CALLBACK, "pytorch_lightning.callbacks.early_stopping.EarlyStopping"}
    ns = obj["hyper_parameters"]
    assert isinstance(ns, InertStandIn) and not isinstance(ns, argparse.Namespace)
    assert ns.pickled_state == {"lr": 1e-4, "name": "vq"}
    assert weights_only_calls == [True]


def test_stand_in_list_is_exactly_callbacks_and_namespace():
    names = set(STAND_INS)
    assert "argparse.Namespace" in names
    assert all(n == "argparse.Namespace" or n.split(".callbacks.")[0] in ("pytorch_lightning", "lightning.pytorch")
               for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"Namespace", "ModelCheckpoint", "EarlyStopping"}


@pytest.mark.parametrize("payload,global_name", [(MarkerPayload, "posix.system"), (OpenPayload, "io.open")])
@pytest.mark.parametrize("where", ["top", "inside_namespace", "beside_callback"])
def test_other_pickled_globals_are_refused_with_one_line_and_never_run(tmp_path, monkeypatch, capsys,
                                                                        weights_only_calls, payload, global_name,
                                                                        where, fake_global):
    marker = tmp_path / "payload_ran"
    extra = {"evil": payload(marker)} if where == "top" else \
        {"hyper_parameters": argparse.Namespace(x=payload(marker))} if where == "inside_namespace" else \
        {"callbacks": {fake_global(CALLBACK): {"cb": payload(marker)}}}
    path = lightning_ckpt(tmp_path / "last.ckpt", **extra)
    assert not marker.exists()
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert msg == (f"refusing to load {path}: it contains executable pickle content ({global_name}); only tensor "
                   "checkpoints are accepted")
    assert main(["import", str(path), "--out", str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed == f"gsqbench: error: {msg}" and "weights_only=False" not in printed
    with pytest.raises(UserError, match="refusing to load"):
        load_tokenizer(path)  # what `gsqbench eval FILE` uses
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.json").exists()
    assert weights_only_calls == []  # refused from the static scan: nothing was unpickled at all


def test_a_callback_name_from_another_package_is_not_allow_listed(tmp_path, monkeypatch, fake_global):
    impostor = fake_global("mypkg.callbacks.model_checkpoint.ModelCheckpoint")
    path = lightning_ckpt(tmp_path / "x.ckpt", callbacks={impostor: {}})
    with pytest.raises(UserError, match=r"\(mypkg\.callbacks\.model_checkpoint\.ModelCheckpoint\)"):
        read_checkpoint(path)


def test_legacy_format_is_still_loaded_weights_only(tmp_path, weights_only_calls):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, path, _use_new_zipfile_serialization=False)
    obj, stand_ins = read_checkpoint(path)
    assert stand_ins == [] and torch.equal(obj["model"]["w"], torch.zeros(1))
    marker = tmp_path / "ran"
    torch.save({"x": MarkerPayload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match=r"refusing to load .*\(posix\.system\)"):
        read_checkpoint(path)
    assert not marker.exists() and weights_only_calls == [True, True]


def test_unreadable_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    st = tmp_path / "w.safetensors"
    st.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_checkpoint(st)


def test_error_messages_never_suggest_weights_only_false(tmp_path):
    bad = tmp_path / "odd.pt"
    bad.write_bytes(b"\x80\x02garbage")  # a pickle stream the weights-only unpickler rejects
    with pytest.raises(UserError) as err:
        read_checkpoint(bad)
    assert "not a readable PyTorch checkpoint" in str(err.value) and "weights_only" not in str(err.value)
