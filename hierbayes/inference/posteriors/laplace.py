r"""Laplace approximations of each task: its evidence and its Gaussian posterior.

Around :math:`\hat\phi_j` (the guide's adapted parameters) with :math:`g_j` the gradient and
:math:`\hat H_j` the curvature of the log joint :math:`\log p(\mathcal D_j\mid\phi) +
\log p(\phi\mid\theta)`, the second-order expansion integrates to

.. math::

    \log p(\mathcal D_j \mid \theta) \approx \log p(\mathcal D_j\mid\hat\phi_j)
        + \log p(\hat\phi_j\mid\theta) + \tfrac12 g_j^\top \hat H_j^{-1} g_j
        - \tfrac12\log\det\hat H_j + \tfrac D2\log 2\pi

(MATH.md §4; Laplace 1774, MacKay 1992). At a mode :math:`g_j = 0` and this is the classical
Laplace evidence; the :math:`\tfrac12 g^\top\hat H^{-1}g` term (one Newton step) makes it exact
for the linear-Gaussian model at *any* :math:`\hat\phi_j`, which matters because truncated
gradient descent stops short of the mode.

The task posterior is :math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})` with :math:`\hat H_j` from
the support set (:class:`LaplacePosterior`), and its linearised predictive at new inputs is

.. math::

    y_* \sim \mathcal N\big(f(x_*;\hat\phi_j),\; \sigma^2 + J_*\hat H_j^{-1}J_*^\top\big)

(Immer, Korzepa & Bauer 2021), or by sampling :math:`\phi` from the posterior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureEstimate,
    CurvatureInputs,
    GGNCurvature,
    build_curvature,
    output_jacobian,
)
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.predictive import (
    CategoricalPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
    prediction_from_distribution,
)
from hierbayes.models.contract import TaskDensity

__all__ = [
    "LaplacePosterior",
    "laplace_log_evidence",
    "laplace_posterior",
    "linearized_predictive",
    "prior_precision",
]

_LOG_2PI = math.log(2 * math.pi)


def prior_precision(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    num_tasks: int,
    *,
    damping: float | None = None,
) -> Tensor:
    r"""The diagonal prior precision :math:`P`, ``(T, D)``: :math:`1/s^2` from the model's
    :math:`p(\phi\mid\theta)`, or ``damping`` :math:`\tau` when given."""
    D = density.structure.num_params
    ref = next(iter(params.values())) if params else torch.zeros(())
    if damping is not None:
        if not damping > 0:
            raise ValueError(f"damping must be positive; got {damping}")
        return torch.full((num_tasks, D), float(damping), dtype=ref.dtype, device=ref.device)
    own = getattr(density, "prior_precision", None)
    if own is None:
        raise ModelContractError(
            "this model does not state its prior precision; pass damping=τ to use τI as the "
            "prior's curvature"
        )
    precision: Tensor = own(params)
    return precision.expand(num_tasks, D)


def _concat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a, b], dim=1)


def select_data(
    support: tuple[Tensor, Tensor, Tensor | None],
    query: tuple[Tensor, Tensor, Tensor | None] | None,
    which: Literal["support", "query", "both"],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The ``(x, y, mask)`` a curvature or evidence is computed on."""
    if which == "support":
        return support
    if query is None:
        raise ValueError(f"curvature data {which!r} needs a query set")
    if which == "query":
        return query
    xs, ys, ms = support
    xq, yq, mq = query
    if ms is None and mq is None:
        mask = None
    else:
        ms_ = ms if ms is not None else torch.ones(xs.shape[:2], dtype=torch.bool, device=xs.device)
        mq_ = mq if mq is not None else torch.ones(xq.shape[:2], dtype=torch.bool, device=xq.device)
        mask = _concat(ms_, mq_)
    return _concat(xs, xq), _concat(ys, yq), mask


def laplace_log_evidence(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    curvature: str | CurvatureBuilder = "ggn",
    precision: Tensor | None = None,
    newton_correction: bool = True,
    create_graph: bool | None = None,
) -> Tensor:
    r"""Laplace approximation of :math:`\log p(\mathcal D_j\mid\theta)` per task, ``(T,)``.

    Parameters
    ----------
    phi:
        ``(T, D)`` expansion points (differentiable into :math:`\theta`).
    x, y, mask:
        The task data :math:`\mathcal D_j`.
    curvature:
        A registered curvature name or builder; ``"full"`` (or ``"ggn"`` for the
        linear-Gaussian model, where the two coincide) makes the result exact there.
    precision:
        Diagonal prior precision ``(T, D)``; by default the model's.
    newton_correction:
        Add :math:`\tfrac12 g^\top\hat H^{-1} g` (see the module docstring).
    """
    create_graph = torch.is_grad_enabled() if create_graph is None else create_graph
    T, D = phi.shape
    P = prior_precision(density, params, T) if precision is None else precision
    with torch.enable_grad():
        point = phi if phi.requires_grad else phi.detach().requires_grad_(True)
        log_joint = density.log_likelihood(params, point, x, y, mask) + density.log_prior(
            params, point, x
        )
        if newton_correction:
            (grad,) = torch.autograd.grad(log_joint.sum(), point, create_graph=create_graph)
    estimate = build_curvature(
        curvature, CurvatureInputs(density, params, point, x, y, mask, P, create_graph)
    )
    value = log_joint - 0.5 * estimate.logdet() + 0.5 * D * _LOG_2PI
    if newton_correction:
        value = value + 0.5 * estimate.inv_quad(grad)
    return value if create_graph else value.detach()


def _noise_variance(
    density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, f: Tensor
) -> Tensor:
    variance = getattr(density, "noise_variance", None)
    if variance is None:
        raise ModelContractError("a linearised Gaussian predictive needs a Gaussian likelihood")
    try:
        result: Tensor = variance(params, phi, f)
    except NotImplementedError as err:
        raise ModelContractError(
            "a linearised Gaussian predictive needs a Gaussian likelihood"
        ) from err
    return result


def predictive_output_variance(
    estimate: CurvatureEstimate,
    inputs: CurvatureInputs,
    x: Tensor,
    *,
    jacobian: str = "auto",
) -> tuple[Tensor, Tensor]:
    r"""Network outputs :math:`f(x_*;\hat\phi)` and :math:`\operatorname{diag}(J_*\hat H^{-1}J_*^\top)`,
    both ``(T, M, C)``."""
    query_jac, f = output_jacobian(inputs, x=x, mask=None, whiten=False, method=jacobian)
    T, M, C = f.shape
    if isinstance(estimate, GGNCurvature):
        var = estimate.predictive_variance(query_jac)
    else:
        J = query_jac.dense()  # (T, R, D)
        var = (J * estimate.solve(J.transpose(1, 2)).transpose(1, 2)).sum(-1)
    return f, var.reshape(T, M, C).clamp_min(0.0)


def linearized_predictive(
    estimate: CurvatureEstimate,
    inputs: CurvatureInputs,
    x: Tensor,
    *,
    jacobian: str = "auto",
) -> GaussianPrediction:
    r"""The linearised Laplace predictive :math:`\mathcal N(f_*, \sigma^2 + J_*\hat H^{-1}J_*^\top)`."""
    f, var = predictive_output_variance(estimate, inputs, x, jacobian=jacobian)
    return GaussianPrediction(
        f, var + _noise_variance(inputs.density, inputs.params, inputs.phi, f)
    )


class LaplacePosterior(TaskPosterior):
    r""":math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})` for each task, with its predictive.

    ``curvature`` is the backend's :class:`~hierbayes.inference.curvature.CurvatureEstimate`
    (its own structure: Woodbury for ``ggn``, Kronecker for ``kfac``, ...), built from the
    support set.
    """

    def __init__(
        self,
        density: TaskDensity,
        params: Mapping[str, Tensor],
        mean: Tensor,
        curvature: CurvatureEstimate,
        inputs: CurvatureInputs,
        *,
        jacobian: str = "auto",
    ) -> None:
        super().__init__(density, params, mean)
        self.curvature = curvature
        self.inputs = inputs
        self.jacobian = jacobian

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.mean + self.curvature.sample(num_samples, generator=generator)

    def covariance(self) -> Tensor:
        r""":math:`\hat H_j^{-1}`, dense ``(T, D, D)`` (small ``D``)."""
        with torch.no_grad():
            return self.curvature.covariance()

    def marginal_variance(self) -> Tensor:
        with torch.no_grad():
            return self.curvature.marginal_variance()

    def predict(
        self,
        x: Tensor,
        *,
        method: Literal["linearized", "sampled"] | None = None,
        num_samples: int = 100,
        generator: torch.Generator | None = None,
        **_: Any,
    ) -> Prediction:
        r"""Predictive at ``x`` ``(T, M, ...)``: ``"linearized"`` or ``"sampled"``.

        The default is linearised for hierbayes ``TaskModel`` networks and sampled for other
        Pyro programs (whose Jacobian it cannot take). For classification the linearised
        predictive uses the probit approximation
        :math:`\mathrm{softmax}(f_*/\sqrt{1+\pi v_*/8})` (MacKay 1992).
        """
        if method is None:
            method = (
                "linearized" if getattr(self.density, "network", None) is not None else "sampled"
            )
        likelihood = getattr(self.density, "likelihood", None)
        classification = bool(getattr(likelihood, "is_classification", False))
        if method == "sampled":
            draws = self.sample(num_samples, generator=generator)  # (S, T, D)
            with torch.no_grad():
                S, T, D = draws.shape
                xs = x.unsqueeze(0).expand(S, *x.shape).reshape(S * T, *x.shape[1:])
                # p(y | phi_s, x) at every draw, from the model itself (any hierbayes model)
                per_draw = prediction_from_distribution(
                    self.density.predictive(self.params, draws.reshape(S * T, D), xs)
                )
                if isinstance(per_draw, CategoricalPrediction):
                    probs = per_draw.probs
                    return CategoricalPrediction(probs.reshape(S, T, *probs.shape[1:]).mean(0))
                assert isinstance(per_draw, GaussianPrediction)
                shape = (S, T, *per_draw.mean.shape[1:])
                # the noise varies with the draw where a per-task noise scale is part of phi
                return MixturePrediction(
                    per_draw.mean.reshape(shape), per_draw.variance.reshape(shape)
                )
        if method != "linearized":
            raise ValueError(f"method must be 'linearized' or 'sampled'; got {method!r}")
        if getattr(self.density, "network", None) is None:
            raise ModelContractError(
                "the linearised predictive needs a hierbayes TaskModel (a network whose Jacobian "
                "it takes); for this Pyro program use predict(x, method='sampled')"
            )
        inputs = CurvatureInputs(
            self.density,
            self.params,
            self.mean,
            self.inputs.x,
            self.inputs.y,
            self.inputs.mask,
            self.inputs.prior_precision,
            create_graph=False,
        )
        with torch.no_grad():
            outputs, var = predictive_output_variance(
                self.curvature, inputs, x, jacobian=self.jacobian
            )
            if classification:
                return CategoricalPrediction(
                    torch.softmax(outputs / torch.sqrt(1 + math.pi * var / 8), dim=-1)
                )
            return GaussianPrediction(
                outputs, var + _noise_variance(self.density, self.params, self.mean, outputs)
            )


def laplace_posterior(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    curvature: str | CurvatureBuilder = "ggn",
    damping: float | None = None,
    jacobian: str = "auto",
    refine_steps: int = 0,
) -> LaplacePosterior:
    r""":math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})` with :math:`\hat H` from support data ``x, y``.

    Works for any adapted point, e.g. MAML's: ``laplace_posterior(result.guide.density,
    result.params, result.adapt(batch).mean, batch.support_x, batch.support_y)``.

    ``refine_steps`` Newton steps :math:`\phi \leftarrow \phi + \hat H^{-1}\nabla_\phi
    \log p(\phi\mid\mathcal D^s_j, \theta)` with the chosen curvature (Gauss--Newton for
    ``ggn``) move the centre from the truncated-gradient point to the posterior mode first:
    the classical Laplace approximation. One step is exact for the linear-Gaussian model.
    """
    params = {k: v.detach() for k, v in params.items()}
    phi = phi.detach()
    P = prior_precision(density, params, phi.shape[0], damping=damping)
    for _ in range(refine_steps):
        with torch.enable_grad():
            point = phi.clone().requires_grad_(True)
            log_joint = density.log_likelihood(params, point, x, y, mask) + density.log_prior(
                params, point, x
            )
            (grad,) = torch.autograd.grad(log_joint.sum(), point)
        inputs = CurvatureInputs(density, params, phi, x, y, mask, P, create_graph=False)
        with torch.no_grad():
            phi = phi + build_curvature(curvature, inputs).solve(grad)
    inputs = CurvatureInputs(density, params, phi, x, y, mask, P, create_graph=False)
    with torch.no_grad():
        estimate = build_curvature(curvature, inputs)
    return LaplacePosterior(density, params, phi, estimate, inputs, jacobian=jacobian)
