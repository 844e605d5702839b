r"""Hyperparameter uncertainty at Laplace cost: a Gaussian over the globals, task posteriors mixed over it.

Empirical Bayes conditions every task on one :math:`\hat\theta`, so its task intervals ignore
the uncertainty in :math:`\theta` and are too narrow where :math:`\theta` is poorly determined
(few groups, a small between-group scale). :func:`hyper_laplace` adds that uncertainty at the cost
of a few Laplace evaluations (Tierney & Kadane 1986; Rue, Martino & Chopin 2009; Kass & Steffey
1989).

**The marginal posterior of the globals.** With :math:`u` the unconstrained globals
(:class:`~hierbayes.inference.posteriors.unconstrained.GlobalCoordinates`, :math:`\theta=T(u)`),

.. math::

    \mathcal L(u) = \sum_j \log \hat p(\mathcal D_j \mid T(u)) + \log p(T(u))
        + \log\lvert\det \partial T/\partial u\rvert ,
    \qquad
    \log \hat p(\mathcal D_j\mid\theta) = \ell_j(\phi^*_j) - \tfrac12\log\det H_j
        + \tfrac D2\log 2\pi ,

the Laplace evidence of each task at its mode :math:`\phi^*_j(\theta)` with the exact Hessian
:math:`H_j = -\nabla^2_\phi \ell_j` of its log joint :math:`\ell_j = \log p(y_j\mid\phi)+\log
p(\phi\mid\theta)` (exact for linear-Gaussian groups: then :math:`\mathcal L` is the exact log
marginal posterior density of :math:`u` up to a constant). :math:`\mathcal L` is maximised by
damped Newton steps from the fit's values, and

.. math::

    p(u\mid\mathcal D) \approx \mathcal N(\hat u, \Sigma_u), \qquad
    \Sigma_u = \big(-\nabla^2_u\mathcal L(\hat u)\big)^{-1},

with the Hessian in float64 by automatic differentiation. :math:`\mathcal L` is differentiated
through :math:`\phi^*_j(\theta)`: from the mode (found without a graph), two exact Newton steps
are re-taken with a graph, which reproduces :math:`\phi^*_j` and its first three derivatives in
:math:`\theta` at :math:`\hat u` (Newton's quadratic convergence), so the Hessian of
:math:`\mathcal L` is exact.

**Task posteriors.** At nodes :math:`u_k` with weights :math:`w_k` (:math:`\sum_k w_k = 1`),
each task's posterior given :math:`\theta_k = T(u_k)` is its Laplace Gaussian
:math:`\mathcal N(\phi^*_j(\theta_k), H_j(\theta_k)^{-1})` (exact for linear-Gaussian groups),
and

.. math::

    p(\phi_j\mid\mathcal D) \approx \sum_k w_k\,
        \mathcal N\big(\phi^*_j(\theta_k), H_j(\theta_k)^{-1}\big),

a mixture with mean :math:`m_j = \sum_k w_k\phi^*_{jk}` and covariance
:math:`\sum_k w_k (H_{jk}^{-1} + \phi^*_{jk}\phi^{*\top}_{jk}) - m_jm_j^\top`. Nodes
(``quadrature``):

* ``"cubature"`` (default): the :math:`2K` points :math:`\hat u \pm \sqrt K L e_i`
  (:math:`LL^\top=\Sigma_u`), weights :math:`1/(2K)`: the third-degree spherical-radial rule,
  exact for polynomials of degree 3 in :math:`u` (Arasaratnam & Haykin 2009);
* ``"draws"``: ``num_nodes`` draws from :math:`\mathcal N(\hat u, \Sigma_u)`, equal weights;
  with ``importance=True`` drawn from the heavier-tailed multivariate Student t
  :math:`t_4(\hat u, \Sigma_u)` and weighted by :math:`\exp\mathcal L(u_k)/t_4(u_k)`
  (self-normalised), which corrects a skewed :math:`p(u\mid\mathcal D)` (a scale's long
  left tail in :math:`\log\tau`) wherever :math:`\mathcal L` is exact (linear-Gaussian
  groups); a warning says when the weights' effective sample size is below a tenth.
* ``"mode"``: the single node :math:`\hat u`: empirical Bayes (type-II MAP in :math:`u`), for
  contrast.

References
----------
1. Tierney & Kadane (1986). Accurate approximations for posterior moments and marginal
   densities. JASA 81.
2. Kass & Steffey (1989). Approximate Bayesian inference in conditionally independent
   hierarchical models (parametric empirical Bayes models). JASA 84.
3. Rue, Martino & Chopin (2009). Approximate Bayesian inference for latent Gaussian models by
   using integrated nested Laplace approximations. JRSS B 71.
4. Arasaratnam & Haykin (2009). Cubature Kalman filters. IEEE TAC 54.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hierbayes.errors import NumericalError, UnconvergedWarning
from hierbayes.inference.core.joint import batched_hessian
from hierbayes.inference.posteriors.global_search import search_globals
from hierbayes.inference.posteriors.hyper_posterior import HyperLaplacePosterior
from hierbayes.inference.posteriors.task_modes import (
    TaskModes,
    log_marginal,
    log_marginal_at_modes,
    task_modes,
)
from hierbayes.inference.posteriors.unconstrained import GlobalCoordinates
from hierbayes.models.density import TaskDensity, task_density
from hierbayes.models.structure import model_structure
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection
from hierbayes.tasks.source import as_batch

__all__ = ["HyperLaplace", "HyperLaplacePosterior", "hyper_laplace", "task_modes"]

Quadrature = Literal["cubature", "draws", "mode"]
#: Degrees of freedom of the Student-t proposal of importance-weighted draws.
IMPORTANCE_DF = 4


@dataclass
class HyperLaplace:
    r"""What :func:`hyper_laplace` returns.

    Attributes
    ----------
    mean, covariance:
        :math:`\hat u` ``(K,)`` and :math:`\Sigma_u` ``(K, K)`` over the unconstrained globals.
    labels:
        A name per entry of :math:`u` (the site, with an index for vector sites).
    coordinates:
        The :class:`~hierbayes.inference.posteriors.unconstrained.GlobalCoordinates` mapping
        :math:`u` to the sites' values.
    params:
        The globals at :math:`T(\hat u)`, the mode of :math:`\mathcal L` (type-II MAP in the
        unconstrained space, with the log-Jacobian).
    log_marginal:
        :math:`\mathcal L(\hat u)`.
    task_posteriors:
        :class:`HyperLaplacePosterior`, the task posteriors integrated over the globals.
    empirical_bayes:
        :class:`HyperLaplacePosterior` with the single node :math:`\hat u` (no hyperparameter
        uncertainty), for contrast.
    newton_steps, gradient_norm:
        Newton steps taken on :math:`\mathcal L` and :math:`\lVert\nabla_u\mathcal L\rVert` at
        the end.
    converged, stop_reason:
        Whether the search over the globals reached its tolerance, and why it stopped (a
        search that ran out of ``max_steps`` or whose line search failed warns).
    wall_time:
        Seconds for everything (optimisation, Hessian, nodes).
    """

    mean: Tensor
    covariance: Tensor
    labels: list[str]
    coordinates: GlobalCoordinates
    params: dict[str, Tensor]
    log_marginal: float
    task_posteriors: HyperLaplacePosterior
    empirical_bayes: HyperLaplacePosterior
    newton_steps: int
    gradient_norm: float
    wall_time: float
    quadrature: str
    converged: bool = True
    stop_reason: str = ""

    @property
    def sd(self) -> Tensor:
        r"""Standard deviations of :math:`u` ``(K,)``."""
        return self.covariance.diagonal().sqrt()

    @property
    def globals(self) -> dict[str, dict[str, Tensor]]:
        r"""Per global site, the Gaussian over its unconstrained value: ``{"mean", "sd"}``."""
        out = {}
        for b in self.coordinates.blocks:
            out[b.name] = {
                "mean": self.mean[b.start : b.stop].reshape(b.unconstrained_shape),
                "sd": self.sd[b.start : b.stop].reshape(b.unconstrained_shape),
            }
        return out

    def sample(
        self, num_samples: int, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        r"""Draws of the globals from :math:`\mathcal N(\hat u, \Sigma_u)`, constrained, each
        ``(num_samples, *site_shape)``."""
        L = torch.linalg.cholesky(self.covariance)
        z = torch.randn(
            (num_samples, self.mean.numel()),
            generator=generator,
            dtype=self.mean.dtype,
            device=self.mean.device,
        )
        with torch.no_grad():
            values, _ = self.coordinates.unpack(self.mean + z @ L.T)
        return {name: values[name] for name in self.coordinates.names}


def _resolve(
    model_or_result: Any, tasks: TaskBatch, params: Mapping[str, Tensor] | None
) -> tuple[TaskDensity, dict[str, Tensor]]:
    result_params = getattr(model_or_result, "params", None)
    guide = getattr(model_or_result, "guide", None)
    if guide is not None and isinstance(getattr(guide, "density", None), TaskDensity):
        density: TaskDensity = guide.density
        start = dict(params if params is not None else (result_params or {}))
    elif isinstance(model_or_result, TaskDensity):
        density = model_or_result
        start = dict(params or {})
    elif callable(model_or_result):
        structure = model_structure(model_or_result, tasks.support_x, tasks.support_y)
        density = task_density(model_or_result, structure, tasks.support_x)
        start = dict(params or {})
    else:
        raise TypeError(
            "hyper_laplace takes a fit's result, a hierbayes model or a TaskDensity; got "
            f"{type(model_or_result).__name__}"
        )
    for site in density.structure.global_sites:
        start.setdefault(site.name, site.prior_mean.to(tasks.support_x))
    return density, {k: v.detach() for k, v in start.items()}


def hyper_laplace(
    model_or_result: Any,
    tasks: TaskBatch | TaskCollection,
    *,
    params: Mapping[str, Tensor] | None = None,
    quadrature: Quadrature = "cubature",
    num_nodes: int = 64,
    importance: bool = False,
    max_steps: int = 50,
    tolerance: float = 1e-9,
    seed: int = 0,
) -> HyperLaplace:
    r"""A Gaussian over the unconstrained globals and task posteriors integrated over it.

    See the module docstring for the mathematics.

    Parameters
    ----------
    model_or_result:
        A :class:`~hierbayes.inference.FitResult` (its model's density and ``params``), a
        hierbayes model (a Pyro program following the contract) or a
        :class:`~hierbayes.models.TaskDensity`.
    tasks:
        The tasks whose data :math:`\mathcal D_j` (the support sets ``(T, N, ...)`` and their
        mask: all of a group's data for a query-less task set) enter the marginal likelihood.
    params:
        Where the search for :math:`\hat u` starts (default the result's ``params``, else the
        globals' prior means); values of ``pyro.param`` sites are held fixed.
    quadrature, num_nodes, importance:
        The nodes of the mixture over the globals: ``"cubature"`` (:math:`2K` points),
        ``"draws"`` (``num_nodes`` draws, optionally importance-weighted by the exact
        :math:`\mathcal L`), or ``"mode"`` (:math:`\hat u` alone: empirical Bayes).
    max_steps, tolerance:
        Newton steps on :math:`\mathcal L` at most, and the Newton decrement
        :math:`\tfrac12\nabla\mathcal L^\top\Sigma_u\nabla\mathcal L` at which they stop.
    seed:
        Seeds the draws of ``"draws"``.

    Returns
    -------
    :class:`HyperLaplace`: ``mean``/``covariance`` of :math:`u`, ``globals``, ``sample``,
    ``task_posteriors`` (with ``mean``, ``sd``, ``covariance()``, ``sample``, ``predict``) and
    ``empirical_bayes`` for contrast.

    Raises
    ------
    NumericalError
        Where :math:`-\nabla^2_u\mathcal L(\hat u)` is not positive definite (the marginal
        likelihood is flat or peaks at a boundary in some direction, as for eight schools'
        :math:`\tau` without a proper prior).
    """
    tasks = as_batch(tasks, "hyper_laplace")
    if quadrature not in ("cubature", "draws", "mode"):
        raise ValueError(f"quadrature must be 'cubature', 'draws' or 'mode'; got {quadrature!r}")
    started = time.perf_counter()
    density, start = _resolve(model_or_result, tasks, params)
    coords = GlobalCoordinates(density, start)
    fixed = {k: v for k, v in start.items() if k not in coords.sites}
    x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask

    def derivatives(u: Tensor, modes: TaskModes) -> tuple[Tensor, Tensor, Tensor]:
        def marginal(point: Tensor) -> Tensor:  # (1, K) -> (1,)
            return log_marginal(point[0], coords, fixed, density, modes.phi, x, y, mask)[None]

        value, grad, hess = batched_hessian(marginal, u[None].detach(), create_graph=False)
        return value[0], grad[0], hess[0]

    def modes_at(u: Tensor, start_phi: Tensor | None) -> TaskModes:
        with torch.no_grad():
            values, _ = coords.unpack(u, fixed)
        return task_modes(density, values, x, y, mask, start=start_phi)

    def value_of(u: Tensor, modes: TaskModes) -> Tensor:
        return log_marginal_at_modes(u, coords, fixed, density, modes, x)

    search = search_globals(
        coords.pack(start).detach(),
        modes_at,
        value_of,
        derivatives,
        max_steps=max_steps,
        tolerance=tolerance,
    )
    u, modes, value, grad, hess = search.u, search.modes, search.value, search.grad, search.hess
    if not search.converged:
        warnings.warn(
            f"hyper_laplace stopped before the optimum of the log marginal posterior of the "
            f"globals: {search.reason}. The Gaussian over the globals is centred off the mode "
            f"(gradient norm {float(grad.norm()):.3g}). Raise max_steps (now {max_steps}), "
            "start from a converged fit (hyper_laplace(fit(...), tasks)), or compute in float64; "
            "HyperLaplace.converged and .stop_reason record it",
            UnconvergedWarning,
            stacklevel=2,
        )
    precision = -hess
    L, info = torch.linalg.cholesky_ex(precision)
    if int(info) != 0:
        raise NumericalError(
            "the log marginal posterior of the unconstrained globals is not concave at its "
            f"optimum (eigenvalues of its Hessian {torch.linalg.eigvalsh(hess).tolist()}): no "
            "Gaussian approximation. The marginal likelihood may peak at a boundary (a scale "
            "at 0): use the full-Bayes reference (nuts_full_bayes)."
        )
    covariance = torch.cholesky_inverse(L)
    factor = torch.linalg.cholesky(covariance)
    K = u.numel()
    if quadrature == "cubature":
        offsets = math.sqrt(K) * torch.cat([factor.T, -factor.T])
        nodes = u + offsets
        weights = torch.full((2 * K,), 1.0 / (2 * K), dtype=u.dtype)
    elif quadrature == "draws":
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((num_nodes, K), generator=g, dtype=u.dtype)
        if importance:  # a heavier-tailed proposal: multivariate Student t, IMPORTANCE_DF dof
            normals = torch.randn((num_nodes, int(IMPORTANCE_DF)), generator=g, dtype=u.dtype)
            scale = (normals.square().sum(-1) / IMPORTANCE_DF).rsqrt()
            z = z * scale.unsqueeze(-1)
        nodes = u + z @ factor.T
        weights = torch.full((num_nodes,), 1.0 / num_nodes, dtype=u.dtype)
    else:
        nodes = u.unsqueeze(0)
        weights = torch.ones(1, dtype=u.dtype)
    node_modes = [modes_at(node, modes.phi) for node in nodes]
    if importance and quadrature == "draws":
        nu = IMPORTANCE_DF
        log_q = -0.5 * (nu + K) * torch.log1p(z.square().sum(-1) / nu)
        with torch.no_grad():
            log_p = torch.stack(
                [
                    log_marginal_at_modes(node, coords, fixed, density, m, x)
                    for node, m in zip(nodes, node_modes, strict=True)
                ]
            )
        weights = torch.softmax(log_p - log_q, 0)
        ess = float(1.0 / weights.square().sum())
        if ess < 0.1 * num_nodes:
            warnings.warn(
                f"importance weights over the globals are uneven (ESS {ess:.1f} of {num_nodes}): "
                "the Gaussian over the globals is a poor proposal; results are noisy",
                UserWarning,
                stacklevel=2,
            )
    with torch.no_grad():
        node_values, _ = coords.unpack(nodes, fixed)
        mode_values, _ = coords.unpack(u, fixed)

    def posterior(index: list[int], w: Tensor, at: dict[str, Tensor]) -> HyperLaplacePosterior:
        means = torch.stack([node_modes[i].phi for i in index]) if index else modes.phi[None]
        hessians = (
            torch.stack([node_modes[i].hessian for i in index]) if index else modes.hessian[None]
        )
        return HyperLaplacePosterior(
            density,
            mode_values,
            fixed,
            at,
            means,
            torch.cholesky_inverse(torch.linalg.cholesky(hessians)),
            w,
            wall_time=time.perf_counter() - started,
        )

    names = coords.names
    mixed = posterior(list(range(len(nodes))), weights, {n: node_values[n] for n in names})
    single = posterior([], torch.ones(1, dtype=u.dtype), {n: mode_values[n][None] for n in names})
    wall = time.perf_counter() - started
    mixed.wall_time = wall
    return HyperLaplace(
        mean=u.detach(),
        covariance=covariance,
        labels=coords.labels(),
        coordinates=coords,
        params={k: v.detach() for k, v in mode_values.items()},
        log_marginal=float(value),
        task_posteriors=mixed,
        empirical_bayes=single,
        newton_steps=search.steps,
        gradient_norm=float(grad.norm()),
        converged=search.converged,
        stop_reason=search.reason,
        wall_time=wall,
        quadrature=quadrature,
    )
