"""fit's settings as three frozen dataclasses (issue 19): the configs and the keyword shortcuts
train the same run, a setting given twice or to a pre-built guide is refused rather than
silently dropped, bad values are refused when a config is built, and the optimiser is chosen
explicitly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hierbayes.inference import GuideConfig, OptimConfig, RunConfig, TruncatedGradientGuide, fit
from hierbayes.models import NeuralRegression
from tests.helpers import regression_batch, tiny_mlp
from tests.programs import family_program, family_tasks


def _model() -> NeuralRegression:
    torch.manual_seed(0)
    return NeuralRegression(tiny_mlp(3))


def test_configs_and_shortcuts_train_the_same_run() -> None:
    batch = regression_batch(T=6)
    a = fit(
        _model(),
        batch,
        guide=GuideConfig(inner_steps=2, step_size=0.02, learn_step_size="scalar"),
        optim=OptimConfig(lr=3e-3, meta_batch_size=4),
        run=RunConfig(meta_steps=5, seed=3, progress=False),
    )
    b = fit(
        _model(),
        batch,
        inner_steps=2,
        step_size=0.02,
        learn_step_size="scalar",
        lr=3e-3,
        meta_batch_size=4,
        meta_steps=5,
        seed=3,
        progress=False,
    )
    for name, value in a.params.items():
        assert torch.equal(value, b.params[name]), name
    assert a.config == b.config


def test_a_setting_given_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="meta_steps= both as a keyword and in its RunConfig"):
        fit(_model(), regression_batch(), run=RunConfig(meta_steps=2), meta_steps=3)
    with pytest.raises(TypeError, match="optim= takes a OptimConfig"):
        fit(_model(), regression_batch(), optim={"lr": 1e-3})  # type: ignore[arg-type]


def test_a_prebuilt_guide_refuses_guide_options_instead_of_dropping_them() -> None:
    batch = regression_batch()
    model = _model()
    guide = TruncatedGradientGuide(model, batch, inner_steps=3, step_size=0.05)
    with pytest.raises(TypeError, match=r"pre-built guide and the guide options \['step_size'\]"):
        fit(model, batch, guide=guide, step_size=0.2, meta_steps=1, progress=False)
    result = fit(model, batch, guide=guide, meta_steps=1, progress=False)
    assert result.config["inner_steps"] == 3 and result.config["step_size"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("config", "field", "value", "message"),
    [
        (GuideConfig, "inner_steps", -1, "inner_steps must be a whole number >= 0; got -1"),
        (GuideConfig, "learn_step_size", "scaler", "learn_step_size must be 'fixed', 'scalar'"),
        (OptimConfig, "algorithm", "sgd", "algorithm must be 'auto', 'adam' or 'lbfgs'; got 'sgd'"),
        (OptimConfig, "lr", 0.0, "lr must be a finite positive number; got 0.0"),
        (OptimConfig, "grad_tolerance", -1.0, "grad_tolerance must be a finite number >= 0"),
        (RunConfig, "meta_steps", 1.5, "meta_steps must be a whole number >= 0; got 1.5"),
        (RunConfig, "checkpoint_every", 5, "checkpoint_every needs checkpoint=PATH"),
        (RunConfig, "dtype", torch.int64, "dtype must be a floating-point torch.dtype"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_built(config, field, value, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config(**{field: value})


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().meta_steps = 5  # type: ignore[misc]


def test_the_optimiser_is_chosen_explicitly() -> None:
    """L-BFGS on a finite task set with query sets (auto would take Adam), and Adam on a
    query-less one (auto would take L-BFGS)."""
    tasks = family_tasks("bernoulli", T=5)
    lbfgs = fit(
        family_program("bernoulli"),
        tasks,
        "llama",
        objective="evidence",
        optim=OptimConfig(algorithm="lbfgs"),
        meta_steps=30,
        progress=False,
    )
    assert lbfgs.convergence is not None and lbfgs.convergence.optimizer == "lbfgs"
    adam = fit(
        family_program("bernoulli"),
        tasks,
        "llama",
        objective="evidence",
        algorithm="adam",
        meta_steps=3,
        progress=False,
    )
    assert adam.convergence is not None and adam.convergence.optimizer == "adam"


def test_a_misspelled_option_names_the_close_one() -> None:
    with pytest.raises(TypeError, match="did you mean 'meta_steps'"):
        fit(_model(), regression_batch(), meta_step=3)
