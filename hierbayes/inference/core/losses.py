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

The Laplace predictive: :math:`\ell_j = -\sum_m \log p(y^q_{jm}\mid x^q_{jm}, \mathcal D^s_j)`
under :math:`\phi_j\sim\mathcal N(\hat\phi_j, \hat H_j^{-1})` with :math:`\hat H_j` from the
support set: linearised (Gaussian networks, :math:`\mathcal N(f, \sigma^2 + J\hat H^{-1}J^\top)`),
probit (network classifiers) or sampled (any Pyro program, any likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import transform_to

from hierbayes.inference.core.laplace import (
    linearized_predictive,
    noise_variance,
    predictive_output_variance,
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
from hierbayes.inference.predictions import (
    GaussianPrediction,
    Prediction,
    mixture_from_distribution,
)
from hierbayes.models.density import Capabilities, NetworkDensity, TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "CurvatureData",
    "HyperpriorSpace",
    "PredictiveApprox",
    "evidence_losses",
    "global_log_jacobian",
    "hyperprior_term",
    "joint_gram_predictive",
    "penalty_losses",
    "predictive_losses",
    "probit_log_prob",
    "query_nll",
    "resolve_predictive",
]

CurvatureData = Literal["support", "query", "both"]
PredictiveApprox = Literal["auto", "linearized", "probit", "sampled"]


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

    A batch without a query set (groups as tasks, empirical Bayes on all of each group's data)
    is scored on its support set alone: :math:`\mathcal D_j` is then the support set, counted
    once, for ``curvature_data`` ``"both"`` (all the data) or ``"support"``.
    """
    support = (batch.support_x, batch.support_y, batch.support_mask)
    if batch.has_query:
        query = batch.require_query("the Laplace evidence objective")
        x, y, mask = select_data(support, query, curvature_data)
    elif curvature_data == "query":
        batch.require_query("the Laplace evidence of the query set (curvature_data='query')")
        x, y, mask = support  # pragma: no cover - require_query raised
    else:  # no query set (groups as tasks): all of each task's data is its support, scored once
        x, y, mask = support
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


def resolve_predictive(predictive: PredictiveApprox, capabilities: Capabilities) -> str:
    """The predictive approximation ``"auto"`` stands for, checked against what the model declares:
    ``"linearized"`` for a Gaussian network, ``"probit"`` for a network classifier,
    ``"sampled"`` for any other model (any Pyro program, any observation distribution)."""
    if predictive == "auto":
        if capabilities.network and capabilities.gaussian:
            return "linearized"
        if capabilities.network and capabilities.classification:
            return "probit"
        return "sampled"
    if predictive == "linearized":
        capabilities.require("network", "predictive='linearized'", "use predictive='sampled'")
        capabilities.require(
            "gaussian",
            "predictive='linearized'",
            "use predictive='probit' for a classifier or 'sampled' for any other likelihood",
        )
    elif predictive == "probit":
        capabilities.require("network", "predictive='probit'", "use predictive='sampled'")
        capabilities.require(
            "classification",
            "predictive='probit' (a softmax of linearised logits)",
            "use predictive='linearized' for a Gaussian network or 'sampled'",
        )
    elif predictive != "sampled":
        raise ValueError(
            f"predictive must be 'auto', 'linearized', 'probit' or 'sampled'; got {predictive!r}"
        )
    return predictive


def probit_log_prob(logits: Tensor, variance: Tensor, labels: Tensor) -> Tensor:
    r"""Log class probabilities of ``labels`` under the probit approximation of the linearised
    Laplace predictive, :math:`\mathrm{softmax}(f_*/\sqrt{1+\pi v_*/8})` (MacKay 1992):
    ``logits`` and ``variance`` ``(T, M, C)``, ``labels`` ``(T, M)``; returns ``(T, M)``."""
    scaled = logits / torch.sqrt(1.0 + math.pi * variance / 8.0)
    return torch.log_softmax(scaled, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


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
    predictive: PredictiveApprox = "auto",
    num_samples: int = 16,
) -> Tensor:
    r"""Query NLL under the Laplace predictive with support-set curvature, ``(T,)``.

    Three approximations of :math:`p(y^q\mid x^q, \mathcal D^s_j)` with
    :math:`\phi_j \sim \mathcal N(\hat\phi_j, \hat H_j^{-1})`, each differentiable into
    :math:`\theta` through :math:`\hat\phi_j` and :math:`\hat H_j`:

    - ``"linearized"`` (Gaussian networks): :math:`\mathcal N(f_*, \sigma^2 + J_*\hat
      H^{-1}J_*^\top)`, exact for the linear-Gaussian model;
    - ``"probit"`` (network classifiers): class probabilities
      :math:`\mathrm{softmax}(f_*/\sqrt{1+\pi v_*/8})` of the linearised logits;
    - ``"sampled"`` (any model): the pointwise mixture
      :math:`\frac1S\sum_s p(y^q_m\mid\phi^{(s)}_j, x^q_m)` of the model's own observation
      distribution at ``num_samples`` reparameterised draws
      :math:`\phi^{(s)}_j = \hat\phi_j + \hat H_j^{-1/2}\varepsilon_s` (the global torch
      generator draws :math:`\varepsilon`, so a seeded run is reproducible). The log-mean-exp
      is a biased (low) estimate of the log predictive, by :math:`O(1/S)`.
    """
    xq, yq, mq = batch.require_query("the Laplace predictive objective")
    approx = resolve_predictive(predictive, capabilities)
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
    if approx == "linearized":
        one_pass = (
            curvature == "ggn"
            and jacobian != "autograd"
            and capabilities.layer_records
            and not capabilities.batch_norm
        )
        if one_pass:
            prediction: Prediction = joint_gram_predictive(inputs, xq)
        else:
            estimate = build_curvature(curvature, inputs)
            prediction = linearized_predictive(estimate, inputs, xq, jacobian=jacobian)
        log_pred = prediction.log_prob(yq)
    elif approx == "probit":
        estimate = build_curvature(curvature, inputs)
        logits, variance = predictive_output_variance(estimate, inputs, xq, jacobian=jacobian)
        log_pred = probit_log_prob(logits, variance, yq)
    else:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        estimate = build_curvature(curvature, inputs)
        draws = phi.unsqueeze(0) + estimate.sample(num_samples).to(phi.dtype)  # (S, T, D)
        S, T, D = draws.shape
        xs = xq.unsqueeze(0).expand(S, *xq.shape).reshape(S * T, *xq.shape[1:])
        fn = density.predictive(params, draws.reshape(S * T, D), xs)
        log_pred = mixture_from_distribution(fn, S).log_prob(yq)
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
