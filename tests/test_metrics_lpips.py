"""LPIPS against the `lpips` package (metrics-protocol.md §5, §13 #6).

Random-init AlexNet / VGG16 trunks (torchvision layouts) are saved under the official file names; our metric loads
them from the file, the oracle is `lpips.LPIPS(net=..., version='0.1', pretrained=True, pnet_rand=True)` with the
same trunk tensors copied in here by parameter order (independent of our key mapping), fed u8/127.5 − 1.
"""
from __future__ import annotations

import math
import os
import warnings

import lpips
import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from gsqbench.errors import UserError
from gsqbench.metrics.lpips import LPIPSMetric, u8_to_lpips_input

FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _trunk(net: str) -> dict[str, torch.Tensor]:
    torch.manual_seed({"alex": 1, "vgg": 2}[net])
    if net == "alex":
        return torchvision.models.alexnet(weights=None).state_dict()
    # VGG16 'D' features only: the 100M-parameter classifier is irrelevant to LPIPS and slow to initialise
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    return {f"features.{k}": v for k, v in features.state_dict().items()}


@pytest.fixture(scope="module")
def trunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips-weights")
    out = {}
    for net, name in FILES.items():
        sd = _trunk(net)
        torch.save(sd, root / name)
        out[net] = (root / name, sd)
    return out


def _oracle(net: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    trunk_params = list(ref.net.parameters())
    source = [v for k, v in sd.items() if k.startswith("features.")]  # conv weight, bias in layer order
    assert len(trunk_params) == len(source)
    with torch.no_grad():
        for p, v in zip(trunk_params, source):
            p.copy_(v)
    return ref.eval()


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    crops = [skimage.data.astronaut()[40:88, 180:228], skimage.data.coffee()[150:198, 200:248],
             skimage.data.chelsea()[80:128, 150:198]]
    real = np.stack(crops)
    noise = rng.normal(0, 1, real.shape) * np.array([4.0, 15.0, 40.0])[:, None, None, None]
    fake = np.clip(np.round(real + noise), 0, 255).astype(np.uint8)
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return t(real), t(fake)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_package_and_is_batch_independent(trunks, net):
    path, sd = trunks[net]
    real, fake = _images()
    metric = LPIPSMetric(net, weights_path=path)
    metric.update(real, fake, ["i0", "i1", "i2"])
    oracle = _oracle(net, sd)
    with torch.no_grad():
        expected = oracle(real.float() / 127.5 - 1, fake.float() / 127.5 - 1).flatten().tolist()
    got = metric.per_image()[f"lpips@{net}"]
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[0] < got[1] < got[2]  # more noise, larger distance: the random trunk is not degenerate
    (row,) = metric.compute()
    assert row.name == f"lpips@{net}" and row.direction == "lower" and row.n == 3
    assert row.value == pytest.approx(float(np.mean(expected)), abs=1e-5)
    for i in range(3):  # batch of one vs the whole batch above
        metric.update(real[i : i + 1], fake[i : i + 1], [f"s{i}"])
    metric.update(real[:1], real[:1], ["z0"])
    values = metric.per_image()[f"lpips@{net}"]
    assert values[3:6] == pytest.approx(got, abs=1e-6)
    assert values[6] == 0.0  # identical ⇒ 0


def test_input_conversion_range():
    """§13 #6: [−1, 1] from uint8, never [0, 1]; floats are refused."""
    x = u8_to_lpips_input(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert x.tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    with pytest.raises(UserError, match="uint8"):
        u8_to_lpips_input(torch.rand(3))


def test_missing_weights_make_metric_unavailable_or_fail_when_required(tmp_path, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("GSQBENCH_WEIGHTS_MANIFEST", raising=False)
    metric = LPIPSMetric("alex")
    metric.update(*_images(), ["a", "b", "c"])
    (row,) = metric.compute()
    assert math.isnan(row.value) and "gsqbench weights" in row.unavailable
    assert metric.per_image() == {}
    with pytest.raises(UserError, match="alexnet"):
        LPIPSMetric("alex", required=True)


def test_bad_trunk_files_refused(tmp_path):
    garbage = tmp_path / "alexnet-owt-7be5be79.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"^LPIPS trunk: .*alexnet-owt-7be5be79\.pth: not a readable PyTorch checkpoint"):
        LPIPSMetric("alex", weights_path=garbage)
    class _Payload:  # pickles as a reference to posix.system; must be refused before anything is unpickled
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'payload_ran'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(3), "x": _Payload()}, evil)
    with pytest.raises(UserError, match=r"^LPIPS trunk: refusing to load .*evil\.pth: it contains executable pickle "
                                        r"content \(posix\.system\)"):
        LPIPSMetric("alex", weights_path=evil)
    assert not (tmp_path / "payload_ran").exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(UserError, match="does not fit"):
        LPIPSMetric("alex", weights_path=wrong)
    with pytest.raises(UserError, match="squeeze|valid"):
        LPIPSMetric("squeeze", weights_path=wrong)
