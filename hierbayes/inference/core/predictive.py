r"""The Laplace predictive of each task's query set, as pure functions.

With :math:`\phi_j \sim \mathcal N(\hat\phi_j, \hat H_j^{-1})` and :math:`\hat H_j` from the
support set, three approximations of :math:`p(y^q\mid x^q, \mathcal D^s_j)`, each
differentiable into :math:`\theta` through :math:`\hat\phi_j` and :math:`\hat H_j`:

- ``"linearized"`` (Gaussian networks): :math:`\mathcal N(f_*, \sigma^2 + J_*\hat
  H^{-1}J_*^\top)`, exact for the linear-Gaussian model (Immer, Korzepa & Bauer 2021);
- ``"probit"`` (network classifiers): class probabilities
  :math:`\mathrm{softmax}(f_*/\sqrt{1+\pi v_*/8})` of the linearised logits (MacKay 1992);
- ``"sampled"`` (any model): the pointwise mixture
  :math:`\frac1S\sum_s p(y^q_m\mid\phi^{(s)}_j, x^q_m)` of the model's own observation
  distribution at ``num_samples`` reparameterised draws
  :math:`\phi^{(s)}_j = \hat\phi_j + \hat H_j^{-1/2}\varepsilon_s` (the global torch
  generator draws :math:`\varepsilon`, so a seeded run is reproducible). The log-mean-exp
  is a biased (low) estimate of the log predictive, by :math:`O(1/S)`.

:func:`predictive_parts` computes what depends on the curvature (the epistemic output variance,
or the draws); :func:`predictive_losses` combines it with the model's likelihood. The Pyro road
of the predictive objective combines the same parts with the likelihood the model's replayed
trace scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from hierbayes.inference.core.laplace import noise_variance, predictive_output_variance
from hierbayes.inference.core.numerics import clamp_nonnegative
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureInputs,
    build_curvature,
    output_jacobian,
    row_constant,
    safe_cholesky,
)
from hierbayes.inference.predictions import GaussianPrediction, mixture_from_distribution
from hierbayes.models.density import Capabilities, TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "PredictiveApprox",
    "PredictiveParts",
    "joint_gram_variance",
    "predictive_losses",
    "predictive_parts",
    "probit_log_prob",
    "resolve_predictive",
]

PredictiveApprox = Literal["auto", "linearized", "probit", "sampled"]


class PredictiveParts(NamedTuple):
    """What the Laplace predictive of a query set takes from the curvature.

    Attributes
    ----------
    approximation:
        ``"linearized"``, ``"probit"`` or ``"sampled"``.
    outputs, variance:
        Network outputs :math:`f(x^q;\\hat\\phi)` and the epistemic variance
        :math:`\\operatorname{diag}(J\\hat H^{-1}J^\top)`, ``(T, M, C)`` (linearised, probit).
    draws:
        ``(S, T, D)`` draws of :math:`\\phi` from :math:`\\mathcal N(\\hat\\phi, \\hat H^{-1})`
        (sampled).
    """

    approximation: str
    outputs: Tensor | None = None
    variance: Tensor | None = None
    draws: Tensor | None = None


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


def predictive_parts(
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
) -> PredictiveParts:
    r"""The curvature's part of the Laplace predictive of ``batch``'s query inputs (see the
    module docstring), with :math:`\hat H` of the support set."""
    xq, _, _ = batch.require_query("the Laplace predictive objective")
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
    if approx in ("linearized", "probit"):
        one_pass = (
            approx == "linearized"
            and curvature == "ggn"
            and jacobian != "autograd"
            and capabilities.layer_records
            and not capabilities.batch_norm
        )
        if one_pass:
            outputs, variance = joint_gram_variance(inputs, xq)
        else:
            estimate = build_curvature(curvature, inputs)
            outputs, variance = predictive_output_variance(estimate, inputs, xq, jacobian=jacobian)
        return PredictiveParts(approx, outputs=outputs, variance=variance)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    estimate = build_curvature(curvature, inputs)
    draws = phi.unsqueeze(0) + estimate.sample(num_samples).to(phi.dtype)  # (S, T, D)
    return PredictiveParts(approx, draws=draws)


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
    r"""Query NLL under the Laplace predictive with support-set curvature, ``(T,)``:
    :math:`-\sum_m\log q(y^q_{jm}\mid x^q_{jm}, \mathcal D^s_j)` over each task's real query
    points, with the model's own likelihood (see the module docstring)."""
    _, yq, mq = batch.require_query("the Laplace predictive objective")
    parts = predictive_parts(
        density,
        params,
        phi,
        batch,
        precision=precision,
        curvature=curvature,
        jacobian=jacobian,
        capabilities=capabilities,
        predictive=predictive,
        num_samples=num_samples,
    )
    if parts.approximation == "linearized":
        assert parts.outputs is not None and parts.variance is not None
        noise = noise_variance(density, params, phi, parts.outputs)
        log_pred = GaussianPrediction(parts.outputs, parts.variance + noise).log_prob(yq)
    elif parts.approximation == "probit":
        assert parts.outputs is not None and parts.variance is not None
        log_pred = probit_log_prob(parts.outputs, parts.variance, yq)
    else:
        assert parts.draws is not None
        xq = batch.require_query("the Laplace predictive objective")[0]
        S, T, D = parts.draws.shape
        xs = xq.unsqueeze(0).expand(S, *xq.shape).reshape(S * T, *xq.shape[1:])
        fn = density.predictive(params, parts.draws.reshape(S * T, D), xs)
        log_pred = mixture_from_distribution(fn, S).log_prob(yq)
    if mq is not None:
        log_pred = torch.where(
            mq, log_pred, torch.zeros((), dtype=log_pred.dtype, device=log_pred.device)
        )
    return -log_pred.sum(-1)


def joint_gram_variance(inputs: CurvatureInputs, xq: Tensor) -> tuple[Tensor, Tensor]:
    r"""The query outputs and their epistemic variance under the GGN, ``(T, M, C)`` each, with
    one recorded pass over support and query together.

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
    variance = clamp_nonnegative(
        variance.reshape(T, points - N, C),
        "the linearised predictive's epistemic variance diag(J H^-1 J^T) on the query set",
        scale=gram[:, R:, R:].diagonal(dim1=-2, dim2=-1).reshape(T, points - N, C),
    )
    return f[:, N:], variance
