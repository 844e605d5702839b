r"""LLAMA and its successors: meta-objectives with a differentiable Laplace correction.

All three are differentiable in :math:`\theta` through the inner loop's :math:`\hat\phi_j(\theta)`
and through the curvature, and all are Pyro losses (``SVI(model, guide, optim, loss=...)``) and
``fit(..., method="llama", objective=NAME)`` variants:

``"paper"`` (:class:`LaplacePenaltyObjective`), the loss of Grant et al. (2018, Algorithm 4,
ML-LAPLACE) with a curvature of the query set:

.. math::

    \mathcal L = \frac1T\sum_j\Big[-\log p(y^q_j\mid\hat\phi_j) + \eta\,\log\det\hat H_j\Big],
    \qquad \eta = 10^{-6}\ \text{(the paper's cross-validated value)}.

``"evidence"`` (:class:`LaplaceEvidenceObjective`), the full Laplace evidence of MATH.md §4 of
each task's data (support and query by default), with a one-Newton-step correction that makes
it exact for the linear-Gaussian model (:func:`~hierbayes.inference.posteriors.laplace.laplace_log_evidence`):

.. math::

    \mathcal L = -\frac1T\sum_j \log \hat p(\mathcal D_j\mid\theta).

``"predictive"`` (:class:`LinearizedPredictiveObjective`, the default), the negative log
likelihood of the query set under the linearised Laplace posterior predictive, with
:math:`\hat H_j` from the support set:

.. math::

    \mathcal L = -\frac1T\sum_j\sum_m \log\mathcal N\big(y^q_{jm};\, f(x^q_{jm};\hat\phi_j),\,
        \sigma^2 + J_{jm}\hat H_j^{-1}J_{jm}^\top\big).

Each adds the hyperprior term :math:`-\frac1J\log p(\theta)` of
:class:`~hierbayes.inference.MAMLObjective`.

**The τ collapse.** In the paper's loss a learned prior precision :math:`\tau` gets a gradient
only from :math:`\eta\log\det\hat H`, which always pushes it down; with Adam the step size does
not depend on :math:`\eta`, and a prototype saw :math:`\tau` fall from 100 to 2e-7. Here the
paper's loss warns and holds a learned prior precision fixed (detached); the evidence and
predictive objectives learn it properly, because their prior terms pull the other way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureInputs,
    build_curvature,
    get_curvature,
    output_jacobian,
    row_constant,
    safe_cholesky,
)
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.laplace import (
    laplace_log_evidence,
    laplace_posterior,
    linearized_predictive,
    prior_precision,
    select_data,
)
from hierbayes.inference.posteriors.predictive import GaussianPrediction
from hierbayes.inference.svi.objectives import MetaObjective, as_task_batch, run_guide
from hierbayes.models.contract import TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "LLAMA_OBJECTIVES",
    "LaplaceEvidenceObjective",
    "LaplaceObjective",
    "LaplacePenaltyObjective",
    "LinearizedPredictiveObjective",
    "llama_objective",
    "llama_posterior",
]

CurvatureData = Literal["support", "query", "both"]


class LaplaceObjective(MetaObjective):
    """Shared options of the Laplace meta-objectives.

    Parameters
    ----------
    num_tasks:
        :math:`J` for the hyperprior weight (``None``: endless family).
    curvature:
        A registered curvature name (``"ggn"``, ``"kfac"``, ``"diag"``, ``"full"``) or a builder.
    curvature_data:
        Which of each task's data the curvature is of.
    damping:
        Use :math:`\\tau I` as the prior's curvature instead of the model's prior precision.
    jacobian:
        How output Jacobians are formed: ``"auto"``, ``"layers"`` or ``"autograd"``.
    """

    default_data: CurvatureData = "support"

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        curvature: str | CurvatureBuilder = "ggn",
        curvature_data: CurvatureData | None = None,
        damping: float | None = None,
        jacobian: str = "auto",
    ) -> None:
        super().__init__(num_tasks)
        get_curvature(curvature)  # fail early on an unknown name
        self.curvature = curvature
        self.curvature_data: CurvatureData = curvature_data or self.default_data
        if self.curvature_data not in ("support", "query", "both"):
            raise ValueError(
                f"curvature_data must be 'support', 'query' or 'both'; got {curvature_data!r}"
            )
        self.damping = damping
        self.jacobian = jacobian

    def _setup(
        self, model: Callable[..., Any], guide: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[TaskBatch, TaskDensity, dict[str, Tensor], Tensor]:
        self.check_pair(model, guide)
        batch = as_task_batch(*args, **kwargs)
        batch.require_query(f"the {self.name} objective")
        values = run_guide(guide, guide.structure, batch)
        return batch, guide.density, values.params, values.phi

    def _precision(self, density: TaskDensity, params: dict[str, Tensor], T: int) -> Tensor:
        return prior_precision(density, params, T, damping=self.damping)


class LaplacePenaltyObjective(LaplaceObjective):
    r"""The paper's LLAMA loss: query NLL plus :math:`\eta\log\det\hat H_j` (query curvature)."""

    name = "paper"
    default_data: CurvatureData = "query"

    def __init__(self, num_tasks: int | None = None, *, eta: float = 1e-6, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if eta < 0:
            raise ValueError(f"eta must be >= 0; got {eta}")
        self.eta = eta
        self._warned = False

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        batch, density, params, phi = self._setup(model, guide, args, kwargs)
        xq, yq, mq = batch.require_query("the paper's LLAMA objective")
        P = self._precision(density, params, phi.shape[0])
        if P.requires_grad:
            if not self._warned:
                warnings.warn(
                    "the paper's LLAMA loss gives a learned prior precision a gradient only "
                    "through eta * log det H, which drives it to zero whatever eta is (measured: "
                    "100 -> 2e-7); it is held fixed (detached) in this objective. Use "
                    "objective='evidence' or 'predictive' to learn the prior scale.",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned = True
            P = P.detach()
        x, y, mask = select_data(
            (batch.support_x, batch.support_y, batch.support_mask),
            (xq, yq, mq),
            self.curvature_data,
        )
        inputs = CurvatureInputs(density, params, phi, x, y, mask, P, create_graph=True)
        likelihood = getattr(density, "likelihood", None)
        shared = (
            self.curvature_data == "query"
            and self.eta > 0
            and likelihood is not None
            and getattr(density, "network", None) is not None
        )
        if shared and likelihood is not None:
            # one recorded forward pass of the query set serves the likelihood and the curvature
            _, f = output_jacobian(inputs, method=self.jacobian)
            nll = -cast(Any, density).log_likelihood_of_outputs(params, phi, f, yq, mq)
        else:
            nll = -density.log_likelihood(params, phi, xq, yq, mq)
        loss = nll.mean()
        if self.eta > 0:
            loss = loss + self.eta * build_curvature(self.curvature, inputs).logdet().mean()
        return loss + self.hyperprior_term(density, params, xq)


class LaplaceEvidenceObjective(LaplaceObjective):
    r"""Negative Laplace evidence of each task's data (support and query by default)."""

    name = "evidence"
    default_data: CurvatureData = "both"

    def __init__(
        self, num_tasks: int | None = None, *, newton_correction: bool = True, **options: Any
    ) -> None:
        super().__init__(num_tasks, **options)
        self.newton_correction = newton_correction

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        batch, density, params, phi = self._setup(model, guide, args, kwargs)
        query = batch.require_query("the Laplace evidence objective")
        x, y, mask = select_data(
            (batch.support_x, batch.support_y, batch.support_mask), query, self.curvature_data
        )
        evidence = laplace_log_evidence(
            density,
            params,
            phi,
            x,
            y,
            mask,
            curvature=self.curvature,
            precision=self._precision(density, params, phi.shape[0]),
            newton_correction=self.newton_correction,
            create_graph=True,
        )
        return -evidence.mean() + self.hyperprior_term(density, params, x)


class LinearizedPredictiveObjective(LaplaceObjective):
    r"""Query NLL under the linearised Laplace predictive (support-set curvature)."""

    name = "predictive"
    default_data: CurvatureData = "support"

    def __init__(self, num_tasks: int | None = None, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if self.curvature_data != "support":
            raise ValueError(
                "the predictive objective conditions on the support set only: its curvature "
                "must be of the support set (curvature_data='support')"
            )

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        batch, density, params, phi = self._setup(model, guide, args, kwargs)
        xq, yq, mq = batch.require_query("the linearised predictive objective")
        likelihood = getattr(density, "likelihood", None)
        if likelihood is None:
            raise ModelContractError(
                "the linearised predictive objective needs a hierbayes TaskModel (a network whose "
                "Jacobian it takes, and a known likelihood); for another Pyro program use "
                "objective='evidence' or 'paper' with curvature='full'"
            )
        if getattr(likelihood, "is_classification", False):
            raise ModelContractError(
                "the linearised predictive objective is defined for Gaussian likelihoods; use "
                "objective='evidence' or 'paper' for classification"
            )
        inputs = CurvatureInputs(
            density,
            params,
            phi,
            batch.support_x,
            batch.support_y,
            batch.support_mask,
            self._precision(density, params, phi.shape[0]),
            create_graph=True,
        )
        if self.curvature == "ggn" and _joint_gram_applies(density, self.jacobian):
            prediction = _joint_gram_predictive(inputs, xq)
        else:
            estimate = build_curvature(self.curvature, inputs)
            prediction = linearized_predictive(estimate, inputs, xq, jacobian=self.jacobian)
        log_pred = prediction.log_prob(yq)
        if mq is not None:
            log_pred = torch.where(
                mq, log_pred, torch.zeros((), dtype=log_pred.dtype, device=log_pred.device)
            )
        return -log_pred.sum(-1).mean() + self.hyperprior_term(density, params, xq)


def _joint_gram_applies(density: TaskDensity, jacobian: str) -> bool:
    """Whether the one-pass GGN predictive applies: a Gaussian likelihood (isotropic noise, so
    whitening is a per-task scale) and a network with layer records."""
    likelihood = getattr(density, "likelihood", None)
    network = getattr(density, "network", None)
    return (
        jacobian != "autograd"
        and network is not None
        and network.has_fast_path
        and callable(getattr(likelihood, "noise_variance", None))
        and not any(step.kind == "batchnorm" for step in (network._plan or []))
    )


def _joint_gram_predictive(inputs: CurvatureInputs, xq: Tensor) -> GaussianPrediction:
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
    noise = cast(Any, inputs.density).noise_variance(inputs.params, inputs.phi, f)  # (T, points, C)
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
    variance = variance.reshape(T, points - N, C).clamp_min(0.0)
    return GaussianPrediction(fq, variance + noise[:, N:])


LLAMA_OBJECTIVES: dict[str, type[LaplaceObjective]] = {
    "predictive": LinearizedPredictiveObjective,
    "evidence": LaplaceEvidenceObjective,
    "paper": LaplacePenaltyObjective,
}


def llama_objective(
    num_tasks: int | None = None, objective: str = "predictive", **options: Any
) -> LaplaceObjective:
    """The LLAMA objective named ``objective`` (``"predictive"``, ``"evidence"`` or ``"paper"``)."""
    if objective not in LLAMA_OBJECTIVES:
        raise ValueError(
            f"unknown LLAMA objective {objective!r}; known: {sorted(LLAMA_OBJECTIVES)}"
        )
    return LLAMA_OBJECTIVES[objective](num_tasks, **options)


def llama_posterior(
    guide: Any,
    params: Mapping[str, Tensor],
    phi: Tensor,
    batch: TaskBatch,
    objective: MetaObjective,
) -> TaskPosterior:
    """The Laplace task posterior of an adapted batch, with the objective's curvature and the
    support set's data."""
    curvature: str | CurvatureBuilder = getattr(objective, "curvature", "ggn")
    return laplace_posterior(
        guide.density,
        params,
        phi,
        batch.support_x,
        batch.support_y,
        batch.support_mask,
        curvature=curvature,
        damping=getattr(objective, "damping", None),
        jacobian=getattr(objective, "jacobian", "auto"),
    )
