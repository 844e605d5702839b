r"""Bayesian linear regression over tasks: the model where everything is closed form.

.. math::

    \theta \sim \mathcal N(0, s_\theta^2 I),\quad
    \phi_j \mid \theta \sim \mathcal N(\theta, s^2 I),\quad
    y_{jn} \mid \phi_j \sim \mathcal N(x_{jn}^\top \phi_j, \sigma^2)

With ``bias=True`` a constant 1 feature is appended, so :math:`\phi_j = (w_j, b_j)`.
Truncated gradient descent on it is exactly MAP under a Gaussian prior (Santos 1996;
Grant et al. 2018, §3.1): see :mod:`hierbayes.inference.linear_gaussian`.
"""

from __future__ import annotations

import torch
from torch import nn

from hierbayes.models.likelihoods import GaussianLikelihood
from hierbayes.models.task_model import TaskModel

__all__ = ["BayesianLinearRegression"]


class BayesianLinearRegression(TaskModel):
    r"""Linear-Gaussian regression with per-task weights.

    Parameters
    ----------
    input_dim:
        Number of input features :math:`d`; :math:`D = d` (+1 with ``bias``).
    bias:
        Append an intercept to :math:`\phi_j`.
    noise_scale:
        :math:`\sigma` (initial value when ``learn_noise``).
    learn_noise:
        Point-estimate :math:`\sigma` as a global latent.
    prior_scale, learn_prior_scale, hyperprior_scale, name:
        As in :class:`~hierbayes.models.TaskModel`; :math:`\theta_0 = 0`.
    """

    def __init__(
        self,
        input_dim: int,
        *,
        bias: bool = False,
        noise_scale: float = 1.0,
        learn_noise: bool = False,
        prior_scale: float = 1.0,
        learn_prior_scale: bool = False,
        hyperprior_scale: float | None = 10.0,
        name: str | None = None,
    ) -> None:
        network = nn.Linear(input_dim, 1, bias=bias)
        D = input_dim + int(bias)
        super().__init__(
            network,
            GaussianLikelihood(noise_scale, learned=learn_noise),
            prior_scale=prior_scale,
            learn_prior_scale=learn_prior_scale,
            hyperprior_scale=hyperprior_scale,
            theta_init=torch.zeros(D),
            name=name,
        )
        self.input_dim = input_dim
        self.bias = bias
        self.constructor = {
            "class": "BayesianLinearRegression",
            "kwargs": dict(
                input_dim=input_dim,
                bias=bias,
                noise_scale=noise_scale,
                learn_noise=learn_noise,
                prior_scale=prior_scale,
                learn_prior_scale=learn_prior_scale,
                hyperprior_scale=hyperprior_scale,
                **({} if name is None else {"name": name}),
            ),
        }
