r"""Task posteriors integrated over the globals: a mixture of Laplace Gaussians over nodes.

At nodes :math:`u_k` with weights :math:`w_k` over the unconstrained globals (see
:func:`~hierbayes.inference.posteriors.hyper_laplace.hyper_laplace`),

.. math::

    p(\phi_j\mid\mathcal D) \approx \sum_k w_k\,
        \mathcal N\big(\phi^*_j(\theta_k), H_j(\theta_k)^{-1}\big),

with mean :math:`m_j = \sum_k w_k\phi^*_{jk}` and covariance
:math:`\sum_k w_k (H_{jk}^{-1} + \phi^*_{jk}\phi^{*\top}_{jk}) - m_jm_j^\top`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.joint import predict_from_joint_draws
from hierbayes.inference.predictions import Prediction
from hierbayes.models.density import TaskDensity

__all__ = ["HyperLaplacePosterior"]


class HyperLaplacePosterior(TaskPosterior):
    r"""Task posteriors integrated over the globals: :math:`\sum_k w_k\,\mathcal N(m_{jk}, C_{jk})`.

    Attributes
    ----------
    mean:
        ``(T, D)`` mixture means :math:`m_j`.
    component_means, component_covariances, weights:
        ``(K, T, D)``, ``(K, T, D, D)`` and ``(K,)``: the per-node Laplace posteriors.
    node_params:
        Each global site's value at the nodes, ``(K, *site_shape)``.
    fixed:
        Global values not integrated over (``pyro.param`` sites).
    params:
        The globals at :math:`T(\hat u)` (over ``fixed``).
    """

    def __init__(
        self,
        density: TaskDensity,
        params: Mapping[str, Tensor],
        fixed: Mapping[str, Tensor],
        node_params: Mapping[str, Tensor],
        component_means: Tensor,
        component_covariances: Tensor,
        weights: Tensor,
        *,
        wall_time: float = math.nan,
    ) -> None:
        w = weights.to(component_means)
        mean = torch.einsum("k,ktd->td", w, component_means)
        super().__init__(density, params, mean)
        self.fixed = {k: v.detach() for k, v in fixed.items()}
        self.node_params = {k: v.detach() for k, v in node_params.items()}
        self.component_means = component_means.detach()
        self.component_covariances = component_covariances.detach()
        self.weights = w.detach()
        self.wall_time = float(wall_time)
        self._factors = torch.linalg.cholesky(self.component_covariances)

    def covariance(self) -> Tensor:
        r"""The mixture covariance ``(T, D, D)`` (law of total covariance)."""
        m = self.component_means
        second = self.component_covariances + m.unsqueeze(-1) * m.unsqueeze(-2)
        total = torch.einsum("k,ktde->tde", self.weights, second)
        return total - self.mean.unsqueeze(-1) * self.mean.unsqueeze(-2)

    def marginal_variance(self) -> Tensor:
        """Marginal variances ``(T, D)`` of the mixture."""
        return self.covariance().diagonal(dim1=-2, dim2=-1)

    def _draw(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Node indices ``(n,)`` (by weight) and draws of :math:`\\phi` ``(n, T, D)``."""
        device = self.mean.device
        k = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn(
            (n, *self.mean.shape), generator=generator, dtype=self.mean.dtype, device=device
        )
        phi = self.component_means[k] + torch.einsum("stde,ste->std", self._factors[k], z)
        return k, phi

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws of :math:`\phi` ``(num_samples, T, D)`` from the mixture: a node by its
        weight, then the node's Gaussian (one node per draw, shared by the tasks)."""
        return self._draw(num_samples, generator)[1]

    def joint_draws(
        self, num_chains: int, num_draws: int, *, seed: int = 0
    ) -> tuple[dict[str, Tensor], Tensor]:
        r"""``num_chains·num_draws`` joint draws: the node's globals and :math:`\phi`."""
        generator = torch.Generator(device=self.mean.device).manual_seed(seed)
        k, phi = self._draw(num_chains * num_draws, generator)
        globals_ = {
            name: value[k].reshape(num_chains, num_draws, *value.shape[1:])
            for name, value in self.node_params.items()
        }
        return globals_, phi.reshape(num_chains, num_draws, *phi.shape[1:])

    def predict(
        self,
        x: Tensor,
        *,
        num_samples: int = 200,
        generator: torch.Generator | None = None,
        **_: Any,
    ) -> Prediction:
        r"""The mixture :math:`\frac1S\sum_s p(y\mid x, \phi^{(s)}, \theta^{(s)})` over
        ``num_samples`` joint draws."""
        k, phi = self._draw(num_samples, generator)
        globals_ = {name: value[k] for name, value in self.node_params.items()}
        return predict_from_joint_draws(self.density, self.fixed, globals_, phi, x)
