"""Every objective's Pyro road takes the model's values from the replayed trace (issue 19,
break 2): ``poutine.condition`` of a global changes every loss as it changes MAML's, the
hyperprior is scored where the likelihood is, ``poutine.scale`` scales and, without handlers,
the Pyro road (likelihood terms scored from the model's trace) equals the fast road (the
core's density functions) in value and gradient.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference import MAMLObjective, TruncatedGradientGuide, llama_objective
from hierbayes.inference.core.losses import hyperprior_term
from hierbayes.models import NeuralRegression
from hierbayes.tasks import TaskBatch
from tests.helpers import regression_batch, tiny_mlp
from tests.programs import family_tasks

TOL = dict(rtol=1e-9, atol=1e-10)
# whether a network's modes converge in 5 steps is not what is tested here: both roads evaluate
# the same iterate, converged or not
pytestmark = pytest.mark.filterwarnings("ignore:the Laplace evidence's mode search stopped")
#: (objective, options): every LLAMA objective and predictive approximation
OBJECTIVES = [
    ("maml", {}),
    ("predictive", {"num_samples": 6}),
    ("evidence", {}),
    ("paper", {"eta": 0.1}),
]
J = 10


def studentt(x: Tensor, y: Tensor | None = None) -> None:
    """A plain program with a global noise scale and a heavy-tailed likelihood."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    noise = pyro.sample("noise_scale", dist.LogNormal(-0.5, 0.5))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.StudentT(4.0, mean, noise), obs=None if y is None else y[..., 0])


def _objective(name: str, options: dict) -> object:  # type: ignore[type-arg]
    return MAMLObjective(J) if name == "maml" else llama_objective(J, name, **options)


def _case(kind: str) -> tuple[object, TaskBatch]:
    if kind == "program":
        return studentt, family_tasks("studentt", T=4, N=7, M=5)
    return NeuralRegression(tiny_mlp(3)), regression_batch(T=4, N=6, M=5)


def _fast(objective, guide, batch, params):  # type: ignore[no-untyped-def]
    """The fast road at the given global values, with phi adapted by the guide's own."""
    density = guide.density
    phi = guide.adapt(guide.global_values(), batch.support_x, batch.support_y)
    losses = objective.task_losses(density, params, phi, batch).values
    return losses.mean() + hyperprior_term(density, params, batch.support_x, J)


@pytest.mark.parametrize("kind", ["program", "network"])
@pytest.mark.parametrize(("name", "options"), OBJECTIVES)
def test_the_two_roads_agree_without_handlers(kind: str, name: str, options: dict) -> None:  # type: ignore[type-arg]
    model, batch = _case(kind)
    guide = TruncatedGradientGuide(model, batch, inner_steps=1, step_size=0.02)
    objective = _objective(name, options)
    torch.manual_seed(3)
    pyro_road = objective.differentiable_loss(model, guide, batch)  # type: ignore[attr-defined]
    parameters = list(guide.parameters())
    pyro_grads = torch.autograd.grad(pyro_road, parameters, allow_unused=True)
    torch.manual_seed(3)
    fast = objective.meta_loss(guide, batch)  # type: ignore[attr-defined]
    fast_grads = torch.autograd.grad(fast, parameters, allow_unused=True)
    assert_close(pyro_road, fast, **TOL)
    for a, b in zip(pyro_grads, fast_grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["program", "network"])
@pytest.mark.parametrize(("name", "options"), OBJECTIVES)
def test_conditioning_a_global_conditions_every_loss(kind: str, name: str, options: dict) -> None:  # type: ignore[type-arg]
    model, batch = _case(kind)
    guide = TruncatedGradientGuide(model, batch, inner_steps=1, step_size=0.02)
    objective = _objective(name, options)
    noise = torch.tensor(0.37)
    conditioned = poutine.condition(model, data={"noise_scale": noise})
    torch.manual_seed(5)
    plain = objective.differentiable_loss(model, guide, batch)  # type: ignore[attr-defined]
    torch.manual_seed(5)
    got = objective.differentiable_loss(conditioned, guide, batch)  # type: ignore[attr-defined]
    assert not torch.allclose(got, plain)  # the model that is scored is the conditioned one
    params = {**guide.global_values(), "noise_scale": noise}
    torch.manual_seed(5)
    expected = _fast(objective, guide, batch, params)
    assert_close(got, expected, **TOL)


@pytest.mark.parametrize(("name", "options"), OBJECTIVES)
def test_poutine_scale_and_mask_weigh_every_loss_of_a_plain_program(
    name: str, options: dict
) -> None:  # type: ignore[type-arg]
    model, batch = _case("program")
    guide = TruncatedGradientGuide(model, batch, inner_steps=1, step_size=0.02)
    objective = _objective(name, options)
    torch.manual_seed(7)
    plain = objective.differentiable_loss(model, guide, batch)  # type: ignore[attr-defined]
    torch.manual_seed(7)
    with poutine.scale(scale=0.25):
        scaled = objective.differentiable_loss(model, guide, batch)  # type: ignore[attr-defined]
    assert_close(scaled, 0.25 * plain, **TOL)
    with poutine.mask(mask=False):
        masked = objective.differentiable_loss(model, guide, batch)  # type: ignore[attr-defined]
    assert_close(masked, torch.zeros(()), **TOL)
