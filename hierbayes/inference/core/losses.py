r"""The meta-objectives as pure functions: per-task losses of adapted parameters.

Every function takes the model's :class:`~hierbayes.models.TaskDensity`, the global values
``params`` (:math:`\theta`, a noise scale, ...), the adapted :math:`\hat\phi` ``(T, D)`` and a
:class:`~hierbayes.tasks.TaskBatch`, and returns one loss per task, ``(T,)``; the meta-loss
is their mean plus :func:`hyperprior_term`. No global state, no handler inspection: the
objectives (:mod:`hierbayes.inference.objectives`, Pyro losses) and
:func:`~hierbayes.inference.fit` are thin layers over these functions.

MAML (Finn et al. 2017; Grant et al. 2018, eq. 1):
:math:`\ell_j = -\log p(y^q_j\mid\hat\phi_j, x^q_j)`.

LLAMA's paper loss (Grant et al. 2018, Algorithm 4, ML-LAPLACE):
:math:`\ell_j = -\log p(y^q_j\mid\hat\phi_j) + \eta\log\det\hat H_j`.

The Laplace evidence (MATH.md §4): :math:`\ell_j = -\log\hat p(\mathcal D_j\mid\theta)`.

The Laplace predictive is in :mod:`hierbayes.inference.core.predictive`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import transform_to

from hierbayes.inference.core.evidence import laplace_search
from hierbayes.inference.core.laplace import select_data
from hierbayes.inference.core.mode_report import ModeSearch
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureInputs,
    build_curvature,
    output_jacobian,
)
from hierbayes.models.density import Capabilities, NetworkDensity, TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "CurvatureData",
    "HyperpriorSpace",
    "evidence_data",
    "evidence_losses",
    "global_log_jacobian",
    "hyperprior_term",
    "penalty_losses",
    "query_nll",
]

CurvatureData = Literal["support", "query", "both"]


HyperpriorSpace = Literal["constrained", "unconstrained"]


def hyperprior_term(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    x: Tensor,
    num_tasks: int | None,
    space: HyperpriorSpace = "constrained",
) -> Tensor | float:
    r""":math:`-\frac1J \log p(\text{globals})`, or 0 for an endless family (``num_tasks=None``).

    ``space="constrained"`` scores each global's density at its value, as Pyro's ``AutoDelta``
    does (a scale :math:`\tau` by :math:`p(\tau)`); ``"unconstrained"`` scores the density of
    the unconstrained value :math:`u = T^{-1}(\tau)` the optimiser moves, adding
    :func:`global_log_jacobian` (:math:`\log\tau` for a positive scale):
    :math:`\log p_u(u) = \log p(T(u)) + \log\lvert T'(u)\rvert`.
    """
    if num_tasks is None or not density.structure.global_sites:
        return 0.0
    log_prior = density.log_hyperprior(params, x)
    if space == "unconstrained":
        log_prior = log_prior + global_log_jacobian(density, params)
    return -log_prior / num_tasks


def global_log_jacobian(density: TaskDensity, params: Mapping[str, Tensor]) -> Tensor | float:
    r""":math:`\sum_k \log\lvert\det \partial T_k(u_k)/\partial u_k\rvert` over the global
    latents, each :math:`T_k` = ``transform_to(support)`` (0 for real-valued sites)."""
    total: Tensor | float = 0.0
    for site in density.structure.global_sites:
        if site.name not in params:
            continue
        support = site.support
        base = support.base_constraint if isinstance(support, constraints.independent) else support
        if base is constraints.real:
            continue
        value = params[site.name]
        transform = transform_to(support)
        total = total + transform.log_abs_det_jacobian(transform.inv(value), value).sum()
    return total


def query_nll(
    density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
) -> Tensor:
    r"""MAML: :math:`-\log p(y^q_j\mid\hat\phi_j, x^q_j)`, ``(T,)``."""
    xq, yq, mq = batch.require_query("the MAML objective")
    return -density.log_likelihood(params, phi, xq, yq, mq)


def penalty_losses(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    batch: TaskBatch,
    *,
    precision: Tensor,
    eta: float,
    curvature: str | CurvatureBuilder,
    curvature_data: CurvatureData,
    jacobian: str,
    capabilities: Capabilities,
    likelihood: bool = True,
) -> Tensor:
    r"""The paper's loss, :math:`-\log p(y^q_j\mid\hat\phi_j) + \eta\log\det\hat H_j`, ``(T,)``
    (only :math:`\eta\log\det\hat H_j` with ``likelihood=False``).

    With a query-set curvature of a network model, one recorded forward pass of the query set
    serves both terms: its outputs give the likelihood and its output Jacobian is handed to
    the curvature builder (``CurvatureInputs.precomputed``).
    """
    xq, yq, mq = batch.require_query("the paper's LLAMA objective")
    x, y, mask = select_data(
        (batch.support_x, batch.support_y, batch.support_mask), (xq, yq, mq), curvature_data
    )
    inputs = CurvatureInputs(density, params, phi, x, y, mask, precision, create_graph=True)
    if not likelihood:
        return eta * build_curvature(curvature, inputs).logdet()
    shared = curvature_data == "query" and eta > 0 and capabilities.network
    if shared and isinstance(density, NetworkDensity):
        jac, f = output_jacobian(inputs, method=jacobian)
        inputs.precomputed = (jac, f)
        nll = -density.log_likelihood_of_outputs(params, phi, f, yq, mq)
    else:
        nll = -density.log_likelihood(params, phi, xq, yq, mq)
    if eta == 0:
        return nll
    return nll + eta * build_curvature(curvature, inputs).logdet()


def evidence_data(
    batch: TaskBatch,
    curvature_data: CurvatureData,
    query: tuple[Tensor, Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""The data :math:`\mathcal D_j` whose Laplace evidence is taken: ``curvature_data`` of the
    support and query sets (``query`` replaces the batch's own query set, as the model saw it),
    or the support set alone for a batch without a query set (groups as tasks: all of each
    group's data, counted once)."""
    support = (batch.support_x, batch.support_y, batch.support_mask)
    if batch.has_query:
        if query is None:
            query = batch.require_query("the Laplace evidence objective")
        return select_data(support, query, curvature_data)
    if curvature_data == "query":
        batch.require_query("the Laplace evidence of the query set (curvature_data='query')")
    return support


def evidence_losses(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    batch: TaskBatch,
    *,
    precision: Tensor,
    curvature: str | CurvatureBuilder,
    curvature_data: CurvatureData,
    newton_correction: bool,
    mode_steps: int = 0,
    mode_tolerance: float = 1e-2,
) -> tuple[Tensor, ModeSearch]:
    r""":math:`-\log\hat p(\mathcal D_j\mid\theta)` (the Laplace evidence), ``(T,)``, and the
    mode search it was evaluated at.

    From the guide's :math:`\hat\phi_j`, up to ``mode_steps`` damped Newton steps with the
    chosen curvature (:func:`~hierbayes.inference.core.mode.newton_mode`, differentiable) move
    the expansion point to the mode of the task's log joint, where the Laplace evidence is
    the classical one; ``newton_correction`` adds :math:`\tfrac12 g^\top\hat H^{-1}g` at the
    last iterate (exact for the linear-Gaussian model at any point, and below ``mode_tolerance``
    at a converged mode). ``mode_steps=0`` evaluates at :math:`\hat\phi_j` itself.

    A batch without a query set (groups as tasks, empirical Bayes on all of each group's data)
    is scored on its support set alone: :math:`\mathcal D_j` is then the support set, counted
    once, for ``curvature_data`` ``"both"`` (all the data) or ``"support"``.
    """
    x, y, mask = evidence_data(batch, curvature_data)
    search = laplace_search(
        density,
        params,
        phi,
        x,
        y,
        mask,
        curvature=curvature,
        precision=precision,
        mode_steps=mode_steps,
        mode_tolerance=mode_tolerance,
        create_graph=True,
    )
    return -search.log_evidence(newton_correction=newton_correction), search
