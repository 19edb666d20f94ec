"""Training loop and suite runner on CPU: 4 subjects share one fairness hash; GAN path (PatchGAN, hinge/NS,
DiffAugment, LeCAM, bf16 autocast) with the EMA checked against its closed form; DINOv2 discriminator from a
local weight file; LR schedule; one-line CLI errors (exit 2) for bad configs, data and --require."""
from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from gsqbench.cli import main
from gsqbench.config import TrainSpec, expand_runs, suite_from_dict
from gsqbench.errors import UserError
from gsqbench.runner import open_dataset, run_suite
from gsqbench.train import build_trainer, lr_factor, train_step


pytestmark = pytest.mark.usefixtures("one_thread")


QUANTIZERS = [
    {"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 16, "groups": 2}},
    {"name": "vq", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 256}},
    {"name": "lfq", "quantizer": {"name": "lfq", "dim": 8}},
    {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4, 4, 4]}},
]


def tiny_raw(steps: int = 2, subjects=None, **shared) -> dict:
    base = {
        "model": {"preset": "tiny-f8", "latent_dim": 8},
        "data": {"train": {"kind": "synthetic", "size": 32, "limit": 8},
                 "eval": {"kind": "synthetic", "size": 32, "limit": 4}},
        "train": {"steps": steps, "batch_size": 2, "precision": "fp32", "checkpoint_every": 100, "log_every": 1},
        "eval": {"batch_size": 4, "samples": 2, "metrics": ["pixel", "codebook"]},
    }
    for key, value in shared.items():
        base[key] = {**base.get(key, {}), **value}
    return {"suite": "tiny", "shared": base, "subjects": copy.deepcopy(subjects or QUANTIZERS[:1]), "seeds": [0]}


def test_suite_of_four_subjects_shares_one_fairness_hash(tmp_path):
    suite = suite_from_dict(tiny_raw(steps=1, subjects=QUANTIZERS))
    res = run_suite(suite, tmp_path, progress=False)
    assert [d.name for d in res.run_dirs] == ["gsq-s0", "vq-s0", "lfq-s0", "fsq-s0"]
    hashes = set()
    for d in res.run_dirs:
        info = json.loads((d / "run.json").read_text())
        assert info["status"] == "done" and info["weights"] == "ema" and info["train"]["discriminator"] == "none"
        assert (d / "checkpoint" / "model.safetensors").exists() and (d / "train_log.csv").exists()
        with open(d / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["fairness_hash"] for r in rows} == {info["fairness_hash"]}
        assert {"psnr", "train_images_per_s", "train_time_s"} <= {r["metric"] for r in rows}
        hashes.add(info["fairness_hash"])
    assert len(hashes) == 1
    again = run_suite(suite, tmp_path, progress=False)  # finished runs are skipped, summary still complete
    assert again.skipped == ["gsq-s0", "vq-s0", "lfq-s0", "fsq-s0"]
    assert "psnr" in again.summary["fsq-s0"]
    changed = suite_from_dict(tiny_raw(steps=2, subjects=QUANTIZERS))  # same run ids, different shared spec
    with pytest.raises(UserError, match="gsq-s0.*different spec"):
        run_suite(changed, tmp_path, progress=False)


def test_gan_path_and_ema_closed_form(tmp_path):
    raw = tiny_raw(steps=3, gan={"discriminator": "patchgan", "g_loss": "ns", "d_loss": "hinge", "start_step": 1,
                                 "lecam_weight": 0.001, "options": {"num_filters": 8, "num_layers": 2}},
                   train={"ema_decay": 0.9, "precision": "bf16"})  # bf16 autocast on CPU, fp32 weights
    run = expand_runs(suite_from_dict(raw))[0]
    tr = build_trainer(run, open_dataset(run.shared.data.train), torch.device("cpu"))
    ema = [p.detach().clone() for p in tr.model.parameters()]  # EMA starts as a copy of the init
    d0 = [p.detach().clone() for p in tr.disc.parameters()]
    rows = []
    for _ in range(3):
        rows.append(train_step(tr))
        ema = [0.9 * e + 0.1 * p.detach() for e, p in zip(ema, tr.model.parameters())]
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    for e, p in zip(ema, tr.ema.model.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert "loss_adv" not in rows[0] and "loss_d" not in rows[0]  # D starts at step 1
    assert {"loss_adv", "loss_d", "loss_lecam"} <= set(rows[1]) and all(math.isfinite(v) for v in rows[2].values())
    assert tr.stream.position == 1 + 2 * 2  # G batch each step + a fresh D batch once D is active
    assert any(not torch.equal(a, b) for a, b in zip(d0, tr.disc.parameters()))
    for e, b in zip(tr.ema.model.buffers(), tr.model.buffers()):  # buffers are copied, not averaged
        assert torch.equal(e, b)


@pytest.mark.slow
def test_dino_discriminator_from_local_weights_runs_one_step(tmp_path):
    import timm

    from gsqbench.models.discriminator import DINO_TIMM_NAME

    path = tmp_path / "dino_random.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model(DINO_TIMM_NAME, pretrained=False, img_size=28, num_classes=0).state_dict(), path)
    raw = tiny_raw(steps=1, gan={"discriminator": "dino", "options": {"img_size": 28, "weights": str(path)}})
    run = expand_runs(suite_from_dict(raw))[0]
    tr = build_trainer(run, open_dataset(run.shared.data.train), torch.device("cpu"))
    heads0 = [p.detach().clone() for p in tr.disc.heads.parameters()]
    backbone0 = [p.detach().clone() for p in tr.disc.backbone.parameters()]
    row = train_step(tr)
    assert math.isfinite(row["loss_adv"]) and math.isfinite(row["loss_d"])
    assert any(not torch.equal(a, b) for a, b in zip(heads0, tr.disc.heads.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(backbone0, tr.disc.backbone.parameters()))  # frozen


def test_lr_schedule_and_optimizer_groups():
    t = TrainSpec(steps=10, warmup_steps=2, decay="cosine", decay_start=4, min_lr_ratio=0.1)
    expected = [0.5, 1.0, 1.0, 1.0] + [1 - 0.9 * 0.5 * (1 - math.cos(math.pi * (s - 4) / 6)) for s in range(4, 11)]
    assert [lr_factor(s, t) for s in range(11)] == pytest.approx(expected)
    assert lr_factor(99, TrainSpec()) == 1.0  # official: constant
    from gsqbench.train import build_optimizer

    lin = torch.nn.Linear(3, 2)
    opt = build_optimizer(list(lin.named_parameters()), 1e-3, (0.9, 0.99), 0.05, 1e-8, True)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[1]["params"][0] is lin.bias
    assert len(build_optimizer(list(lin.named_parameters()), 1e-3, (0.9, 0.99), 0.05, 1e-8, False).param_groups) == 1


# ----------------------------------------------------------------------------------------------- CLI errors
def _suite_file(tmp_path: Path, raw: dict) -> str:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["run", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["shared"]["train"].update(lrr=1), "unknown config key 'shared.train.lrr'; did you mean 'lr'"),
    (lambda r: r["shared"]["train"].update(steps="ten"), "'shared.train.steps': 'ten' is not valid; expected int"),
    (lambda r: r["subjects"][0].update({"train.lr": 1.0}), "'train.lr' is shared"),
])
def test_cli_bad_config_exit_2_one_line(tmp_path, capsys, mutate, needle):
    raw = tiny_raw()
    mutate(raw)
    code, err = _cli(capsys, _suite_file(tmp_path, raw), "--results", str(tmp_path / "r"))
    assert code == 2 and needle in err and err.startswith("gsqbench: error:") and "\n" not in err


def test_cli_bad_data_exit_2_one_line(tmp_path, capsys):
    from PIL import Image

    def folder_raw(path):
        return tiny_raw(data={"train": {"kind": "image-folder", "path": str(path), "size": 32}})

    code, err = _cli(capsys, _suite_file(tmp_path, folder_raw(tmp_path / "missing")), "--results", str(tmp_path / "r"))
    assert code == 2 and "missing" in err and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(capsys, _suite_file(tmp_path, folder_raw(empty)), "--results", str(tmp_path / "r"))
    assert code == 2 and "empty" in err and "\n" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(bad / f"ok{i}.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, err = _cli(capsys, _suite_file(tmp_path, folder_raw(bad)), "--strict-data", "--results", str(tmp_path / "r"))
    assert code == 2 and "broken.png" in err and "\n" not in err
    code, err = _cli(capsys, _suite_file(tmp_path, tiny_raw()), "--set", "train.steps=0")
    assert code == 2 and "'shared.train.steps': 0" in err


def test_cli_require_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))  # no weights installed there
    code, err = _cli(capsys, _suite_file(tmp_path, tiny_raw()), "--require", "rfid@inception",
                     "--results", str(tmp_path / "r"))
    assert code == 2 and "inception-fid" in err and "\n" not in err
    assert not (tmp_path / "r").exists()  # nothing was trained
    code, err = _cli(capsys, _suite_file(tmp_path, tiny_raw()), "--require", "rfid", "--results", str(tmp_path / "r"))
    assert code == 2 and "unknown metric 'rfid'" in err


def test_cli_run_end_to_end_with_report(tmp_path, capsys):
    code = main(["run", _suite_file(tmp_path, tiny_raw(steps=1)), "--results", str(tmp_path / "r"),
                 "--report", str(tmp_path / "report"), "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].split()[:3] == ["run", "status", "psnr"] and "gsq-s0" in out
    assert (tmp_path / "report" / "index.html").exists()
    assert (tmp_path / "r" / "tiny" / "gsq-s0" / "run.json").exists()
