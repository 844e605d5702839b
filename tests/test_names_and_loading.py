"""Parameter names that do not depend on how many models a process built, loading a run into
another model of its class, and mismatch messages that say what differs."""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.testing import assert_close

import hierbayes
from hierbayes.inference import CheckpointError, TruncatedGradientGuide, fit
from hierbayes.inference.references.meanfield import meanfield_vi
from hierbayes.inference.references.nuts_pyro import nuts_pyro
from hierbayes.models import BayesianLinearRegression, NeuralRegression, model_structure
from hierbayes.models.param_store import claim_param_store, module_param_sites
from hierbayes.tasks import TaskBatch
from tests.helpers import regression_batch, tiny_mlp


def regression(**kwargs: object) -> NeuralRegression:
    """A model whose theta and prior scale are ``pyro.param`` sites (PyroParams)."""
    return NeuralRegression(
        tiny_mlp(6),
        learn_prior_scale=True,
        prior_scale_hyperprior=None,
        hyperprior_scale=None,
        **kwargs,  # type: ignore[arg-type]
    )


def param_names(model: object, batch: TaskBatch) -> list[str]:
    trace = poutine.trace(model).get_trace(batch.support_x, batch.support_y)  # type: ignore[arg-type]
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


def snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module: torch.nn.Module, expected: dict[str, Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_site_names_are_the_same_for_the_first_and_the_fifth_model_built() -> None:
    batch = regression_batch()
    models = [regression() for _ in range(5)]
    first, fifth = param_names(models[0], batch), param_names(models[4], batch)
    assert first == fifth == ["NeuralRegression.theta", "NeuralRegression.prior_scale_param"]
    guides = [TruncatedGradientGuide(m, batch, learn_step_size="scalar") for m in models[:2]]
    assert [g.structure.param_sites for g in guides] == [tuple(first)] * 2
    assert param_names(BayesianLinearRegression(1, hyperprior_scale=None), batch) == [
        "BayesianLinearRegression.theta"
    ]


def test_name_sets_two_models_of_one_class_apart_for_svi_side_by_side() -> None:
    """Pyro's convention: two modules of one name share the store; name= keeps them apart,
    and each model's guide takes its model's name."""
    batch = regression_batch()
    a, b = regression(name="a"), regression(name="b")
    assert param_names(a, batch) == ["a.theta", "a.prior_scale_param"]
    ga = TruncatedGradientGuide(a, batch, learn_step_size="scalar")
    gb = TruncatedGradientGuide(b, batch, learn_step_size="scalar")
    args = (batch.support_x, batch.support_y)
    svi_a = SVI(a, ga, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi_b = SVI(b, gb, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi_a.step(*args)
    trained_a, trained_ga = snapshot(a), snapshot(ga)
    start_b, start_gb = snapshot(b), snapshot(gb)
    svi_b.step(*args)
    svi_b.step(*args)
    assert_state_equal(a, trained_a)  # training b moved nothing of a or of a's guide
    assert_state_equal(ga, trained_ga)
    assert not torch.equal(b.state_dict()["theta_unconstrained"], start_b["theta_unconstrained"])
    assert not torch.equal(
        gb.state_dict()["locs.noise_scale_unconstrained"],
        start_gb["locs.noise_scale_unconstrained"],
    )
    names = set(pyro.get_param_store().keys())
    assert {"a.theta", "b.theta", "TruncatedGradientGuide_a.locs.noise_scale"} <= names
    assert {
        "TruncatedGradientGuide_b.locs.noise_scale",
        "TruncatedGradientGuide_b.step_size_param",
    } <= names
    assert set(map(id, gb.parameters())).isdisjoint(map(id, ga.parameters()))


def test_a_run_loads_into_the_third_model_of_its_class_and_predicts_bit_for_bit(
    tmp_path: Path,
) -> None:
    batch = regression_batch()
    a = regression()
    result = fit(a, batch, meta_steps=3, lr=0.05, progress=False)
    path = result.save(tmp_path / "run.pt")
    expected = result.predict(batch)
    with torch.no_grad():  # a moves on after saving; loading must neither read nor write it
        a.theta = a.theta + 1.0
    moved = snapshot(a)
    b, c = regression(), regression()
    loaded = hierbayes.load(path, model=c)
    assert_state_equal(a, moved)
    got = loaded.predict(batch)
    assert torch.equal(got.mean, expected.mean) and torch.equal(got.variance, expected.variance)
    assert set(map(id, c.parameters())).isdisjoint(map(id, a.parameters()))
    del b
    pyro.clear_param_store()  # as in a fresh process
    again = hierbayes.load(path, model=regression()).predict(batch)
    assert torch.equal(again.mean, expected.mean)


def test_the_file_holds_a_module_models_parameters_by_its_state_dict_only(tmp_path: Path) -> None:
    batch = regression_batch()
    result = fit(regression(), batch, meta_steps=2, lr=0.05, progress=False)
    state = torch.load(result.save(tmp_path / "run.pt"), weights_only=True)
    assert state["model"]["param_store"] == {}
    assert {"theta_unconstrained", "prior_scale_param_unconstrained"} <= set(
        state["model"]["state"]
    )


def test_fitting_a_second_model_leaves_the_first_alone_and_starts_from_its_own_values() -> None:
    batch = regression_batch()
    a = regression()
    fit(a, batch, meta_steps=3, lr=0.05, progress=False)
    trained_a = snapshot(a)
    b = regression()
    start_b = snapshot(b)
    assert not torch.equal(start_b["theta_unconstrained"], trained_a["theta_unconstrained"])
    fit(b, batch, meta_steps=0, progress=False)
    assert_state_equal(b, start_b)  # b starts from its own values, not from a's
    fit(b, batch, meta_steps=3, lr=0.05, progress=False)
    assert_state_equal(a, trained_a)
    assert not torch.equal(b.state_dict()["theta_unconstrained"], start_b["theta_unconstrained"])
    assert set(map(id, b.parameters())).isdisjoint(map(id, a.parameters()))


class ModuleProgram(PyroModule):
    """A user's PyroModule program (no native density): theta a PyroParam."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__(name="ModuleProgram")
        self.theta = PyroParam(theta)

    def forward(self, x: Tensor, y: Tensor | None = None) -> None:
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(self.theta, 1.0).to_event(1))
            mean = x[..., 0] * phi[..., 0] + phi[..., 1]
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


@pytest.mark.parametrize("sampler", ["nuts", "meanfield"])
def test_a_reference_sampler_on_a_second_model_uses_its_own_values(sampler: str) -> None:
    batch = regression_batch(T=2)
    a = ModuleProgram(torch.tensor([3.0, -2.0]))
    result_a = fit(a, batch, meta_steps=2, lr=0.05, progress=False)
    b = ModuleProgram(torch.tensor([-1.0, 0.5]))
    fit(b, batch, meta_steps=0, progress=False)  # the store now holds b's tensor
    trained_a = snapshot(a)

    def run(target: object) -> object:
        if sampler == "nuts":
            return nuts_pyro(target, {}, batch, num_warmup=2, num_samples=4, num_chains=1)
        return meanfield_vi(target, {}, batch, num_steps=2, num_particles=1)

    # a's own density, after b: its runs of a's program read a's theta, not b's
    posterior = run(result_a.guide.density)
    assert_state_equal(a, trained_a)
    assert_close(
        posterior.density.prior_mean({}, batch.support_x),  # type: ignore[attr-defined]
        trained_a["theta_unconstrained"].expand(2, 2),
        rtol=0,
        atol=0,
    )
    start_b = snapshot(b)
    posterior = run(b)
    assert_state_equal(b, start_b)
    assert_state_equal(a, trained_a)
    assert_close(
        posterior.density.prior_mean({}, batch.support_x),  # type: ignore[attr-defined]
        torch.tensor([-1.0, 0.5]).expand(2, 2),
        rtol=0,
        atol=0,
    )


def test_claiming_the_store_removes_only_another_tensor() -> None:
    batch = regression_batch()
    a, b = regression(), regression()
    names = module_param_sites(a, batch.support_x[:1], batch.support_y[:1])
    assert names == ("NeuralRegression.theta", "NeuralRegression.prior_scale_param")
    assert len(pyro.get_param_store()) == 0  # discovering the names leaves the store alone
    own_a = a.theta_unconstrained
    param_names(a, batch)  # a's tensors now stand in the store
    claim_param_store(a, names)  # a's own: left alone
    store = pyro.get_param_store()
    assert store.get_param("NeuralRegression.theta").unconstrained() is a.theta_unconstrained  # type: ignore[attr-defined]
    claim_param_store(b, names)  # another's: removed, so b's next run enters its own
    assert "NeuralRegression.theta" not in store
    param_names(b, batch)
    assert store.get_param("NeuralRegression.theta").unconstrained() is b.theta_unconstrained  # type: ignore[attr-defined]
    model_structure(a, batch.support_x, batch.support_y)  # hierbayes' own trace claims first
    assert a.theta_unconstrained is own_a
    assert store.get_param("NeuralRegression.theta").unconstrained() is own_a  # type: ignore[attr-defined]


def test_loading_into_a_model_built_otherwise_lists_what_differs(tmp_path: Path) -> None:
    batch = regression_batch()
    result = fit(NeuralRegression(tiny_mlp(6)), batch, meta_steps=1, progress=False)
    path = result.save(tmp_path / "run.pt")
    with pytest.raises(CheckpointError) as info:
        hierbayes.load(path, model=NeuralRegression(tiny_mlp(8), learn_prior_scale=True))
    message = str(info.value)
    assert "theta_init: saved (19,), this model (25,)" in message, message
    assert "Error(s) in loading" not in message


def test_a_builtin_model_mismatch_lists_the_constructor_arguments(tmp_path: Path) -> None:
    batch = regression_batch(d=2)
    result = fit(BayesianLinearRegression(2), batch, meta_steps=1, progress=False)
    path = result.save(tmp_path / "run.pt")
    with pytest.raises(CheckpointError) as info:
        hierbayes.load(path, model=BayesianLinearRegression(2, bias=True, hyperprior_scale=None))
    message = str(info.value)
    assert "theta_init: saved (2,), this model (3,)" in message, message
    assert "this model has parameters the saved run lacks: theta_unconstrained" in message
    assert "bias: saved False, this model True" in message
    assert "hyperprior_scale: saved 10.0, this model None" in message


def test_a_file_from_when_names_counted_models_still_loads(tmp_path: Path) -> None:
    """Files written before kept a module model's parameters in the store by their counted
    names too; the module's state_dict restores them, so those entries are skipped."""
    batch = regression_batch()
    result = fit(regression(), batch, meta_steps=2, lr=0.05, progress=False)
    state = result.state_dict()
    theta = state["model"]["state"]["theta_unconstrained"]
    state["model"]["param_store"] = {"NeuralRegression_0.theta": theta + 5.0}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    pyro.clear_param_store()
    loaded = hierbayes.load(path, model=regression())
    assert torch.equal(loaded.predict(batch).mean, result.predict(batch).mean)
