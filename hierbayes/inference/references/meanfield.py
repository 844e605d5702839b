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
:class:`~hierbayes.models.TaskDensity`, so it runs for any hierbayes model and targets exactly
the posterior the NUTS references sample. The ELBO is a sum over tasks of per-task ELBOs with
disjoint variational parameters and Adam is per-coordinate, so fitting all tasks in one SVI run
is fitting each task on its own.

The ``S`` reparameterised draws of a step are an explicit plate
``pyro.plate("particles", S, dim=-2)`` around the model's and the guide's sites, each site
scaled by :math:`1/S` (what ``Trace_ELBO(vectorize_particles=True)`` does, made visible). The
model samples ``phi`` ``(S, T, D)`` inside the particle and task plates, *leaves both* to
evaluate the density on the flattened ``(S·T, D)`` draws in one call (a density re-runs the
user's Pyro program, which opens its own plates, so it is evaluated outside every plate), and
re-enters them for ``pyro.factor``. ``AutoNormal`` is built on the task plate alone, so its
means and scales are ``(T, D)``, shared by the particles.

Settings (defaults): ``num_steps`` = 2000 Adam steps (``ClippedAdam``, learning rate 0.02
decayed geometrically to 0.1 of it), ``num_particles`` = 8 reparameterised draws per step,
means initialised at ``init`` (default the prior mean :math:`\mathbb E[\phi\mid\hat\theta]`,
MAML's starting point) and standard deviations at ``init_scale`` = 0.05. Each run works in a
fresh scope of Pyro's parameter store (``pyro.get_param_store().scope()``) and a forked torch
RNG seeded with ``seed``: nothing leaks into, or is read from, global state.

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
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from torch import Tensor

from hierbayes.inference.core.joint import log_joint as core_log_joint
from hierbayes.inference.posteriors.gaussian import GaussianTaskPosterior
from hierbayes.inference.references.target import resolve_density
from hierbayes.models.density import TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = ["MeanFieldPosterior", "meanfield_vi"]


class MeanFieldPosterior(GaussianTaskPosterior):
    r""":math:`\prod_d \mathcal N(\phi_{jd};\, m_{jd}, v_{jd}^2)` per task.

    It predicts by sampling (default) or linearised, as every
    :class:`~hierbayes.inference.posteriors.gaussian.GaussianTaskPosterior`.

    Attributes
    ----------
    mean, scale:
        ``(T, D)`` variational means :math:`m` and standard deviations :math:`v`.
    elbo:
        The ELBO (summed over tasks) at each step, a list of floats.
    wall_time:
        Seconds the fit took.
    settings:
        The fit's settings.
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
        r""":math:`m_j + v_j \odot z_{sj}` for standard-normal ``z`` ``(S, T, D)``."""
        return self.mean + self.scale * z

    def covariance_quad(self, J: Tensor) -> Tensor:
        r""":math:`\sum_d J_{jrd}^2 v_{jd}^2` for ``J`` ``(T, R, D)``; ``(T, R)``."""
        return (J.square() * self.variance.to(J).unsqueeze(1)).sum(-1)


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
        A hierbayes model (any Pyro program following the contract) or its
        :class:`~hierbayes.models.TaskDensity`.
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
    T, S = tasks.num_tasks, num_particles
    with torch.no_grad():
        start = density.prior_mean(params, x) if init is None else init
    D = start.shape[-1]
    start = start.detach().expand(T, D).clone()

    def repeat(value: Tensor) -> Tensor:
        """``(T, ...)`` to ``(S·T, ...)``, particle-major like ``phi.reshape(S * T, D)``."""
        return value.unsqueeze(0).expand(S, *value.shape).reshape(S * T, *value.shape[1:])

    xs, ys = repeat(x), repeat(y)
    masks = None if mask is None else repeat(mask)

    def log_joint(phi: Tensor) -> Tensor:
        r""":math:`\log p(y^s_j\mid\phi) + \log p(\phi\mid\hat\theta)` of draws ``(S, T, D)``,
        ``(S, T)``: one density call, outside every plate."""
        flat = phi.reshape(S * T, D)
        # the globals are held fixed: the program's pyro.param sites (a PyroModule's own
        # parameters) stay out of SVI's parameter capture, so the fit never trains them
        with poutine.block(hide_types=["param"]):
            return core_log_joint(density, params, flat, xs, ys, masks).reshape(S, T)

    def sample_phi() -> Tensor:
        """The flat site ``phi``, in the task plate (and the particle plate) entered by the caller."""
        phi: Tensor = pyro.sample("phi", dist.ImproperUniform(constraints.real_vector, (T,), (D,)))
        return phi

    def task_latent() -> Tensor:
        """The latent ``phi`` of every task: what ``AutoNormal`` approximates (its prototype)."""
        with pyro.plate("tasks", T, dim=-1):
            return sample_phi()

    def potential_model() -> None:
        # each plate is made once and entered twice, so its subsample site is recorded once
        particles, tasks_plate = pyro.plate("particles", S, dim=-2), pyro.plate("tasks", T, dim=-1)
        with particles, tasks_plate:
            phi = sample_phi()  # (S, T, D)
        value = log_joint(phi)  # outside the plates: the density opens its own
        with particles, tasks_plate:
            pyro.factor("log_joint", value)

    started = time.perf_counter()
    history: list[float] = []
    devices = [x.device] if x.device.type == "cuda" else []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        approximation = AutoNormal(
            task_latent, init_loc_fn=init_to_value(values={"phi": start}), init_scale=init_scale
        )

        def guide() -> None:
            with pyro.plate("particles", S, dim=-2):
                approximation()

        decay = final_lr_ratio ** (1.0 / num_steps)
        optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay})
        # each particle's sites weigh 1/S: the loss is the ELBO averaged over the particles
        svi = SVI(
            poutine.scale(potential_model, scale=1.0 / S),
            poutine.scale(guide, scale=1.0 / S),
            optim,
            loss=Trace_ELBO(max_plate_nesting=2),
        )
        for _ in range(num_steps):
            history.append(-float(svi.step()))
        with torch.no_grad():
            loc = approximation.locs.phi.detach().clone()
            scale = approximation.scales.phi.detach().clone()
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
