r"""Mean-field Gaussian variational inference per task, with the globals fixed: a baseline.

For each held-out task :math:`j`, with the meta-learned globals :math:`\hat\theta` held fixed,
Pyro's :class:`~pyro.infer.autoguide.AutoNormal` fits
:math:`q(\phi_j) = \prod_d \mathcal N(\phi_{jd};\, m_{jd}, v_{jd}^2)` by maximising

.. math::

    \mathrm{ELBO}_j = \mathbb E_{q}\big[\log p(y^s_j \mid \phi_j, x^s_j)
                      + \log p(\phi_j \mid \hat\theta)\big] + \mathbb H[q]
    \;\le\; \log p(y^s_j \mid x^s_j, \hat\theta)

(Blei, Kucukelbir & McAuliffe 2017) with reparameterised gradients (Kingma & Welling 2014).
The Pyro model is potential-based: a flat ``ImproperUniform`` site ``phi`` in
``pyro.plate("tasks", T)`` and ``pyro.factor`` of the task's log joint from the model's
:class:`~hierbayes.models.contract.TaskDensity`, so it runs for any hierbayes model and
targets exactly the posterior the NUTS references sample. The ELBO is a sum over tasks of
per-task ELBOs with disjoint variational parameters and Adam is per-coordinate, so fitting all
tasks in one SVI run is fitting each task on its own.

Settings (defaults): ``num_steps`` = 2000 Adam steps (``ClippedAdam``, learning rate 0.02
decayed geometrically to 0.1 of it), ``num_particles`` = 8 reparameterised draws per step
(vectorised), means initialised at ``init`` (default :math:`\hat\theta`, MAML's starting
point) and standard deviations at ``init_scale`` = 0.05. Each run works in a fresh scope of
Pyro's parameter store (``pyro.get_param_store().scope()``) and a forked torch RNG seeded with
``seed``: nothing leaks into, or is read from, global state.

For a linear-Gaussian posterior :math:`\mathcal N(\mu, H^{-1})` the optimum is
:math:`m = \mu`, :math:`v_d^2 = 1/H_{dd}` (the tests check both).

References
----------
1. Blei, Kucukelbir & McAuliffe (2017). Variational inference: a review for statisticians.
   JASA 112.
2. Kingma & Welling (2014). Auto-encoding variational Bayes. ICLR.
3. Kucukelbir, Tran, Ranganath, Gelman & Blei (2017). Automatic differentiation variational
   inference. JMLR 18.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from torch import Tensor

from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.predictive import Prediction
from hierbayes.inference.posteriors.samples import (
    linearized_prediction,
    predict_from_draws,
    resolve_density,
)
from hierbayes.models.contract import TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = ["MeanFieldPosterior", "meanfield_vi"]


class MeanFieldPosterior(TaskPosterior):
    r""":math:`\prod_d \mathcal N(\phi_{jd};\, m_{jd}, v_{jd}^2)` per task.

    Attributes
    ----------
    mean, scale:
        ``(T, D)`` variational means :math:`m` and standard deviations :math:`v`.
    elbo:
        The ELBO (summed over tasks) at each step, a list of floats.
    wall_time:
        Seconds the fit took.
    """

    def __init__(
        self,
        density: TaskDensity,
        params: Mapping[str, Tensor],
        mean: Tensor,
        scale: Tensor,
        *,
        wall_time: float = math.nan,
        elbo: list[float] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(density, params, mean)
        if scale.shape != self.mean.shape:
            raise ValueError(
                f"scale must match mean's shape {tuple(self.mean.shape)}; got {tuple(scale.shape)}"
            )
        self.scale = scale.detach()
        self.wall_time = float(wall_time)
        self.elbo = list(elbo or [])
        self.settings = dict(settings or {})

    @property
    def variance(self) -> Tensor:
        """:math:`v^2`, ``(T, D)``."""
        return self.scale.square()

    def covariance(self) -> Tensor:
        r""":math:`\operatorname{diag}(v_j^2)`, ``(T, D, D)``."""
        return torch.diag_embed(self.variance)

    def transform_noise(self, z: Tensor) -> Tensor:
        r""":math:`m_j + v_j \odot z_{sj}` for standard normal ``z`` ``(S, T, D)``."""
        return self.mean + self.scale * z

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(
            (num_samples, *self.mean.shape),
            generator=generator,
            dtype=self.mean.dtype,
            device=self.mean.device,
        )
        return self.transform_noise(z)

    def predict(
        self,
        x: Tensor,
        *,
        method: str = "sampled",
        num_samples: int = 400,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> Prediction:
        """Predictive at ``x`` ``(T, M, ...)``: ``"sampled"`` (a mixture over ``num_samples``
        draws, seeded with 0 unless a ``generator`` is given) or ``"linearized"``."""
        if method == "linearized":
            return linearized_prediction(
                self.density,
                self.params,
                self.mean,
                x,
                lambda J, t: (J.square() * self.variance[t]).sum(-1),
            )
        if method != "sampled":
            raise ValueError(f"predict method must be 'sampled' or 'linearized'; got {method!r}")
        if generator is None:
            generator = torch.Generator(device=self.mean.device).manual_seed(0)
        draws = self.sample(num_samples, generator=generator)
        return predict_from_draws(self.density, self.params, draws, x)


def meanfield_vi(
    model_or_density: Any,
    params: Mapping[str, Tensor],
    tasks: TaskBatch,
    *,
    num_steps: int = 2000,
    num_particles: int = 8,
    lr: float = 0.02,
    final_lr_ratio: float = 0.1,
    init: Tensor | None = None,
    init_scale: float = 0.05,
    seed: int = 0,
) -> MeanFieldPosterior:
    r"""Fit a mean-field Gaussian to each task's posterior with Pyro's ``AutoNormal``.

    Parameters
    ----------
    model_or_density:
        A hierbayes model or its :class:`~hierbayes.models.contract.TaskDensity`.
    params:
        The fixed global values :math:`\hat\theta`, ... (e.g. ``fit_result.params``).
    tasks:
        The tasks; their support sets ``(T, N, ...)`` are the data.
    num_steps, num_particles, lr, final_lr_ratio:
        Adam steps, reparameterised draws per step, the initial learning rate and the
        factor it decays to by the last step.
    init, init_scale:
        Initial means ``(T, D)`` or ``(D,)`` (default the prior mean) and standard deviation.
    seed:
        Seeds the run's own RNG (the global torch RNG is restored afterwards).

    Returns
    -------
    :class:`MeanFieldPosterior` with ``wall_time`` and the ELBO history.
    """
    if num_steps < 1 or num_particles < 1:
        raise ValueError(
            f"need num_steps >= 1 and num_particles >= 1; got {num_steps}, {num_particles}"
        )
    density = resolve_density(model_or_density, tasks)
    params = {k: v.detach() for k, v in params.items()}
    x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask
    T = tasks.num_tasks
    with torch.no_grad():
        start = density.prior_mean(params, x) if init is None else init
    D = start.shape[-1]
    start = start.detach().expand(T, D).clone()

    def repeat(value: Tensor, copies: int) -> Tensor:
        """``(T, ...)`` to ``(copies·T, ...)``, particle-major like ``phi.reshape``."""
        return value.unsqueeze(0).expand(copies, *value.shape).reshape(-1, *value.shape[1:])

    def potential_model() -> None:
        with pyro.plate("tasks", T, dim=-1):
            phi = pyro.sample(
                "phi",
                dist.ImproperUniform(constraints.real_vector, (T,), (D,)),
            )
            lead = phi.shape[:-2]  # the vectorised particles, if any
            copies = math.prod(lead)
            flat = phi.reshape(copies * T, D)
            xs = repeat(x, copies)
            masks = None if mask is None else repeat(mask, copies)
            log_joint = density.log_likelihood(params, flat, xs, repeat(y, copies), masks)
            log_joint = log_joint + density.log_prior(params, flat, xs)
            pyro.factor("log_joint", log_joint.reshape(*lead, T))

    started = time.perf_counter()
    history: list[float] = []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        guide = AutoNormal(
            potential_model, init_loc_fn=init_to_value(values={"phi": start}), init_scale=init_scale
        )
        decay = final_lr_ratio ** (1.0 / num_steps)
        optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay})
        elbo = Trace_ELBO(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
        )
        svi = SVI(potential_model, guide, optim, loss=elbo)
        for _ in range(num_steps):
            history.append(-float(svi.step()))
        with torch.no_grad():
            loc = guide.locs.phi.detach().clone()
            scale = guide.scales.phi.detach().clone()
    wall = time.perf_counter() - started
    return MeanFieldPosterior(
        density,
        params,
        loc.reshape(T, D),
        scale.reshape(T, D),
        wall_time=wall,
        elbo=history,
        settings=dict(
            num_steps=num_steps,
            num_particles=num_particles,
            lr=lr,
            final_lr_ratio=final_lr_ratio,
            init_scale=init_scale,
            seed=seed,
        ),
    )
