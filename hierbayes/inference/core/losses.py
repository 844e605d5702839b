r"""The meta-objectives as pure functions: per-task losses of adapted parameters.

Every function takes the model's :class:`~hierbayes.models.TaskDensity`, the global values
``params`` (:math:`\theta`, a noise scale, ...), the adapted :math:`\hat\phi` ``(T, D)`` and a
:class:`~hierbayes.tasks.TaskBatch`, and returns one loss per task, ``(T,)``; the meta-loss
is their mean plus :func:`hyperprior_term`. No global state, no handler inspection: the Pyro
losses (:mod:`hierbayes.inference.svi`) and :func:`~hierbayes.inference.fit` are thin layers
over these functions.

MAML (Finn et al. 2017; Grant et al. 2018, eq. 1):
:math:`\ell_j = -\log p(y^q_j\mid\hat\phi_j, x^q_j)`.

LLAMA's paper loss (Grant et al. 2018, Algorithm 4, ML-LAPLACE):
:math:`\ell_j = -\log p(y^q_j\mid\hat\phi_j) + \eta\log\det\hat H_j`.

The Laplace evidence (MATH.md §4): :math:`\ell_j = -\log\hat p(\mathcal D_j\mid\theta)`.

The linearised predictive: :math:`\ell_j = -\sum_m \log\mathcal N(y^q_{jm};\,
f(x^q_{jm};\hat\phi_j),\, \sigma^2 + J_{jm}\hat H_j^{-1}J_{jm}^\top)` with :math:`\hat H_j`
from the support set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from hierbayes.inference.core.laplace import (
    linearized_predictive,
    noise_variance,
    select_data,
)
from hierbayes.inference.core.mode import ModeSearch, newton_mode
from hierbayes.inference.core.numerics import clamp_nonnegative
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureInputs,
    build_curvature,
    output_jacobian,
    row_constant,
    safe_cholesky,
)
from hierbayes.inference.posteriors.predictive import GaussianPrediction
from hierbayes.models.density import Capabilities, NetworkDensity, TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "CurvatureData",
    "evidence_losses",
    "hyperprior_term",
    "joint_gram_predictive",
    "penalty_losses",
    "predictive_losses",
    "query_nll",
]

CurvatureData = Literal["support", "query", "both"]


def hyperprior_term(
    density: TaskDensity, params: Mapping[str, Tensor], x: Tensor, num_tasks: int | None
) -> Tensor | float:
    r""":math:`-\frac1J \log p(\text{globals})`, or 0 for an endless family (``num_tasks=None``)."""
    if num_tasks is None or not density.structure.global_sites:
        return 0.0
    return -density.log_hyperprior(params, x) / num_tasks


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
) -> Tensor:
    r"""The paper's loss, :math:`-\log p(y^q_j\mid\hat\phi_j) + \eta\log\det\hat H_j`, ``(T,)``.

    With a query-set curvature of a network model, one recorded forward pass of the query set
    serves both terms: its outputs give the likelihood and its output Jacobian is handed to
    the curvature builder (``CurvatureInputs.precomputed``).
    """
    xq, yq, mq = batch.require_query("the paper's LLAMA objective")
    x, y, mask = select_data(
        (batch.support_x, batch.support_y, batch.support_mask), (xq, yq, mq), curvature_data
    )
    inputs = CurvatureInputs(density, params, phi, x, y, mask, precision, create_graph=True)
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
    """
    query = batch.require_query("the Laplace evidence objective")
    x, y, mask = select_data(
        (batch.support_x, batch.support_y, batch.support_mask), query, curvature_data
    )
    search = newton_mode(
        density,
        params,
        phi,
        x,
        y,
        mask,
        precision=precision,
        curvature=curvature,
        steps=mode_steps,
        tolerance=mode_tolerance,
        create_graph=True,
    )
    return -search.log_evidence(newton_correction=newton_correction), search


def predictive_losses(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    batch: TaskBatch,
    *,
    precision: Tensor,
    curvature: str | CurvatureBuilder,
    jacobian: str,
    capabilities: Capabilities,
) -> Tensor:
    r"""Query NLL under the linearised Laplace predictive (support-set curvature), ``(T,)``."""
    xq, yq, mq = batch.require_query("the linearised predictive objective")
    inputs = CurvatureInputs(
        density,
        params,
        phi,
        batch.support_x,
        batch.support_y,
        batch.support_mask,
        precision,
        create_graph=True,
    )
    one_pass = (
        curvature == "ggn"
        and jacobian != "autograd"
        and capabilities.layer_records
        and capabilities.gaussian
        and not capabilities.batch_norm
    )
    if one_pass:
        prediction = joint_gram_predictive(inputs, xq)
    else:
        estimate = build_curvature(curvature, inputs)
        prediction = linearized_predictive(estimate, inputs, xq, jacobian=jacobian)
    log_pred = prediction.log_prob(yq)
    if mq is not None:
        log_pred = torch.where(
            mq, log_pred, torch.zeros((), dtype=log_pred.dtype, device=log_pred.device)
        )
    return -log_pred.sum(-1)


def joint_gram_predictive(inputs: CurvatureInputs, xq: Tensor) -> GaussianPrediction:
    r"""The linearised GGN predictive with one recorded pass over support and query together.

    With :math:`G = J P^{-1} J^\top` over the stacked support (``s``) and query (``q``) rows
    of the unwhitened Jacobian at :math:`\hat\phi` and the Gaussian whitening
    :math:`\tilde J_s = J_s/\sigma`,

    .. math::

        \operatorname{diag}(J_q\hat H^{-1}J_q^\top) = \operatorname{diag} G_{qq}
        - \lVert L^{-1} G_{sq}/\sigma\rVert^2_{\text{col}},\qquad LL^\top = I + G_{ss}/\sigma^2,

    the same numbers as :class:`~hierbayes.inference.curvature.GGNCurvature`'s
    ``predictive_variance``, from one forward pass, one back-propagation and one Gram matrix
    per layer instead of two, three and five.
    """
    xs, ms = inputs.x, inputs.mask
    N = xs.shape[1]
    joint = CurvatureInputs(
        inputs.density,
        inputs.params,
        inputs.phi,
        torch.cat([xs, xq], dim=1),
        inputs.y,
        None,
        inputs.prior_precision,
        inputs.create_graph,
    )
    jac, f = output_jacobian(joint, whiten=False)
    T, points, C = f.shape
    R = N * C
    P = (
        inputs.base_precision()
    )  # support data only: the per-task noise Fisher counts support points
    constant = row_constant(P)
    inv = 1.0 / P if constant is None else (1.0 / constant).expand_as(P)
    gram = jac.gram(inv)
    noise = noise_variance(inputs.density, inputs.params, inputs.phi, f)  # (T, points, C)
    sigma2 = noise[:, :1, :1].reshape(T, 1, 1)
    K = gram[:, :R, :R] / sigma2
    cross = gram[:, :R, R:] / sigma2.sqrt()
    if ms is not None:  # padded support points contribute nothing
        keep = ms.repeat_interleave(C, dim=1).to(K.dtype)
        K = K * keep.unsqueeze(-1) * keep.unsqueeze(-2)
        cross = cross * keep.unsqueeze(-1)
    eye = torch.eye(R, dtype=torch.float64, device=K.device)
    chol = safe_cholesky(eye + K.double(), "I + J P^-1 J^T")
    half = torch.linalg.solve_triangular(chol, cross.double(), upper=False)
    variance = gram[:, R:, R:].diagonal(dim1=-2, dim2=-1) - half.square().sum(1).to(gram.dtype)
    fq = f[:, N:]
    variance = clamp_nonnegative(
        variance.reshape(T, points - N, C),
        "the linearised predictive's epistemic variance diag(J H^-1 J^T) on the query set",
        scale=gram[:, R:, R:].diagonal(dim1=-2, dim2=-1).reshape(T, points - N, C),
    )
    return GaussianPrediction(fq, variance + noise[:, N:])
