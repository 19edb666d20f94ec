"""Suite config: typed loading, --set overrides, refusals with one-line messages, grid expansion, fairness hash."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from gsqbench.config import apply_overrides, expand_runs, load_suite, parse_override, suite_from_dict
from gsqbench.errors import UserError
from gsqbench.validate import validate_suite

#: fields that cannot change a result (never hashed), and those without effect in `_raw()`'s spec: no
#: discriminator, perceptual weight 0, no LR decay (restated here, not imported, so the oracle is independent)
_RESULT_FREE = [("train", "checkpoint_every"), ("train", "log_every"), ("data", "num_workers"), ("eval", "samples"),
                ("eval", "require"), ("eval", "fid_cache_dir"), ("loss", "perceptual_required"),
                ("eval", "keep_features"), ("eval", "save_recon")]
_NO_EFFECT = [("loss", "adversarial_weight"), ("loss", "perceptual_weight"), ("loss", "perceptual_input_range"),
              ("train", "decay_start"), ("train", "min_lr_ratio")]


def _hashed_json(shared) -> str:
    """Independent oracle of the hashed view: asdict of the shared spec without the result-free and no-effect
    fields, eval.precision null as the fp32 it means, the (unresolved) effective values added."""
    view = json.loads(json.dumps(dataclasses.asdict(shared)))
    for section, key in _RESULT_FREE + _NO_EFFECT:
        del view[section][key]
    view["gan"] = {"discriminator": "none"}
    view["eval"]["precision"] = view["eval"]["precision"] or "fp32"
    view["eval"]["lookup"] = view["eval"]["lookup"] or "exact"  # gsqbench mode's nearest-code lookup
    if view["eval"]["ssim_border"] in (None, "valid"):  # the default SSIM border is not hashed (old hashes kept)
        del view["eval"]["ssim_border"]
    view["effective"] = {"perceptual": "off", "perceptual_trunk_sha256": None, "discriminator": "none",
                         "backbone": None, "backbone_sha256": None, "precision": shared.train.precision,
                         "resolved": False}
    return json.dumps(view, sort_keys=True, separators=(",", ":"))


def _raw(**extra) -> dict:
    raw = {
        "suite": "t",
        "shared": {"model": {"preset": "tiny-f8", "latent_dim": 8}, "train": {"steps": 3, "lr": 1e-3}},
        "subjects": [
            {"name": "gsq", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 64, "groups": 2}},
            {"name": "gsq-g1", "quantizer": {"name": "gsq", "dim": 8, "codebook_size": 64}},
        ],
        "seeds": [0, 1],
    }
    raw.update(extra)
    return raw


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_load_types_and_defaults(tmp_path):
    s = load_suite(_write(tmp_path, _raw()))
    assert s.shared.train.steps == 3 and s.shared.train.lr == 1e-3
    assert s.shared.train.betas == (0.9, 0.99)  # recipe default, tuple after parsing
    assert [x.name for x in s.subjects] == ["gsq", "gsq-g1"] and s.seeds == (0, 1)


def test_fairness_hash_is_sha256_of_canonical_shared_json(tmp_path):
    s = load_suite(_write(tmp_path, _raw()))
    runs = expand_runs(s)
    assert [r.run_id for r in runs] == ["gsq-s0", "gsq-s1", "gsq-g1-s0", "gsq-g1-s1"]
    assert len({r.fairness_hash for r in runs}) == 1
    # independent oracle: hashlib over json.dumps of the plain dict written in the test
    canonical = _hashed_json(s.shared)
    assert runs[0].fairness_hash == hashlib.sha256(canonical.encode()).hexdigest()
    nets = load_suite(_write(tmp_path, _raw()), ["eval.lpips_nets=[alex]"])
    assert expand_runs(nets)[0].fairness_hash == hashlib.sha256(_hashed_json(nets.shared).encode()).hexdigest()
    assert expand_runs(nets)[0].fairness_hash != runs[0].fairness_hash
    # a result-free field and a field without effect here (no discriminator) leave the hash alone
    for override in ("eval.samples=3", "train.checkpoint_every=7", "gan.lr=0.5", "loss.adversarial_weight=3"):
        assert expand_runs(load_suite(_write(tmp_path, _raw()), [override]))[0].fairness_hash == runs[0].fairness_hash
    # eval.precision null means the mode's precision: the same hash as saying it
    said = load_suite(_write(tmp_path, _raw()), ["eval.precision=fp32"])
    assert expand_runs(said)[0].fairness_hash == runs[0].fairness_hash
    # output-only fields (kept features, exported reconstructions) leave the hash alone
    kept = load_suite(_write(tmp_path, _raw()), ["eval.keep_features=true", "eval.save_recon=npz"])
    assert kept.shared.eval.save_recon == "npz" and expand_runs(kept)[0].fairness_hash == runs[0].fairness_hash
    # any shared change moves the hash; a quantizer change does not
    other = load_suite(_write(tmp_path, _raw()), ["train.lr=2e-4"])
    assert expand_runs(other)[0].fairness_hash != runs[0].fairness_hash
    workers = load_suite(_write(tmp_path, _raw()), ["data.num_workers=3"])
    assert expand_runs(workers)[0].fairness_hash == runs[0].fairness_hash
    q = load_suite(_write(tmp_path, _raw()), ["subjects.gsq.quantizer.codebook_size=128"])
    assert expand_runs(q)[0].fairness_hash == runs[0].fairness_hash
    assert expand_runs(q)[0].quantizer["codebook_size"] == 128


def test_set_overrides_are_type_checked(tmp_path):
    p = _write(tmp_path, _raw())
    s = load_suite(p, ["train.steps=7", "shared.train.precision=fp32", "train.betas=[0.5, 0.9]", "seeds=[3]"])
    assert s.shared.train.steps == 7 and s.shared.train.precision == "fp32"
    assert s.shared.train.betas == (0.5, 0.9) and s.seeds == (3,)
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    with pytest.raises(UserError, match=r"'shared.train.steps': 'many' is not valid; expected int"):
        load_suite(p, ["train.steps=many"])
    with pytest.raises(UserError, match=r"'shared.train.precision'.*one of 'bf16', 'fp32'"):
        load_suite(p, ["train.precision=fp16"])
    with pytest.raises(UserError, match=r"unknown config key 'shared.train.lrr'; did you mean 'lr'"):
        load_suite(p, ["train.lrr=1"])
    with pytest.raises(UserError, match="expected key=value"):
        load_suite(p, ["train.lr"])


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["shared"]["train"].update(stpes=3), r"unknown config key 'shared.train.stpes'; did you mean 'steps'"),
    (lambda r: r.update(sutie="x"), r"unknown config key 'sutie'; did you mean 'suite'"),
    (lambda r: r["shared"]["train"].update(steps="3"), r"'shared.train.steps': '3' is not valid; expected int"),
    (lambda r: r["shared"]["train"].update(ema_decay=True), r"'shared.train.ema_decay': True"),
    (lambda r: r["shared"]["model"].update(latent_dim=8.5), r"'shared.model.latent_dim': 8.5"),
    (lambda r: r.update(subjects=[]), r"'subjects'"),
    (lambda r: r["shared"].update(data={"shuffle": False}), r"'shared.data.shuffle' was removed \(it was never read\)"),
    (lambda r: r.update(seeds=[0, 0]), r"'seeds'.*distinct"),
    (lambda r: r["subjects"].append(dict(r["subjects"][0])), r"duplicate subject name 'gsq'"),
])
def test_bad_config_is_one_line_user_error(tmp_path, mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(UserError, match=message) as exc:
        load_suite(_write(tmp_path, raw))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("subject_extra, field", [
    ({"train.lr": 1e-3}, "train.lr"),
    ({"train": {"lr": 1e-3}}, "train.lr"),
    ({"model": {"latent_dim": 16}}, "model.latent_dim"),
    ({"shared": {"x": 1}}, "shared"),
])
def test_subject_may_not_set_shared_fields(tmp_path, subject_extra, field):
    raw = _raw()
    raw["subjects"][1].update(subject_extra)
    with pytest.raises(UserError, match="subjects may only differ in quantizer") as exc:
        load_suite(_write(tmp_path, raw))
    if field != "shared":
        assert f"'{field}' is shared" in str(exc.value)


def test_quantizer_kwargs_checked_at_load_through_registry(tmp_path):
    raw = _raw()
    raw["subjects"][0]["quantizer"]["codebok_size"] = raw["subjects"][0]["quantizer"].pop("codebook_size")
    with pytest.raises(UserError, match=r"codebok_size.*did you mean 'codebook_size'"):
        validate_suite(load_suite(_write(tmp_path, raw)))
    raw = _raw()
    raw["subjects"][0]["quantizer"]["name"] = "gqs"
    with pytest.raises(UserError, match=r"unknown quantizer 'gqs'; did you mean 'gsq'"):
        validate_suite(load_suite(_write(tmp_path, raw)))


def test_grid_expansion_and_hash_per_shared_point(tmp_path):
    raw = _raw(seeds=[0], grid={"model.latent_dim,quantizer.dim": [[8, 8], [16, 16]],
                                "quantizer.codebook_size": [32, 64]})
    raw["subjects"] = raw["subjects"][:1]
    runs = expand_runs(suite_from_dict(raw))
    assert [r.run_id for r in runs] == [
        "gsq-s0-latent_dim8-dim8-codebook_size32", "gsq-s0-latent_dim8-dim8-codebook_size64",
        "gsq-s0-latent_dim16-dim16-codebook_size32", "gsq-s0-latent_dim16-dim16-codebook_size64"]
    assert [r.shared.model.latent_dim for r in runs] == [8, 8, 16, 16]
    assert [r.quantizer["codebook_size"] for r in runs] == [32, 64, 32, 64]
    # quantizer-only grid points share a hash; different shared points never do
    assert runs[0].fairness_hash == runs[1].fairness_hash != runs[2].fairness_hash == runs[3].fairness_hash
    # the point's shared spec is the base spec with only latent_dim changed; hash it independently
    base = suite_from_dict(raw).shared
    expected = dataclasses.replace(base, model=dataclasses.replace(base.model, latent_dim=16))
    canonical = _hashed_json(expected)
    assert runs[2].shared == expected
    assert runs[2].fairness_hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_grid_refuses_unknown_keys(tmp_path):
    with pytest.raises(UserError, match=r"grid.model.latnt_dim.*did you mean 'latent_dim'"):
        suite_from_dict(_raw(grid={"model.latnt_dim": [8]}))
    with pytest.raises(UserError, match=r"'grid.quantizer.groups'.*non-empty list"):
        suite_from_dict(_raw(grid={"quantizer.groups": 2}))


def test_only_and_run_ids_are_safe(tmp_path):
    raw = _raw()
    raw["subjects"][0]["name"] = "../evil name"
    runs = expand_runs(suite_from_dict(raw), only=["../evil name"])
    assert [r.run_id for r in runs] == ["evil_name-s0", "evil_name-s1"]
    with pytest.raises(UserError, match=r"--only 'gsq1': no such subject; did you mean"):
        expand_runs(suite_from_dict(_raw()), only=["gsq1"])


def test_apply_overrides_does_not_mutate_input():
    raw = _raw()
    before = json.dumps(raw, sort_keys=True)
    apply_overrides(raw, ["train.steps=9"])
    assert json.dumps(raw, sort_keys=True) == before


def test_regress_tolerances_checked_and_carried_by_runs():
    runs = expand_runs(suite_from_dict(_raw(regress={"psnr": 0.1, "rfid@inception": "3%"})))
    assert runs[0].spec_json()["regress"] == {"psnr": 0.1, "rfid@inception": "3%"}
    with pytest.raises(UserError, match=r"'regress.psnr'.*tolerance 'lots' is invalid"):
        validate_suite(suite_from_dict(_raw(regress={"psnr": "lots"})))


def test_eval_settings_validated_at_load():
    raw = _raw()
    raw["shared"]["eval"] = {"metrics": ["psnrr"]}
    with pytest.raises(UserError, match=r"unknown metric 'psnrr'; did you mean 'psnr'"):
        validate_suite(suite_from_dict(raw))
    raw["shared"]["eval"] = {"lpips_net": ["alex"]}
    with pytest.raises(UserError, match=r"unknown config key 'shared.eval.lpips_net'; did you mean 'lpips_nets'"):
        suite_from_dict(raw)
    raw["shared"]["eval"] = {"lpips_nets": ["alexnet"]}
    with pytest.raises(UserError, match=r"'shared.eval.lpips_nets\[0\]': 'alexnet' is not valid"):
        suite_from_dict(raw)
    raw["shared"]["eval"] = {"seed": 3}  # fixed by the run, not a suite setting
    with pytest.raises(UserError, match=r"unknown config key 'shared.eval.seed'"):
        suite_from_dict(raw)
    raw["shared"]["eval"] = {"options": {"lpips_nets": ["alex"]}}  # the earlier free-form form says where it went
    with pytest.raises(UserError, match=r"'shared.eval.options' is no longer used; set lpips_nets directly"):
        suite_from_dict(raw)


def test_discriminator_checked_against_the_registry():
    raw = _raw()
    raw["shared"]["gan"] = {"discriminator": "patchgn"}
    with pytest.raises(UserError, match=r"'shared.gan.discriminator': 'patchgn' is not valid; did you mean 'patchgan'"):
        validate_suite(suite_from_dict(raw))
    raw["shared"]["gan"] = {"discriminator": "patchgan", "options": {"filters": 8}}
    with pytest.raises(UserError, match=r"'shared.gan.options'.*unknown option 'filters'"):
        validate_suite(suite_from_dict(raw))


def test_loading_a_suite_imports_no_later_stage():
    """Issue 11: config is a leaf; parsing configs/demo.yaml must not import torch (or the registry)."""
    import subprocess
    import sys

    code = ("import gsqbench.config, sys; gsqbench.config.load_suite('configs/demo.yaml'); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'gsqbench.registry' not in sys.modules, 'registry imported'")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


def test_ssim_border_is_a_gsq_compat_choice_hashed_only_when_not_valid(tmp_path):
    """The default SSIM border (null = valid) keeps every existing fairness hash; reflect-full (torchmetrics >= 1.4.2)
    gets its own, and only gsq-compat may ask for it (the gsqbench protocol pins the valid interior)."""
    compat = ["eval.mode=gsq-compat"]
    base = expand_runs(load_suite(_write(tmp_path, _raw()), compat))[0].fairness_hash
    valid = load_suite(_write(tmp_path, _raw()), [*compat, "eval.ssim_border=valid"])
    assert expand_runs(valid)[0].fairness_hash == base
    full = load_suite(_write(tmp_path, _raw()), [*compat, "eval.ssim_border=reflect-full"])
    validate_suite(full)
    assert expand_runs(full)[0].fairness_hash != base
    with pytest.raises(UserError, match=r"eval.ssim_border: 'reflect-full' is only valid with mode gsq-compat"):
        validate_suite(load_suite(_write(tmp_path, _raw()), ["eval.ssim_border=reflect-full"]))
    with pytest.raises(UserError, match=r"ssim_border"):
        load_suite(_write(tmp_path, _raw()), [*compat, "eval.ssim_border=full"])
