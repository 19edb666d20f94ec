"""Issue 19, phase 2: loaded subjects, the compatibility modes of the published tokenizers, the leaderboard suite.

Release files are the random-init, reduced-width (ch 32) releases of tests/test_import_published.py and
tests/test_import_official.py, saved in the upstream layouts and read through the real loading code. Must show 3:
`gsqbench eval` of each release in its compatibility mode and in gsqbench mode gives different card hashes, and the
report keeps them apart. Must show 4: configs/leaderboard/imagenet256.yaml runs end to end on CPU at 64² on the
sample photos, and its report ranks the loaded subjects and sets each beside its published numbers. The conversion
rules of the modes are checked against numpy restatements of the upstream expressions, the new crop protocols
against torchvision / a float64 restatement, the float-image rFID trunk against torch-fidelity's own forward.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gsqbench.cli import main
from gsqbench.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
LEADERBOARD = ROOT / "configs" / "leaderboard" / "imagenet256.yaml"


def _helpers(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PUB = _helpers("test_import_published")
OFF = _helpers("test_import_official")
#: release kind → (compatibility mode, leaderboard subject, release file name)
KINDS = {"llamagen": ("llamagen-compat", "llamagen-vq16", "vq_ds16_c2i.pt"),
         "open-magvit2": ("magvit2-compat", "open-magvit2-in256-l", "imagenet_256_L.ckpt"),
         "maskgit": ("maskgit-compat", "maskgit-vqgan", "maskgit-vqgan-imagenet-f16-256.bin"),
         "taming": ("taming-compat", "taming-vqgan-f16-16384", "last.ckpt")}


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    """One random-init release per kind in its upstream layout (and an official GSQ release folder)."""
    folder = tmp_path_factory.mktemp("releases")
    out = {}
    out["llamagen"] = folder / KINDS["llamagen"][2]
    torch.save({"model": PUB.random_state(PUB.llamagen_keys(ch=32, z=32, embed=8, V=64), seed=1)}, out["llamagen"])
    raw = PUB.random_state(PUB.magvit2_keys(ch=32), seed=5)
    ema = PUB.random_state(PUB.magvit2_keys(ch=32), seed=6)
    state = {**raw, "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(3),
             **{"model_ema." + k.replace(".", ""): v for k, v in ema.items()}}
    out["open-magvit2"] = folder / KINDS["open-magvit2"][2]
    torch.save({"epoch": 1, "state_dict": state}, out["open-magvit2"])
    out["maskgit"] = folder / KINDS["maskgit"][2]
    torch.save(PUB.random_state(PUB.maskgit_keys(ch=32, z=32, V=64), seed=4), out["maskgit"])
    out["taming"] = folder / "taming" / KINDS["taming"][2]
    out["taming"].parent.mkdir()
    torch.save({"state_dict": {**PUB.random_state(PUB.taming_keys(ch=32, z=32, embed=16, V=64), seed=2),
                               **PUB.loss_state(3)}}, out["taming"])
    kwargs = OFF.official_kwargs("f16", 16, 256, 8, hidden=32)
    out["gsq"] = OFF.write_release(folder / "GSQ-F16-D16-G8-V256k",
                                   OFF.random_state(OFF.official_shapes("f16", 16, 256, 8, hidden=32)), kwargs)
    return out


def _eval(src: Path, out: Path, mode: str, *extra: str) -> int:
    return main(["eval", str(src), "--mode", mode, "--data", "sample-photos", "--resolution", "64", "--n", "2",
                 "--metrics", "pixel", "--metrics", "codebook", "--samples", "1", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu", "--no-progress", "--num-workers", "0", *extra])


# ============================================================== Must show 3: eval in both modes, kept apart


def test_eval_of_each_release_in_its_compat_mode_and_gsqbench_mode_keeps_cards_apart(releases, tmp_path, capsys):
    from gsqbench.modes import MODES
    from gsqbench.report.data import LOADED_GROUP, collect_runs, group_runs

    root = tmp_path / "results" / "eval"
    cards: dict[tuple[str, str], dict] = {}
    for kind, (mode, _, _) in KINDS.items():
        for m in ("gsqbench", mode):
            out = root / f"{kind}-{m}"
            assert _eval(releases[kind], out, m) == 0, capsys.readouterr().err
            info = json.loads((out / "run.json").read_text())
            cards[kind, m] = info
            sha = __import__("hashlib").sha256(releases[kind].read_bytes()).hexdigest()
            assert info["loaded"]["sha256"] == sha and info["loaded"]["kind"] == kind  # what was loaded, from where
            assert info["card"]["model"]["weights"] == "as-released"
        compat, pinned = cards[kind, mode]["card"], cards[kind, "gsqbench"]["card"]
        assert compat["card_hash"] != pinned["card_hash"]
        assert cards[kind, mode]["fairness_hash"] != cards[kind, "gsqbench"]["fairness_hash"]
        assert "compat" not in pinned  # the pinned protocol has nothing to declare
        assert compat["compat"]["differences"] == list(MODES[mode].differences)  # the card says what differs
        assert compat["data"]["crop"] == MODES[mode].crop and pinned["data"]["crop"] == "gsq"
    capsys.readouterr()
    # the four pinned-protocol rows share one card (one leaderboard group); each compat row is a group of its own
    groups = group_runs(collect_runs(root.parent)[0])["eval"]
    assert all(g.fairness_hash == LOADED_GROUP for g in groups)
    by_card = {g.card_hash: sorted(r.run_id for r in g.runs) for g in groups}
    assert len(by_card) == 1 + len(KINDS)
    assert by_card[cards["llamagen", "gsqbench"]["card_hash"]] == sorted(f"{k}-gsqbench" for k in KINDS)
    for kind, (mode, _, _) in KINDS.items():
        assert by_card[cards[kind, mode]["card_hash"]] == [f"{kind}-{mode}"]
    assert main(["report", str(root.parent), "-o", str(tmp_path / "report"), "--no-plots"]) == 0
    page = (tmp_path / "report" / "suite-eval.html").read_text()
    assert page.count('<section class="group" id="group-') == 1 + len(KINDS) and "separate comparison groups" in page


def test_a_compat_mode_refuses_a_release_of_another_kind_and_raw_weights(releases, tmp_path, capsys):
    assert _eval(releases["maskgit"], tmp_path / "a", "llamagen-compat") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reproduces the llamagen protocol" in err and "a maskgit release" in err
    assert _eval(releases["open-magvit2"], tmp_path / "b", "magvit2-compat", "--weights", "raw") == 2
    assert "evaluates ema weights" in capsys.readouterr().err
    assert _eval(releases["llamagen"], tmp_path / "c", "llamagen-compat", "--crop", "gsq") == 2
    assert "evaluates 'adm' crops" in capsys.readouterr().err
    assert _eval(releases["llamagen"], tmp_path / "d", "llamagen") == 2
    err = capsys.readouterr().err
    assert "did you mean 'llamagen-compat'" in err and "valid: gsqbench, gsq-compat" in err


# ============================================================== Must show 4: the leaderboard suite end to end


def test_leaderboard_suite_runs_end_to_end_on_cpu(releases, tmp_path, capsys):
    from gsqbench.report.leaderboard import load_published

    paths = {KINDS[k][1]: releases[k] for k in KINDS} | {"gsq-f16-d16-g8-v256k": releases["gsq"]}
    sets = [f"subjects.{name}.load={path}" for name, path in paths.items()]
    sets += ["data.eval.kind=sample-photos", "data.eval.path=null", "data.eval.size=64", "data.eval.limit=2",
             "eval.require=[]", "eval.metrics=[pixel,codebook]", "eval.samples=1", "eval.batch_size=2",
             "data.num_workers=0"]
    args = ["run", str(LEADERBOARD), "--results", str(tmp_path / "results"), "--device", "cpu", "--no-progress",
            *[a for s in sets for a in ("--set", s)], *[a for n in paths for a in ("--only", n)]]
    assert main(args) == 0, capsys.readouterr().err
    suite_dir = tmp_path / "results" / "leaderboard-imagenet256"
    runs = {p.name: json.loads((p / "run.json").read_text()) for p in suite_dir.iterdir() if (p / "run.json").exists()}
    published = load_published()
    for name in paths:
        mode = published.subjects[name].mode
        assert {f"{name}-s0", f"{name}-s0-{mode}"} <= set(runs), sorted(runs)
        assert runs[f"{name}-s0"]["status"] == "done" and runs[f"{name}-s0-{mode}"]["card"]["mode"] == mode
        assert not (suite_dir / f"{name}-s0" / "checkpoint").exists()  # loaded: evaluated, never trained
    pinned = {info["card_hash"] for rid, info in runs.items() if info["card"]["mode"] == "gsqbench"}
    assert len(pinned) == 1  # every subject under one pinned card: one ranked table
    capsys.readouterr()
    assert main(args) == 0  # finished loaded runs are skipped on a rerun, like trained ones
    skipped = re.search(r"skipped \(finished earlier\): (.*)", capsys.readouterr().out).group(1).split(", ")
    assert sorted(skipped) == sorted(runs)
    assert main(["report", str(tmp_path / "results"), "-o", str(tmp_path / "report"), "--no-plots"]) == 0
    page = (tmp_path / "report" / "suite-leaderboard-imagenet256.html").read_text()
    board = page[page.index('id="leaderboard"'):page.index('id="group-0"')]
    ranked = board[board.index("Ranked by PSNR"):board.index("Published vs reproduced")]  # no rFID measured here
    assert [int(n) for n in re.findall(r'<tr><td class="num">(\d+)</td>', ranked)] == list(range(1, len(paths) + 1))
    for name in paths:
        assert f'<th scope="row">{name}</th>' in ranked
        entry = published.subjects[name]
        assert f"{name}: {entry.tokenizer}" in board  # its published-vs-reproduced table
        assert f"{entry.values['rfid@inception']:.2f}" in board and entry.mode in board


# ============================================================== suites: loaded subjects, modes, fairness


def _suite(tmp_path: Path, subjects: list, **shared) -> dict:
    return {"suite": "lb", "shared": {"model": {"preset": "tiny-f8"}, **shared}, "subjects": subjects}


def test_loaded_subject_config_is_typed_and_errors_are_one_line(tmp_path):
    from gsqbench.config import suite_from_dict

    ok = suite_from_dict(_suite(tmp_path, [{"name": "a", "load": "x.pt", "modes": ["llamagen-compat"]},
                                           {"name": "g", "quantizer": {"name": "gsq", "dim": 8}}]))
    assert ok.subjects[0].load == "x.pt" and ok.subjects[0].modes == ("llamagen-compat",)
    bad = [
        ([{"name": "a", "load": "x.pt", "quantizer": {"name": "vq"}}], "either 'quantizer'"),
        ([{"name": "a", "load": ""}], "subjects[0].load"),
        ([{"name": "a", "load": "x.pt", "modes": ["llamagen"]}], "did you mean 'llamagen-compat'"),
        ([{"name": "a", "load": "x.pt", "modes": ["taming-compat", "taming-compat"]}], "names a mode twice"),
        ([{"name": "a", "load": "x.pt", "modes": ["gsqbench"]}], "shared.eval.mode already"),
        ([{"name": "a", "quantizer": {"name": "vq"}, "modes": ["gsq-compat"]}], "only a loaded subject"),
        ([{"name": "a", "lod": "x.pt"}], "did you mean 'load'"),
    ]
    for subjects, message in bad:
        with pytest.raises(UserError, match=re.escape(message)) as exc:
            suite_from_dict(_suite(tmp_path, subjects))
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match=r"'shared.eval.mode': 'compat' is not a valid mode; did you mean 'gsq-compat'\? \(valid: gsqbench, gsq-compat, "):
        suite_from_dict(_suite(tmp_path, [{"name": "a", "load": "x.pt"}], eval={"mode": "compat"}))


def test_validation_of_loaded_subjects_and_modes(releases, tmp_path):
    from gsqbench.config import suite_from_dict
    from gsqbench.validate import validate_suite

    loaded = {"name": "l", "load": str(releases["llamagen"])}
    with pytest.raises(UserError, match="loaded subject '.*missing.pt' does not exist"):
        validate_suite(suite_from_dict(_suite(tmp_path, [{"name": "m", "load": str(tmp_path / "missing.pt")}])))
    with pytest.raises(UserError, match="subject 'g' is trained"):
        validate_suite(suite_from_dict(_suite(tmp_path, [loaded, {"name": "g", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16}}],
                                              eval={"mode": "llamagen-compat"}, data={"eval": {"crop": "adm"}})))
    with pytest.raises(UserError, match="'shared.data.eval.crop': 'gsq' does not fit eval.mode 'llamagen-compat'"):
        validate_suite(suite_from_dict(_suite(tmp_path, [loaded], eval={"mode": "llamagen-compat"})))
    validate_suite(suite_from_dict(_suite(tmp_path, [loaded], eval={"mode": "llamagen-compat"},
                                          data={"eval": {"crop": "adm"}})))


def test_loaded_fairness_hash_records_the_file_and_loaded_runs_are_not_repeated(releases, tmp_path):
    from gsqbench.config import fairness_hash, suite_from_dict
    from gsqbench.effective import expand_runs

    copy = tmp_path / "copy.bin"
    data = bytearray(releases["maskgit"].read_bytes())
    copy.write_bytes(bytes(data))
    raw = _suite(tmp_path, [{"name": "a", "load": str(releases["maskgit"]), "modes": ["maskgit-compat"]},
                            {"name": "b", "load": str(copy)}, {"name": "g", "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16}}])
    raw.update(seeds=[0, 1], grid={"train.lr": [1e-4, 2e-4], "eval.batch_size": [4, 8]})
    runs = {r.run_id: r for r in expand_runs(suite_from_dict(raw))}
    # a loaded subject: first seed only, once per evaluation setting (the train.lr axis cannot reach it), per mode
    assert sorted(r for r in runs if r.startswith("a-")) == [
        "a-s0-batch_size4", "a-s0-batch_size4-maskgit-compat", "a-s0-batch_size8", "a-s0-batch_size8-maskgit-compat"]
    assert len([r for r in runs if r.startswith("g-")]) == 8  # trained subjects: 2 seeds x 4 grid points
    a, b = runs["a-s0-batch_size4"], runs["b-s0-batch_size4"]
    assert a.fairness_hash == b.fairness_hash  # byte-identical files: the same subject as far as fairness goes
    assert a.fairness_hash != runs["a-s0-batch_size8"].fairness_hash
    assert runs["a-s0-batch_size4-maskgit-compat"].shared.data.eval.crop == "torchvision-bicubic"
    trained = runs["g-s0-lr0.0001-batch_size4"]
    assert trained.fairness_hash == fairness_hash(trained.shared, trained.effective)  # trained runs: unchanged rule
    assert a.effective_json()["no_effect"]["train"].startswith("loaded subject")
    data[-1] ^= 1  # one changed byte: another release, another fairness hash
    copy.write_bytes(bytes(data))
    again = {r.run_id: r for r in expand_runs(suite_from_dict(raw))}
    assert again["b-s0-batch_size4"].fairness_hash != a.fairness_hash
    assert again["b-s0-batch_size4"].release_sha256 == __import__("hashlib").sha256(bytes(data)).hexdigest()


# ============================================================== the conversion rules and crops against oracles


def test_compat_conversion_rules_match_restatements_of_the_upstream_expressions():
    from gsqbench import compat
    from gsqbench.evaluate import compat_fake_uint8, compat_model_input, compat_real_uint8

    g = torch.Generator().manual_seed(0)
    x_hat = torch.cat([torch.rand(4000, generator=g) * 2.4 - 1.2,
                       torch.arange(256.0) / 127.5 - 1.0])  # incl. values exactly on the uint8 grid (ties)
    x_hat = x_hat.view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    xh = x_hat.numpy().astype(np.float32)
    f32 = np.float32
    # LlamaGen: torch.clamp(127.5 * samples + 128.0, 0, 255).to(uint8)
    want = np.clip(f32(127.5) * xh + f32(128.0), 0, 255).astype(np.uint8)
    assert np.array_equal(compat.FAKE_UINT8["round-half-up"](x_hat).numpy(), want)
    # Open-MAGVIT2 / taming: clamp(-1, 1), (x + 1)/2, (255 * x).astype(uint8)
    want = ((np.clip(xh, -1, 1) + f32(1)) / f32(2) * f32(255)).astype(np.uint8)
    assert np.array_equal(compat.FAKE_UINT8["trunc"](x_hat).numpy(), want)
    # 1d-tokenizer: clamp(y, 0, 1), torch.round(y * 255) / 255, then (x * 255).to(uint8); y = (x_hat + 1)/2
    y = np.clip((xh + f32(1)) / f32(2), 0, 1)
    want = (np.round(y * f32(255)) / f32(255) * f32(255)).astype(np.uint8)
    assert np.array_equal(compat.FAKE_UINT8["round-then-trunc"](x_hat).numpy(), want)
    # its real side: ToTensor then (x * 255).to(uint8)
    un = u8.numpy()
    assert np.array_equal(compat.REAL_UINT8["trunc-u8-over-255"](u8, None).numpy(),
                          (un.astype(np.float32) / f32(255) * f32(255)).astype(np.uint8))
    # Open-MAGVIT2's real side: image / 127.5 - 1, then the same truncation; some levels are lost
    x_in = compat.model_input("magvit2-compat", u8)
    want = (((un.astype(np.float32) / f32(127.5) - f32(1)) + f32(1)) / f32(2) * f32(255)).astype(np.uint8)
    got = compat.real_uint8("magvit2-compat", u8).numpy()
    assert np.array_equal(got, want) and torch.equal(x_in, u8.float() / 127.5 - 1)
    # gsq-compat: the rules named in the mode table equal the evaluator's gsq-compat functions
    xn = compat.model_input("gsq-compat", u8)
    assert torch.equal(xn, compat_model_input(u8))
    assert torch.equal(compat.real_uint8("gsq-compat", u8), compat_real_uint8(xn))
    assert torch.equal(compat.FAKE_UINT8["trunc-bf16"](x_hat), compat_fake_uint8(x_hat))
    # the float pair is never rounded
    real01, fake01 = compat.float_pair(x_in, x_hat)
    assert torch.equal(real01, (x_in + 1) / 2) and not torch.equal(fake01 * 255, torch.round(fake01 * 255))


def test_new_crop_protocols_match_torchvision_and_a_bilinear_restatement():
    from PIL import Image
    from torchvision import transforms as T

    from gsqbench.data import apply_crop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8))
    for crop, interp in (("torchvision", T.InterpolationMode.BILINEAR), ("torchvision-bicubic", T.InterpolationMode.BICUBIC)):
        ref = T.Compose([T.Resize(32, interpolation=interp, antialias=True), T.CenterCrop(32), T.PILToTensor()])(img)
        assert torch.equal(apply_crop(img, crop, 32), ref), crop
    # albumentations SmallestMaxSize(32) + CenterCrop(32): bilinear with half-pixel centres, no antialiasing
    src = np.asarray(img, dtype=np.float64)
    h, w = 32, int(round(71 * 32 / 53))

    def axis(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    (y0, y1, fy), (x0, x1, fx) = axis(h, 53), axis(w, 71)
    rows = src[y0] * (1 - fy)[:, None, None] + src[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    left = (w - 32) // 2
    want = np.clip(np.round(out), 0, 255).astype(np.uint8)[:, left:left + 32].transpose(2, 0, 1)
    got = apply_crop(img, "albumentations", 32).numpy()
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and (got == want).mean() > 0.99


def test_float_image_rfid_uses_the_fid_inception_trunk_on_pytorch_fid_inputs(releases, tmp_path, monkeypatch, capsys):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from gsqbench import weights as manager
    from gsqbench.metrics.fid import FIDMetric, PytorchFidFrontEnd, build_inception, inception_trunk

    rw = _helpers("random_weights")
    weights = rw.inception_file(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    net = build_inception(weights)
    u8 = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, logits = net(u8)  # torch-fidelity's own forward = its front end + the trunk restated here
        x = interpolate_bilinear_2d_like_tensorflow1x(u8.float(), size=(299, 299), align_corners=False)
        f2, l2 = inception_trunk(net, (x - 128) / 128)
        assert torch.equal(feats, f2) and torch.equal(logits, l2)
        metric = FIDMetric("cpu", weights_path=weights, float_input=True)
        assert metric.input == "float01"
        fake01 = u8.float() / 255 * 0.9 + 0.05  # never on the uint8 grid
        pre = torch.nn.functional.interpolate(fake01, size=(299, 299), mode="bilinear", align_corners=False)
        assert torch.equal(metric._features(fake01)[0], inception_trunk(net, 2 * pre - 1)[0])
        with pytest.raises(UserError, match="expected float"):
            metric.update(u8, u8, ["a"])  # the uint8 pair is refused: this metric reads the float pair
    assert metric.card()["fid_resize"] == PytorchFidFrontEnd.RESIZE
    with pytest.raises(UserError, match="float images"):
        FIDMetric("cpu", weights_path=weights, float_input=True, cache_dir=str(tmp_path))
    # through the evaluator: magvit2-compat hands rFID the float pair (random Inception weights, installed)
    monkeypatch.setenv("GSQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GSQBENCH_WEIGHTS_MANIFEST", rw.manifest({"inception-fid": weights}))
    manager.import_file(weights, "inception-fid")
    out = tmp_path / "eval"
    assert main(["eval", str(releases["open-magvit2"]), "--mode", "magvit2-compat", "--data", "sample-photos",
                 "--resolution", "32", "--n", "2", "--metrics", "fid", "--samples", "0", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--num-workers", "0"]) == 0, capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    fid = info["card"]["fid"]
    assert fid["fid_input"].startswith("float") and fid["fid_resize"] == PytorchFidFrontEnd.RESIZE
    assert fid["fid_reference_source"] == "computed" and fid["fid_n_real"] == 2
    rows = {r["metric"]: r for r in __import__("csv").DictReader((out / "metrics.csv").open())}
    assert np.isfinite(float(rows["rfid@inception"]["value"])) and rows["rfid@inception"]["not_comparable"]


# ============================================================== modes, published data


def test_mode_table_is_the_one_registry_of_modes():
    import typing

    from gsqbench import compat
    from gsqbench.config import EvalSpec
    from gsqbench.data import CROP_PROTOCOLS
    from gsqbench.lookup import LOOKUP_PRECISIONS
    from gsqbench.modes import MODES

    for m in MODES.values():
        assert m.model_input in compat.MODEL_INPUT and m.real_uint8 in compat.REAL_UINT8
        assert m.fake_uint8 in compat.FAKE_UINT8 and m.fid_input in ("uint8", "float01")
        assert m.crop is None or m.crop in CROP_PROTOCOLS
        assert m.lookup in LOOKUP_PRECISIONS and m.precision in ("fp32", "bf16")
        assert bool(m.differences) == m.is_compat  # every compatibility mode says what it changes
        assert EvalSpec(mode=m.name).lookup_mode == m.lookup and EvalSpec(mode=m.name).precision_mode == m.precision
    assert typing.get_type_hints(EvalSpec)["mode"] is str  # validated against the table, not a second list


def test_published_numbers_file_and_its_errors():
    from gsqbench.modes import MODES
    from gsqbench.report.leaderboard import load_published

    table = load_published()
    leaderboard = LEADERBOARD.read_text()
    for name, entry in table.subjects.items():
        assert f"name: {name}," in leaderboard and entry.mode in MODES and entry.source
    assert table.subjects["llamagen-vq16"].values == {"rfid@inception": 2.19}
    assert "#34" in table.subjects["llamagen-vq16"].notes
    with pytest.raises(UserError, match="'x': value 'fid' is not a finite number of a known metric"):
        load_published("subjects: {x: {values: {fid: 1}, tokenizer: t, kind: k, mode: m, source: s}}")
    with pytest.raises(UserError, match="'x' lacks source"):
        load_published("subjects: {x: {values: {psnr: 1}, tokenizer: t, kind: k, mode: m}}")


def test_leaderboard_report_escapes_subject_names(tmp_path):
    from gsqbench.report.render import _env

    ctx = {"leaderboard": {"ranked": [{"metric": "PSNR", "card_hash": "c" * 64, "note": "", "columns": [],
                                      "footnotes": [], "rows": [{"pos": 1, "label": "<b>x</b>", "kind": "<i>",
                                                                 "rank": {"text": "1"}, "interval": "–", "cells": []}]}],
                           "label": "p", "mark_words": {"best": "b", "tied": "t"},
                           "tables": [{"subject": "<script>", "kinds": "k", "rows": [], "notes": ["<img>"]}]}}
    html = _env().get_template("leaderboard.html.j2").render(**ctx)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<script>" not in html and "<img>" not in html


def test_each_tokenizer_page_lists_its_modes_differences_verbatim():
    from gsqbench.modes import MODES

    pages = {"llamagen-compat": "llamagen.md", "magvit2-compat": "open-magvit2.md", "taming-compat": "taming.md",
             "maskgit-compat": "maskgit.md"}
    assert set(pages) == {m.name for m in MODES.values() if m.tokenizer}
    for mode, page in pages.items():
        text = (ROOT / "docs" / "tokenizers" / page).read_text(encoding="utf-8")
        for line in (*MODES[mode].differences, *MODES[mode].not_reproduced):
            assert f"- {line}\n" in text, (page, line)
