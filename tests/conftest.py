"""Shared pytest fixtures."""
from __future__ import annotations

import sys
import types

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models and small convolutions run as fast on one intra-op thread, and far more predictably on a
    busy 2-core machine (OpenMP spin-waiting made two threads up to ~100x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_global(monkeypatch):
    """`fake_global("pkg.mod.Class")`: a class that pickles under that dotted name although the package is not
    installed (e.g. Lightning's ModelCheckpoint), for building release files whose pickles name foreign globals."""

    def make(full_name: str) -> type:
        module_name, _, cls_name = full_name.rpartition(".")
        cls = type(cls_name, (), {"__module__": module_name, "__qualname__": cls_name})
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setattr(sys.modules[module_name], cls_name, cls, raising=False)
        return cls

    return make


@pytest.fixture(autouse=True)
def _isolated_manifests(tmp_path_factory, monkeypatch):
    """Dataset manifests (gsqbench.manifest) go to a per-test folder, never the user's ~/.cache/gsqbench."""
    monkeypatch.setenv("GSQBENCH_MANIFESTS", str(tmp_path_factory.mktemp("manifests")))
