"""The truncated-gradient guide as a Pyro guide: sites, plates, trace/replay and SVI."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from torch.testing import assert_close

from hierbayes.errors import TaskDataError
from hierbayes.inference import MAMLObjective, TruncatedGradientGuide
from hierbayes.models import NeuralRegression
from tests.helpers import regression_batch, tiny_mlp


def make(**kwargs: object) -> tuple[NeuralRegression, TruncatedGradientGuide]:
    batch = regression_batch()
    model = NeuralRegression(tiny_mlp(5))
    return model, TruncatedGradientGuide(model, batch, **kwargs)  # type: ignore[arg-type]


def test_guide_emits_point_masses_at_the_model_sites_inside_the_tasks_plate() -> None:
    model, guide = make(inner_steps=2, step_size=0.05)
    batch = regression_batch()
    trace = poutine.trace(guide).get_trace(batch.support_x, batch.support_y)
    D = guide.structure.num_params
    assert trace.nodes["theta"]["value"].shape == (D,)
    assert trace.nodes["noise_scale"]["value"].shape == ()
    phi_site = trace.nodes["phi"]
    assert phi_site["value"].shape == (batch.num_tasks, 1, D)
    assert type(phi_site["fn"]).__name__ == "Delta"
    frames = {f.name: f.dim for f in phi_site["cond_indep_stack"]}
    assert frames == {"tasks": -2}
    # replaying the model on the query set puts the adapted phi at the model's own site
    model_trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(
        batch.query_x, batch.query_y
    )
    assert_close(model_trace.nodes["phi"]["value"], phi_site["value"])
    assert not model_trace.nodes["phi"]["is_observed"]
    # and the replayed query log likelihood is the one the MAML objective uses
    model_trace.compute_log_prob()
    per_task = model_trace.nodes["y"]["log_prob"].sum(-1)
    values = guide.global_values()
    phi = guide.adapt(values, batch.support_x, batch.support_y)
    assert_close(per_task, guide.density.log_likelihood(values, phi, batch.query_x, batch.query_y))


def test_guide_needs_support_targets() -> None:
    _, guide = make()
    with pytest.raises(TaskDataError, match="guide\\(support_x, support_y\\)"):
        guide(regression_batch().support_x)


def test_joint_inner_objective_adds_the_prior_gradient() -> None:
    model, guide = make(inner_steps=2, step_size=0.05, inner_objective="joint")
    batch = regression_batch()
    values = guide.global_values()
    theta = values["theta"].detach()
    density = guide.density
    phi = theta.expand(batch.num_tasks, -1).clone()
    for _ in range(2):
        phi = phi.detach().requires_grad_(True)
        total = density.log_likelihood(values, phi, batch.support_x, batch.support_y).sum()
        total = total - 0.5 * ((phi - theta) ** 2).sum() / model.prior_scale_init**2
        (g,) = torch.autograd.grad(total, phi)
        phi = phi + 0.05 * g
    with torch.no_grad():
        got = guide.adapt(values, batch.support_x, batch.support_y)
    assert_close(got, phi.detach())


def test_svi_with_the_maml_objective_trains_the_guide() -> None:
    model, guide = make(inner_steps=1, step_size=0.05, learn_step_size="per_parameter")
    batch = regression_batch(T=6)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss=MAMLObjective())
    before = guide.locs.theta.detach().clone()
    losses = [svi.step(batch) for _ in range(60)]
    assert losses[-1] < losses[0] - 1.0
    assert not torch.allclose(guide.locs.theta.detach(), before)
    # SVI found the guide's parameters through Pyro's parameter store, under the guide's own name
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith(guide._pyro_name) and n.endswith("locs.theta") for n in names)
    assert any(n.endswith("step_size_param") for n in names)
    assert svi.evaluate_loss(batch) == pytest.approx(MAMLObjective().loss(model, guide, batch))


def test_guides_of_models_named_apart_never_share_parameters() -> None:
    """Pyro's own convention: a PyroModule's parameters are named after it, so two models of
    one class trained side by side through SVI are given name= apart (as two AutoNormal guides
    are); their guides then keep their own values under Pyro's handlers."""
    batch = regression_batch()
    a = NeuralRegression(tiny_mlp(5), name="a")
    b = NeuralRegression(tiny_mlp(5), name="b")
    g1 = TruncatedGradientGuide(a, batch)
    g2 = TruncatedGradientGuide(b, batch)
    with torch.no_grad():
        g1.locs.theta_unconstrained.add_(1.0)
    poutine.trace(g1).get_trace(batch.support_x, batch.support_y)
    poutine.trace(g2).get_trace(batch.support_x, batch.support_y)
    assert not torch.allclose(g1.locs.theta, g2.locs.theta)


def test_option_errors() -> None:
    batch = regression_batch()
    model = NeuralRegression(tiny_mlp(3))
    with pytest.raises(ValueError, match="learn_step_size must be"):
        TruncatedGradientGuide(model, batch, learn_step_size="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_size must be positive"):
        TruncatedGradientGuide(model, batch, step_size=0.0)
    with pytest.raises(ValueError, match="inner_objective must be"):
        TruncatedGradientGuide(model, batch, inner_objective="posterior")  # type: ignore[arg-type]


def test_set_global_values_writes_constrained_values_through_their_transform() -> None:
    from hierbayes.models import ContextualEffects
    from hierbayes.tasks import radon_tasks

    tasks = radon_tasks(dtype=torch.float64)
    guide = TruncatedGradientGuide(ContextualEffects(), tasks.batch([0, 1, 2]))
    before = {k: v.detach().clone() for k, v in guide.global_values().items()}
    guide.set_global_values({"tau": torch.tensor(0.25, dtype=torch.float64)})
    after = guide.global_values()
    assert_close(after["tau"].reshape(()), torch.tensor(0.25, dtype=torch.float64))
    for name in ("mu", "w", "sigma"):
        assert_close(after[name], before[name])  # the others untouched
    with pytest.raises(KeyError, match="no global site"):
        guide.set_global_values({"theta": torch.zeros(3)})
