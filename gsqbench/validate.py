"""Cross-stage validation of a parsed suite, before any training: everything config.py (a leaf) cannot check alone.

`validate_suite(suite)` checks, with one-line UserErrors naming the config key:
- each run's quantizer block against the registered quantizer's signature (name, kwargs, types);
- the regress tolerances (gsqbench.regress.parse_tolerance);
- the backbone preset and its overrides (gsqbench.models.tokenizer.resolve_model_config);
- the eval spec: metric names against the metric registry (gsqbench.evaluate.EvalSettings);
- the discriminator name and options against the discriminator registry;
- loaded subjects (`load: PATH`): the file or folder exists; the eval mode fits each run (a tokenizer's compat
  mode only for subjects loaded from its releases; a mode's crop protocol for its evaluation images).
The runner and the `run`/`train` commands call it; tests that build suites directly call it too.
"""
from __future__ import annotations

from typing import Any, Mapping

from gsqbench.config import RunSpec, SharedSpec, Suite, expand_runs
from gsqbench.errors import UserError, did_you_mean


def validate_quantizer_kwargs(qspec: Mapping[str, Any], where: str) -> None:
    """Check name and kwargs against the registered quantizer's signature, without building it."""
    from gsqbench import registry

    reg = registry.discover_quantizers()
    name = qspec.get("name")
    if name not in reg:
        raise UserError(f"{where}: unknown quantizer {name!r}{did_you_mean(str(name), reg.names())}")
    kwargs = {k: v for k, v in qspec.items() if k != "name"}
    registry.check_kwargs(reg.get(name), kwargs, where=f"{where} {name!r}")


def validate_tolerances(tolerances: Mapping[str, Any]) -> None:
    from gsqbench.regress import parse_tolerance

    for metric, tol in tolerances.items():
        parse_tolerance(tol, f"config key 'regress.{metric}'")


def validate_discriminator(shared: SharedSpec) -> None:
    from gsqbench import registry

    g = shared.gan
    if g.discriminator == "none":
        return
    reg = registry.discover_discriminators()
    if g.discriminator not in reg:
        valid = ["none", *reg.names()]
        raise UserError(f"config key 'shared.gan.discriminator': {g.discriminator!r} is not valid"
                        f"{did_you_mean(g.discriminator, valid)} (valid: {', '.join(valid)})")
    registry.check_kwargs(reg.get(g.discriminator), dict(g.options),
                          where=f"config key 'shared.gan.options' (discriminator {g.discriminator!r})")


def validate_shared(shared: SharedSpec) -> None:
    """Check the parts later stages interpret (backbone preset/overrides, eval settings, discriminator)."""
    from gsqbench.evaluate import EvalSettings
    from gsqbench.models.tokenizer import resolve_model_config

    m = shared.model
    resolve_model_config({"preset": m.preset, "latent_dim": m.latent_dim, **m.options})
    EvalSettings.from_spec(shared.eval)
    if shared.eval.fid_reference_stats:  # read at evaluation, i.e. after training: check the path before it
        from gsqbench.io import check_input_file

        check_input_file(shared.eval.fid_reference_stats, "config key 'shared.eval.fid_reference_stats'")
    validate_discriminator(shared)


def validate_mode(run: RunSpec) -> None:
    """The run's eval mode fits it: a mode reproducing one tokenizer's protocol (gsqbench.modes `tokenizer`) is for
    subjects loaded from that tokenizer's releases (checked against the release kind when it is read), never for
    a trained subject; a mode that prescribes a crop protocol gets evaluation images of that crop."""
    from gsqbench.modes import check_mode

    mode = check_mode(run.shared.eval.mode, "config key 'shared.eval.mode'")
    if mode.tokenizer is not None and not run.loaded:
        raise UserError(f"config key 'shared.eval.mode': {mode.name!r} reproduces the {mode.tokenizer} protocol and "
                        f"applies to subjects loaded from {mode.tokenizer} releases; subject '{run.subject}' is "
                        "trained (use gsqbench or gsq-compat)")
    crop = run.shared.data.eval.crop
    if mode.crop is not None and crop != mode.crop:
        raise UserError(f"config key 'shared.data.eval.crop': {crop!r} does not fit eval.mode {mode.name!r}, which "
                        f"evaluates {mode.crop!r} crops; set shared.data.eval.crop: {mode.crop}")


def validate_runs(runs: list[RunSpec]) -> None:
    from gsqbench.effective import release_file

    for run in runs:
        if run.loaded:
            release_file(run.load)  # type: ignore[arg-type]
        else:
            validate_quantizer_kwargs(run.quantizer, f"subject '{run.subject}' quantizer")
        validate_mode(run)
    for shared in {r.fairness_hash: r.shared for r in runs}.values():
        validate_shared(shared)


def validate_suite(suite: Suite, only: list[str] | None = None) -> Suite:
    """All cross-stage checks of `suite` (see the module docstring), of the runs of the `only` subjects when given
    (a loaded subject left out need not exist); returns it unchanged."""
    validate_tolerances(suite.regress)
    validate_runs(expand_runs(suite, only))
    return suite
