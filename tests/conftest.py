"""Shared pytest fixtures."""
from __future__ import annotations

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


@pytest.fixture(autouse=True)
def _isolated_manifests(tmp_path_factory, monkeypatch):
    """Dataset manifests (gsqbench.manifest) go to a per-test folder, never the user's ~/.cache/gsqbench."""
    monkeypatch.setenv("GSQBENCH_MANIFESTS", str(tmp_path_factory.mktemp("manifests")))
