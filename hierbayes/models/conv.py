r"""Few-shot image classification: the 4-block convolutional network of MAML as a task model.

The network (Vinyals et al. 2016; Finn et al. 2017, §5.2; MATH.md §5) is four blocks of

.. math::

    h \mapsto \mathrm{ReLU}\big(\mathrm{BN}(W_b * h)\big)

with ``filters`` (64) :math:`3\times3` filters each, downsampling by a stride of 2 (the MAML
paper's Omniglot network) or by :math:`2\times2` max pooling (its miniImageNet network), then a
linear layer to the ``ways`` class logits, :math:`y \sim \mathrm{Categorical}(\mathrm{softmax}
f(x;\phi_j))`. The hierarchical model is :class:`~hierbayes.models.TaskModel`'s:
:math:`\phi_j\sim\mathcal N(\theta, s^2 I)`, every weight of the network per task.

**Batch norm, a documented choice.** BN normalises each channel with the mean and variance of
the *current batch* of one task (its support set in the inner loop, its query set when scoring
or predicting), as MAML does (Finn et al. 2017), transductively; no running statistics are
kept. The layers carry **no affine parameters**: LLAMA kept batch norm's scale and offset out of
adaptation and out of the curvature (Grant et al. 2018, §5.2), and here they do not exist, so
:math:`\phi_j` (and every curvature's :math:`D`) holds only the convolution and output weights.
The convolutions have no bias, which batch norm would cancel. Because statistics are per task,
tasks of one batch need equal numbers of points (the model refuses padded tasks).

References: Vinyals et al. (2016), Matching networks for one shot learning; Finn, Abbeel &
Levine (2017), Model-agnostic meta-learning, ICML; Grant et al. (2018), Recasting
gradient-based meta-learning as hierarchical Bayes, ICLR; Ioffe & Szegedy (2015).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from hierbayes.models.likelihoods import CategoricalLikelihood
from hierbayes.models.task_model import TaskModel

__all__ = ["ConvClassifier", "conv4_network"]

Downsample = Literal["stride", "maxpool"]


def _side_after(image_size: int, blocks: int, downsample: Downsample) -> int:
    side = image_size
    for _ in range(blocks):
        # a stride-2 3x3 convolution with padding 1 gives ceil(side / 2); pooling floors it
        side = (side + 1) // 2 if downsample == "stride" else side // 2
    if side < 1:
        raise ValueError(f"{blocks} blocks leave nothing of a {image_size}-pixel image")
    return side


def conv4_network(
    ways: int,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    filters: int = 64,
    blocks: int = 4,
    downsample: Downsample = "stride",
) -> nn.Sequential:
    r"""The MAML paper's convolutional network as an ``nn.Sequential`` of supported layers.

    Each block: ``Conv2d(filters, 3x3, padding 1, no bias)`` (stride 2 when ``downsample=
    "stride"``), ``BatchNorm2d(affine=False)``, ``ReLU`` (then ``MaxPool2d(2)`` when
    ``downsample="maxpool"``); then ``Flatten`` and ``Linear(-, ways)``. Inputs are
    ``(N, in_channels, image_size, image_size)``; outputs ``(N, ways)`` logits. With the
    defaults (28-pixel Omniglot) :math:`D = 111{,}168 + 257\cdot\mathrm{ways}`.
    """
    if downsample not in ("stride", "maxpool"):
        raise ValueError(f"downsample must be 'stride' or 'maxpool'; got {downsample!r}")
    if ways < 2 or blocks < 1 or filters < 1:
        raise ValueError(
            f"need ways >= 2, blocks >= 1, filters >= 1; got {ways}, {blocks}, {filters}"
        )
    layers: list[nn.Module] = []
    width = in_channels
    stride = 2 if downsample == "stride" else 1
    for _ in range(blocks):
        layers += [
            nn.Conv2d(width, filters, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(filters, affine=False, track_running_stats=False),
            nn.ReLU(),
        ]
        if downsample == "maxpool":
            layers.append(nn.MaxPool2d(2))
        width = filters
    side = _side_after(image_size, blocks, downsample)
    layers += [nn.Flatten(), nn.Linear(filters * side * side, ways)]
    return nn.Sequential(*layers)


class ConvClassifier(TaskModel):
    r"""N-way image classification with :func:`conv4_network` and a categorical likelihood.

    A built-in model: :func:`hierbayes.load` rebuilds it from a saved run without being given
    the model. Tasks are batched through grouped convolutions (one ``conv2d`` call per layer
    for all tasks of a batch), with each task's own batch statistics.

    Parameters
    ----------
    ways:
        Classes per task (the output layer's width).
    in_channels, image_size, filters, blocks, downsample:
        As :func:`conv4_network` (1, 28, 64, 4, ``"stride"`` for Omniglot; 3, 84, 32,
        4, ``"maxpool"`` is the MAML paper's miniImageNet network).
    prior_scale, learn_prior_scale, hyperprior_scale, prior_scale_hyperprior, name:
        As in :class:`~hierbayes.models.TaskModel`: :math:`\phi_j\sim\mathcal N(\theta,s^2I)`.

    Examples
    --------
    >>> model = ConvClassifier(ways=5)
    >>> model.num_params
    112453
    """

    def __init__(
        self,
        ways: int = 5,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        filters: int = 64,
        blocks: int = 4,
        downsample: Downsample = "stride",
        prior_scale: float = 1.0,
        learn_prior_scale: bool = False,
        hyperprior_scale: float | None = 10.0,
        prior_scale_hyperprior: float | None = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            conv4_network(
                ways,
                in_channels=in_channels,
                image_size=image_size,
                filters=filters,
                blocks=blocks,
                downsample=downsample,
            ),
            CategoricalLikelihood(),
            prior_scale=prior_scale,
            learn_prior_scale=learn_prior_scale,
            hyperprior_scale=hyperprior_scale,
            prior_scale_hyperprior=prior_scale_hyperprior,
            name=name,
        )
        self.ways = ways
        self.image_shape = (in_channels, image_size, image_size)
        self.constructor = {
            "class": "ConvClassifier",
            "kwargs": dict(
                ways=ways,
                in_channels=in_channels,
                image_size=image_size,
                filters=filters,
                blocks=blocks,
                downsample=downsample,
                prior_scale=prior_scale,
                learn_prior_scale=learn_prior_scale,
                hyperprior_scale=hyperprior_scale,
                prior_scale_hyperprior=prior_scale_hyperprior,
                **({} if name is None else {"name": name}),
            ),
        }
