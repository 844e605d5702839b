r"""The linearised Gaussian predictive of a Gaussian task posterior, for all tasks at once.

Linearising the network around :math:`\mu_j`,
:math:`f(x;\phi) \approx f(x;\mu_j) + J_j(\phi-\mu_j)` with
:math:`J_j = \partial f(x;\phi)/\partial\phi\,\rvert_{\phi=\mu_j}`, carries a posterior
:math:`\phi_j \sim \mathcal N(\mu_j, \Sigma_j)` to the outputs, and a Gaussian likelihood with
noise variance :math:`\sigma^2` gives

.. math::

    y_* \mid x_*, \mathcal D^s_j \;\sim\; \mathcal N\big(f(x_*;\mu_j),\;
        \operatorname{diag}(J_j\Sigma_j J_j^\top) + \sigma^2\big),

exact when :math:`f` is linear in :math:`\phi` (the linear-Gaussian model). The Jacobian of
every task comes from one call of :func:`~hierbayes.inference.curvature.output_jacobian`; the
posterior's covariance enters only through the quadratic form
:math:`J \mapsto \operatorname{diag}(J\Sigma J^\top)`, so each posterior applies its own
structure (dense, diagonal, low rank, Kronecker).

References
----------
1. MacKay (1992). The evidence framework applied to classification networks. Neural Computation.
2. Immer, Korzepa & Bauer (2021). Improving predictions of Bayesian neural nets via local
   linearization. AISTATS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hierbayes.inference.core.numerics import clamp_nonnegative
from hierbayes.inference.curvature import CurvatureInputs, output_jacobian
from hierbayes.inference.predictions import (
    GaussianPrediction,
    prediction_from_distribution,
)
from hierbayes.models.density import TaskDensity, capabilities

__all__ = ["CovarianceQuadratic", "linearized_gaussian"]

#: :math:`J \mapsto \operatorname{diag}(J_j\Sigma_j J_j^\top)`: ``(T, R, D)`` to ``(T, R)``.
CovarianceQuadratic = Callable[[Tensor], Tensor]


def linearized_gaussian(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    covariance_quad: CovarianceQuadratic,
    *,
    jacobian: str = "auto",
) -> GaussianPrediction:
    r"""The linearised predictive :math:`\mathcal N(f(x;\mu_j),\operatorname{diag}(J_j\Sigma_j
    J_j^\top) + \sigma^2)` of every task at inputs ``x`` (see the module docstring).

    Parameters
    ----------
    density:
        A :class:`~hierbayes.models.NetworkDensity` whose likelihood is Gaussian with a known
        noise variance (a hierbayes ``TaskModel`` regression).
    params:
        The global values (:math:`\theta`, noise scale, ...).
    phi:
        ``(T, D)``: :math:`\mu_j`, where the network is linearised.
    x:
        ``(T, M, *input_shape)``: the inputs to predict at.
    covariance_quad:
        Given the output Jacobians ``J`` ``(T, R, D)`` at ``phi`` (``R = M·C`` rows, point-major),
        the diagonals of :math:`J_j\Sigma_j J_j^\top`, ``(T, R)``.
    jacobian:
        How :func:`~hierbayes.inference.curvature.output_jacobian` differentiates:
        ``"layers"``, ``"autograd"`` or ``"auto"``.

    Returns
    -------
    :class:`~hierbayes.inference.posteriors.GaussianPrediction` whose mean :math:`f(x;\mu_j)` and variance
    are ``(T, M, C)``. :math:`\sigma^2` is the variance of the density's own predictive
    :math:`p(y\mid\mu_j, x)`, so a per-task noise scale in :math:`\phi` is used at
    :math:`\mu_j`. Nothing is differentiable (evaluation only).

    Raises
    ------
    ModelContractError
        For a density that is not a network with a Gaussian likelihood; predict by sampling
        instead.
    """
    found = capabilities(density)
    fix = "use predict(x, method='sampled')"
    found.require("network", "the linearised predictive", fix)
    found.require("gaussian", "the linearised predictive", fix)
    T, D = phi.shape
    phi = phi.detach()
    # only the density, the globals, phi and the inputs are read: the Jacobian is not whitened,
    # so neither targets nor a prior precision enter
    inputs = CurvatureInputs(
        density,
        params,
        phi,
        x,
        phi.new_zeros(x.shape[:2]),
        None,
        phi.new_ones(D),
        create_graph=False,
    )
    jac, f = output_jacobian(inputs, x=x, mask=None, whiten=False, method=jacobian)
    with torch.no_grad():
        M, C = f.shape[1], f.shape[2]
        variance = clamp_nonnegative(
            covariance_quad(jac.dense()).reshape(T, M, C),
            "the linearised predictive's epistemic variance diag(J Sigma J^T)",
        )
        noise = prediction_from_distribution(density.predictive(params, phi, x))
    if not isinstance(noise, GaussianPrediction):  # pragma: no cover - guarded by `gaussian`
        raise TypeError(f"expected a Gaussian predictive; got {type(noise).__name__}")
    return GaussianPrediction(f, variance + noise.variance.reshape(T, M, C))
