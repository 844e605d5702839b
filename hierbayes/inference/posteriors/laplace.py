r"""The Laplace task posterior :math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})` and its predictives.

The pieces (evidence, prior precision, linearised output variance) are pure functions in
:mod:`hierbayes.inference.core.laplace`; this module wraps them in a posterior object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.core.laplace import (
    noise_variance,
    predictive_output_variance,
    prior_precision,
)
from hierbayes.inference.core.mode import newton_mode
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureEstimate,
    CurvatureInputs,
    build_curvature,
)
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.predictions import (
    CategoricalPrediction,
    GaussianPrediction,
    Prediction,
    mixture_from_distribution,
)
from hierbayes.models.density import NetworkDensity, TaskDensity

__all__ = ["LaplacePosterior", "laplace_posterior"]


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
        network = isinstance(self.density, NetworkDensity)
        if method is None:
            method = "linearized" if network else "sampled"
        if method == "sampled":
            draws = self.sample(num_samples, generator=generator)  # (S, T, D)
            with torch.no_grad():
                S, T, D = draws.shape
                xs = x.unsqueeze(0).expand(S, *x.shape).reshape(S * T, *x.shape[1:])
                # p(y | phi_s, x) at every draw, from the model itself (any hierbayes model)
                fn = self.density.predictive(self.params, draws.reshape(S * T, D), xs)
                return mixture_from_distribution(fn, S)
        if method != "linearized":
            raise ValueError(f"method must be 'linearized' or 'sampled'; got {method!r}")
        if not isinstance(self.density, NetworkDensity):
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
            if self.density.likelihood.is_classification:
                return CategoricalPrediction(
                    torch.softmax(outputs / torch.sqrt(1 + math.pi * var / 8), dim=-1)
                )
            return GaussianPrediction(
                outputs, var + noise_variance(self.density, self.params, self.mean, outputs)
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

    ``refine_steps`` damped, monotone Newton steps :math:`\phi \leftarrow \phi + \alpha\hat
    H^{-1}\nabla_\phi \log p(\phi\mid\mathcal D^s_j, \theta)` with the chosen curvature
    (Gauss--Newton for ``ggn``; :func:`~hierbayes.inference.core.mode.newton_mode`: a step that
    would lower the log joint is halved, then rejected) move the centre from the
    truncated-gradient point to the posterior mode first: the classical Laplace approximation.
    One step is exact for the linear-Gaussian model.
    """
    params = {k: v.detach() for k, v in params.items()}
    phi = phi.detach()
    P = prior_precision(density, params, phi.shape[0], damping=damping)
    inputs = CurvatureInputs(density, params, phi, x, y, mask, P, create_graph=False)
    if refine_steps > 0:
        search = newton_mode(
            density,
            params,
            phi,
            x,
            y,
            mask,
            precision=P,
            curvature=curvature,
            steps=refine_steps,
            create_graph=False,
        )
        inputs.phi = search.phi
        estimate = search.curvature
    else:
        with torch.no_grad():
            estimate = build_curvature(curvature, inputs)
    return LaplacePosterior(density, params, inputs.phi, estimate, inputs, jacobian=jacobian)
