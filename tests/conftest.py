"""Shared pytest fixtures, the `--device` option and the `cuda` marker.

`--device DEV` (default cpu, or $GSQBENCH_TEST_DEVICE) runs the device-parametrisable tests (quantizer contract,
exact-lookup ground truth, resume after kill) on DEV through the `device` fixture; `benchmarks/gpu.py` passes
`--device cuda`. Tests marked `cuda` need a CUDA GPU: they are skipped, with the reason, where
torch.cuda.is_available() is False. `--cuda-dry-run` runs them on the CPU instead (gloo for NCCL, CPU autocast,
small sizes), so their code is exercised where no GPU is (`benchmarks/gpu.py --device cpu --tiny` does this in CI).
"""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

NO_CUDA_REASON = ("needs CUDA: torch.cuda.is_available() is False on this machine "
                  "(benchmarks/gpu.py runs these tests on a GPU)")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("GSQBENCH_TEST_DEVICE", "cpu"),
                     help="torch device of the device-parametrisable tests: cpu (default), cuda, cuda:N")
    parser.addoption("--cuda-dry-run", action="store_true",
                     help="run the tests marked `cuda` on the CPU (gloo instead of NCCL, small sizes) to prove "
                          "their code runs where no GPU is")


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--device")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {device}: torch.cuda.is_available() is False on this machine")
        # deterministic cuBLAS for the bitwise resume comparison; read when the first cuBLAS handle is made
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device != "cpu":
        raise pytest.UsageError(f"--device {device!r} is not valid; expected cpu, cuda or cuda:N")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() or config.getoption("--cuda-dry-run"):
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The torch device named by `--device` (cpu unless a GPU run asks for cuda)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def cuda_device(request: pytest.FixtureRequest) -> torch.device:
    """The device of the tests marked `cuda`: `--device` when it names a GPU, else cuda; cpu under --cuda-dry-run
    on a machine without CUDA (those tests are skipped otherwise)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    chosen = request.config.getoption("--device")
    return torch.device(chosen if chosen.startswith("cuda") else "cuda")


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


@pytest.fixture
def random_alexnet(tmp_path, monkeypatch):
    """A random-init AlexNet trunk saved under the official file name and installed through the weight manager (a
    manifest override with its SHA-256: non-conformant by design); returns the trunk's state dict."""
    import hashlib
    import json

    import torchvision

    from gsqbench import weights

    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    trunk = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(trunk, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("GSQBENCH_WEIGHTS_MANIFEST", json.dumps({"alexnet": {"filename": path.name, "sha256": sha}}))
    weights.import_file(path, "alexnet")
    return trunk


@pytest.fixture(autouse=True)
def _isolated_manifests(tmp_path_factory, monkeypatch):
    """Dataset manifests (gsqbench.manifest) go to a per-test folder, never the user's ~/.cache/gsqbench."""
    monkeypatch.setenv("GSQBENCH_MANIFESTS", str(tmp_path_factory.mktemp("manifests")))
