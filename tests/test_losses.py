"""Tests for gsqbench.losses: adversarial losses and regularisers vs closed forms on hand-made logits, the adaptive
weight vs a hand-computed toy gradient, and the LPIPS-VGG loss vs the `lpips` package with the same random trunk."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from gsqbench import losses as L
from gsqbench.errors import UserError

REAL = [[2.0, 0.5], [-1.0, 0.0]]
FAKE = [[-2.0, 0.3], [1.0, -0.5]]


def _sp(v: float) -> float:
    return math.log1p(math.exp(v))


def _flat(rows):
    return [v for r in rows for v in r]


def test_hinge_d_loss_closed_form():
    # relu(1 - real) = [0, .5, 2, 1] → mean .875; relu(1 + fake) = [0, 1.3, 2, .5] → mean .95; halved sum.
    got = L.discriminator_loss("hinge", torch.tensor(REAL), torch.tensor(FAKE))
    assert got.item() == pytest.approx(0.5 * (0.875 + 0.95), abs=1e-6)
    assert L.generator_loss("hinge", torch.tensor(FAKE)).item() == pytest.approx(-sum(_flat(FAKE)) / 4, abs=1e-6)


def test_vanilla_losses_closed_form():
    d = 0.5 * (sum(_sp(-r) for r in _flat(REAL)) / 4 + sum(_sp(f) for f in _flat(FAKE)) / 4)
    assert L.discriminator_loss("vanilla", torch.tensor(REAL), torch.tensor(FAKE)).item() == pytest.approx(d, abs=1e-6)
    g = sum(_sp(-f) for f in _flat(FAKE)) / 4
    assert L.generator_loss("vanilla", torch.tensor(FAKE)).item() == pytest.approx(g, abs=1e-6)


def test_non_saturating_uses_per_sample_mean_first():
    fake = torch.tensor([[[1.0, 2.0, 3.0]], [[-1.0, -1.0, 2.0]]])  # (b=2, 1, 3): per-sample means 2 and 0
    expected = 0.5 * (_sp(-2.0) + _sp(0.0))
    for name in ("non_saturating", "ns", "non_saturate"):
        assert L.generator_loss(name, fake).item() == pytest.approx(expected, abs=1e-6)
    elementwise = sum(_sp(-v) for v in [1, 2, 3, -1, -1, 2]) / 6  # what a per-logit loss would give
    assert abs(expected - elementwise) > 0.05
    real = torch.tensor([[0.5, 1.5], [-2.0, 0.0]])  # means 1, -1
    d = 0.5 * 0.5 * ((_sp(-1.0) + _sp(2.0)) + (_sp(1.0) + _sp(0.0)))
    assert L.discriminator_loss("ns", real, fake.reshape(2, 3)).item() == pytest.approx(d, abs=1e-6)


def test_unknown_loss_names_are_user_errors():
    with pytest.raises(UserError, match="did you mean 'hinge'"):
        L.generator_loss("hing", torch.zeros(2))
    with pytest.raises(UserError, match="disc_loss_type"):
        L.discriminator_loss("wgan", torch.zeros(2), torch.zeros(2))
    with pytest.raises(UserError, match="reconstruction"):
        L.reconstruction_loss(torch.zeros(2), torch.zeros(2), "l3")


def test_reconstruction_losses_closed_form():
    x = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    y = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
    assert L.reconstruction_loss(x, y, "l2").item() == pytest.approx((0.25 + 0 + 4 + 0.25) / 4)
    assert L.reconstruction_loss(x, y, "l1").item() == pytest.approx((0.5 + 0 + 2 + 0.5) / 4)


def test_lecam_ema_and_regulariser_closed_form():
    ema = L.LeCamEMA(decay=0.9)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    ema.update(real, fake)  # real ema = 0.1·2 = 0.2, fake ema = 0.1·(−1) = −0.1
    assert (ema.real, ema.fake) == (pytest.approx(0.2), pytest.approx(-0.1))
    # relu(real − (−0.1))² = [1.1², 3.1²]; relu(0.2 − fake)² = [2.2², 0.2²]
    expected = (1.1 ** 2 + 3.1 ** 2) / 2 + (2.2 ** 2 + 0.2 ** 2) / 2
    assert L.lecam_loss(real, fake, ema).item() == pytest.approx(expected, rel=1e-6)
    other = L.LeCamEMA()
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.real, other.fake) == (0.9, ema.real, ema.fake)
    assert L.LeCamEMA().decay == 0.999


def test_gradient_penalty_of_linear_discriminator():
    c = torch.tensor([1.0, -2.0, 2.0])
    x = torch.randn(4, 3, requires_grad=True)
    logits = x @ c  # ∂D/∂x = c for every sample → ‖c‖² = 9
    assert L.gradient_penalty(x, logits).item() == pytest.approx(9.0)


def test_adaptive_weight_on_toy_graph():
    w2 = torch.tensor([1.0, 1.0], requires_grad=True)  # the "last decoder layer"
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([0.3, 0.4])
    rec = (w2 * a).sum() ** 2  # ∇ = 2·3·[2, 1] = [12, 6], ‖·‖ = √180
    g = (w2 * b).sum()  # ∇ = [0.3, 0.4], ‖·‖ = 0.5
    weight = L.adaptive_weight(rec, g, w2)
    assert weight.item() == pytest.approx(math.sqrt(180) / 0.5, rel=1e-6)
    assert not weight.requires_grad and w2.grad is None  # no side effects on .grad
    tiny = (w2 * torch.tensor([1e-6, 0.0])).sum()  # ‖∇‖ below 1e-3 → denominator clamped, weight capped at 1e3
    assert L.adaptive_weight(rec, tiny, w2).item() == pytest.approx(1e3)
    assert L.adaptive_weight(rec, tiny, w2, max_weight=1e5).item() == pytest.approx(math.sqrt(180) / 1e-3, rel=1e-5)


def test_discriminator_start_helpers():
    assert not L.adversarial_active(9, 10) and L.adversarial_active(10, 10)
    assert L.adopt_weight(0.1, 5, 10) == 0.0 and L.adopt_weight(0.1, 10, 10) == 0.1


# --------------------------------------------------------------------------------------------- LPIPS-VGG
@pytest.fixture(scope="module")
def vgg_trunk(tmp_path_factory):
    """A random-init torchvision VGG16 trunk in torchvision's key layout (features only keeps the file small)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return path, features


@pytest.fixture(scope="module")
def oracle_lpips(vgg_trunk) -> torch.nn.Module:
    """The lpips package built its own way, with the same trunk copied module by module (lpips keeps
    torchvision's layer indices); its v0.1 heads are the ones lpips loads itself."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)
    features = vgg_trunk[1]
    for sl in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, module in sl.named_children():
            module.load_state_dict(features[int(name)].state_dict())
    return ref.eval()


def test_lpips_loss_matches_lpips_package(vgg_trunk, oracle_lpips):
    path, _ = vgg_trunk
    loss = L.PerceptualLoss(path)
    ref = oracle_lpips
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # 16² still leaves relu5_3 a 1×1 map
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    got = loss(x, y)
    with torch.no_grad():
        expected = ref(x, y).mean()
        expected_quirk = ref(0.5 * x + 0.5, 0.5 * y + 0.5).mean()
    assert loss.enabled and got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert got.item() > 0
    quirk = L.PerceptualLoss(path, input_range="[0,1]")(x, y)
    assert quirk.item() == pytest.approx(expected_quirk.item(), rel=1e-5, abs=1e-7)
    assert abs(quirk.item() - got.item()) > 1e-6
    got.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.model.training  # heads' dropout never switches on
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_lpips_loss_off_without_trunk_unless_required(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    loss = L.PerceptualLoss()
    assert not loss.enabled and "vgg16" in loss.unavailable
    assert loss.card()["perceptual_loss"] == "off" and "vgg16" in loss.card()["perceptual_unavailable"]
    assert any("OFF" in r.getMessage() for r in caplog.records)
    x = torch.zeros(1, 3, 8, 8)
    assert loss(x, x + 1).item() == 0.0
    with pytest.raises(UserError) as err:
        L.PerceptualLoss(required=True)
    assert "\n" not in str(err.value) and "vgg16" in str(err.value)
    with pytest.raises(UserError, match="perceptual_input_range"):
        L.PerceptualLoss(tmp_path / "missing.pth", input_range="0-1")
    assert not L.PerceptualLoss(tmp_path / "missing.pth").enabled


def test_lpips_trunk_through_weight_manager_and_bad_files(vgg_trunk, tmp_path, monkeypatch):
    path, _ = vgg_trunk
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "vgg16-random.pth").write_bytes(path.read_bytes())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("GSQBENCH_HOME", str(home))
    monkeypatch.setenv("GSQBENCH_WEIGHTS_MANIFEST", json.dumps({"vgg16": {"filename": "vgg16-random.pth",
                                                                          "sha256": sha}}))
    loss = L.PerceptualLoss(required=True)
    assert loss.enabled and loss.card()["perceptual_loss"] == "lpips-vgg-v0.1"
    bad = tmp_path / "bad.pth"
    torch.save({"something.else": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="bad.pth"):
        L.PerceptualLoss(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pth"):
        L.PerceptualLoss(junk)
