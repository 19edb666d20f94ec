"""Contract tests run over every registered quantizer (tokenizers/*.py, plugins, entry points).

Each quantizer supplies its own small config via `example_config()`, so a new file dropped into
`tokenizers/` or a `--plugins` directory is checked with no other edit. `check_quantizer_contract`
is also called by tests/test_plugins.py on a plugin written at test time. Every check runs on the `--device` of
the session (tests/conftest.py; benchmarks/gpu.py passes cuda), autocast on that device's type.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from gsqbench.quantizer import QuantizerOutput
from gsqbench.registry import QUANTIZERS, discover_quantizers

NAMES = discover_quantizers().names()


def _build(name: str, seed: int, cfg: dict | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)  # built on the CPU, so the init is the same on every device
    cls = QUANTIZERS.get(name)
    return QUANTIZERS.build(name, cls.example_config() if cfg is None else cfg).to(device)


def _latent(q: torch.nn.Module, b: int = 3, h: int = 4, w: int = 5, seed: int = 1,
            device: torch.device | str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, q.dim, h, w, generator=g).to(device)


def _allowed_dtypes(z: torch.Tensor) -> tuple[torch.dtype, ...]:
    """z_q has z's dtype, or fp32 for a narrower z (codebook quantizers hand the decoder fp32 rows, as the
    official code does under bf16 autocast)."""
    return (z.dtype, torch.promote_types(z.dtype, torch.float32))


def check_shapes_and_losses(q: torch.nn.Module, z: torch.Tensor) -> QuantizerOutput:
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    b, _, h, w = z.shape
    assert out.z_q.shape == z.shape and out.z_q.dtype in _allowed_dtypes(z)
    assert out.indices.shape == (b, h, w, q.groups) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    for key, loss in out.losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), key
    for key, stat in out.stats.items():
        assert stat.ndim == 0 and not stat.requires_grad and torch.isfinite(stat), key
    return out


def check_gradient(q: torch.nn.Module, z: torch.Tensor) -> None:
    z = z.clone().requires_grad_(True)
    out = q(z)
    weights = torch.randn_like(out.z_q)
    (out.z_q * weights).sum().backward()  # only the straight-through path, no aux loss
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


def check_eval_inverse_determinism_batch(q: torch.nn.Module, z: torch.Tensor) -> None:
    q.eval()
    with torch.no_grad():
        out = q(z)
        assert torch.equal(q.indices_to_codes(out.indices), out.z_q)
        again = q(z)
        assert torch.equal(again.indices, out.indices) and torch.equal(again.z_q, out.z_q)
        singles = [q(z[i:i + 1]) for i in range(z.shape[0])]
        assert torch.equal(torch.cat([s.indices for s in singles]), out.indices)
        assert torch.equal(torch.cat([s.z_q for s in singles]), out.z_q)


def check_state_dict_round_trip(name: str, cfg: dict | None, q: torch.nn.Module, z: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _build(name, seed=12345, cfg=cfg, device=z.device)
    fresh.load_state_dict(state, strict=True)
    q.eval()
    fresh.eval()
    with torch.no_grad():
        a, b = q(z), fresh(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q)


def check_bf16_autocast(q: torch.nn.Module, z: torch.Tensor) -> None:
    q.train()
    with torch.autocast(z.device.type, dtype=torch.bfloat16):
        for inp in (z, z.to(torch.bfloat16)):
            out = q(inp)
            assert out.z_q.dtype in _allowed_dtypes(inp) and torch.isfinite(out.z_q.float()).all()
            assert all(torch.isfinite(v.float()) for v in out.losses.values())
            assert int(out.indices.max()) < q.codebook_size


def check_quantizer_contract(name: str, cfg: dict | None = None, device: torch.device | str = "cpu") -> None:
    """Every contract check on the registered quantizer `name` with `cfg` (default: its example_config)."""
    q = _build(name, seed=0, cfg=cfg, device=device)
    for attr in ("dim", "codebook_size", "groups"):
        assert isinstance(getattr(q, attr), int) and getattr(q, attr) >= 1, attr
    assert math.log2(q.codebook_size) >= 0
    z = _latent(q, device=device)
    q.train()
    check_shapes_and_losses(q, z)
    check_gradient(q, z)
    q.eval()
    check_shapes_and_losses(q, z)
    check_eval_inverse_determinism_batch(q, z)
    check_state_dict_round_trip(name, cfg, q, z)
    check_bf16_autocast(q, z)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str, device: torch.device) -> None:
    check_quantizer_contract(name, device=device)


# family options that change the code path get the same contract
VARIANTS = [
    ("gsq", {"dim": 8, "codebook_size": 16, "groups": 8, "norm": "clip", "init": "uniform"}),
    ("gsq", {"dim": 6, "codebook_size": 32, "groups": 2, "norm": "l1", "lookup_precision": "bf16"}),
    ("gsq", {"dim": 4, "codebook_size": 32, "groups": 2, "tie_break": "softmax", "entropy_weight": 0.1}),
    ("gsq", {"dim": 4, "codebook_size": 32, "tie_break": "random", "norm": "none", "init": "uniform"}),
    ("vq", {"dim": 4, "codebook_size": 16, "ema": True, "restart_dead_codes": True}),
    ("vq", {"dim": 6, "codebook_size": 16, "groups": 3, "norm": "l2", "init": "spherical"}),
    ("lfq", {"codebook_size": 256, "entropy_weight": 0.0}),
    ("fsq", {"codebook_size": 2**10}),
]


@pytest.mark.parametrize("name,cfg", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_contract_variants(name: str, cfg: dict, device: torch.device) -> None:
    check_quantizer_contract(name, cfg, device)


def test_builtin_families_registered() -> None:
    assert {"gsq", "vq", "lfq", "fsq"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_one_line_description(name: str) -> None:
    doc = (QUANTIZERS.get(name).__doc__ or "").strip()
    assert doc and len(doc.splitlines()[0]) > 10


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_differs_before_load_for_learned_codebooks(name: str) -> None:
    # guards the round-trip check: for quantizers with parameters, a fresh seed must give a different model
    a, b = _build(name, 0), _build(name, 12345)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    if any(t.is_floating_point() for t in sa.values()):
        assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())
