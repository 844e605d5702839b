r"""Neural regression: a network's weights as the per-task latent (Finn et al. 2017).

The sinusoid benchmark's network is 1-40-40-1 with ReLU activations (:func:`sinusoid_network`),
:math:`D = 1761` parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hierbayes.models.likelihoods import GaussianLikelihood
from hierbayes.models.task_model import TaskModel

__all__ = ["NeuralRegression", "sinusoid_network"]


def sinusoid_network(
    hidden: Sequence[int] = (40, 40), *, input_dim: int = 1, output_dim: int = 1
) -> nn.Sequential:
    """The MLP of the sinusoid benchmark: ``input_dim``-40-40-``output_dim`` with ReLU."""
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


class NeuralRegression(TaskModel):
    r"""Regression with a network :math:`f(x;\phi_j)` and Gaussian noise :math:`\sigma`.

    Parameters
    ----------
    network:
        The regression network (default :func:`sinusoid_network`).
    noise_scale:
        :math:`\sigma`, or its initial value when ``learn_noise`` (default): the noise scale is
        then a global latent point-estimated with :math:`\theta`, so every method's predictive
        distribution has a calibrated scale.
    per_task_noise:
        Give each task its own noise scale, adapted by the inner loop (see
        :class:`GaussianLikelihood`, ``per_task``): :math:`\phi_j` gains one entry,
        :math:`\log\sigma_j`, and its prior mean joins :math:`\theta`.
    per_task_noise_scale:
        Prior scale of :math:`\log\sigma_j` around that mean.
    prior_scale, learn_prior_scale, hyperprior_scale, prior_scale_hyperprior, name:
        As in :class:`~hierbayes.models.TaskModel`.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        *,
        noise_scale: float = 1.0,
        learn_noise: bool = True,
        prior_scale: float = 1.0,
        learn_prior_scale: bool = False,
        hyperprior_scale: float | None = 10.0,
        per_task_noise: bool = False,
        per_task_noise_scale: float = 0.5,
        prior_scale_hyperprior: float | None = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            network if network is not None else sinusoid_network(),
            GaussianLikelihood(
                noise_scale,
                learned=learn_noise,
                per_task=per_task_noise,
                per_task_prior_scale=per_task_noise_scale,
            ),
            prior_scale=prior_scale,
            learn_prior_scale=learn_prior_scale,
            hyperprior_scale=hyperprior_scale,
            prior_scale_hyperprior=prior_scale_hyperprior,
            name=name,
        )
        if network is None:
            self.constructor = {
                "class": "NeuralRegression",
                "kwargs": dict(
                    noise_scale=noise_scale,
                    learn_noise=learn_noise,
                    prior_scale=prior_scale,
                    learn_prior_scale=learn_prior_scale,
                    hyperprior_scale=hyperprior_scale,
                    per_task_noise=per_task_noise,
                    per_task_noise_scale=per_task_noise_scale,
                    prior_scale_hyperprior=prior_scale_hyperprior,
                    **({} if name is None else {"name": name}),
                ),
            }
