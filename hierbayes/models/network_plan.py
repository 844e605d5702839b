r"""The fast-path plan of a network: its layers as an immutable list of plain-data steps.

A supported module, an ``nn.Sequential`` (possibly nested) of ``Linear``, ``Conv2d``, pooling,
``Flatten``, batch norm and element-wise activations, or one such layer, is described by a
tuple of frozen steps, one per layer, in the order they run:

* :class:`LinearStep`: :math:`h W^\top + b`;
* :class:`Conv2dStep`: the cross-correlation of ``h`` ``(N, C, H, W)`` with ``W``, plus ``b``;
* :class:`BatchNormStep`: :math:`\gamma (h - \mu) / \sqrt{v + \epsilon} + \beta`, with
  :math:`\mu` and :math:`v` the mean and biased variance over the task's own points (and
  spatial positions) per channel;
* :class:`PoolStep`: max or average pooling over windows of ``(N, C, H, W)``;
* :class:`FlattenStep`: ``(N, ...)`` to ``(N, -1)``;
* :class:`ActivationStep`: an element-wise function, by name (:data:`ACTIVATIONS`).

A step names its parameters (``weight``, ``bias``) by their names in the network's
:class:`~hierbayes.models.network.ParameterLayout`, so each task's values are read from
:math:`\phi_j` by name. The steps hold no module and no function: every backend interprets them
with its own table from ``kind`` (and an activation's ``name``) to an implementation. Two
interpreters read one description: :func:`~hierbayes.models.network_ops.torch_step`, batched
over tasks, which
:class:`~hierbayes.models.network.BatchedNetwork` runs, and the JAX table of
:mod:`hierbayes.inference.references.jax_density`, one task at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal, TypeAlias

from torch import nn

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_LAYERS",
    "ActivationStep",
    "BatchNormStep",
    "Conv2dStep",
    "FlattenStep",
    "LinearStep",
    "PlanStep",
    "PoolStep",
    "network_plan",
]


@dataclass(frozen=True)
class LinearStep:
    """``nn.Linear``: weight ``(out, in)`` and optional bias ``(out,)``, by layout name."""

    kind: ClassVar[str] = "linear"
    path: str
    weight: str
    bias: str | None


@dataclass(frozen=True)
class Conv2dStep:
    """``nn.Conv2d`` with zero padding and one group: weight ``(out, in, kh, kw)``."""

    kind: ClassVar[str] = "conv2d"
    path: str
    weight: str
    bias: str | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass(frozen=True)
class BatchNormStep:
    """``nn.BatchNorm1d``/``2d`` on each task's own batch statistics (running statistics are
    neither read nor updated); ``weight`` and ``bias`` are ``None`` without ``affine``."""

    kind: ClassVar[str] = "batchnorm"
    path: str
    weight: str | None
    bias: str | None
    eps: float


@dataclass(frozen=True)
class PoolStep:
    """``nn.MaxPool2d`` (``op="max"``) or ``nn.AvgPool2d`` (``op="avg"``) with torch's options.

    ``dilation`` is ``(1, 1)`` for average pooling; ``count_include_pad`` and
    ``divisor_override`` apply to average pooling only.
    """

    kind: ClassVar[str] = "pool"
    path: str
    op: Literal["max", "avg"]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


@dataclass(frozen=True)
class FlattenStep:
    """``nn.Flatten()`` (``start_dim=1, end_dim=-1``): every point's values in one vector."""

    kind: ClassVar[str] = "flatten"
    path: str


@dataclass(frozen=True)
class ActivationStep:
    """An element-wise activation: ``name`` from :data:`ACTIVATIONS` and its constants as
    ``(keyword, value)`` pairs, the keywords of the matching ``torch.nn.functional`` call."""

    kind: ClassVar[str] = "activation"
    path: str
    name: str
    constants: tuple[tuple[str, float], ...] = ()

    @cached_property
    def kwargs(self) -> dict[str, float]:
        """The constants as keyword arguments."""
        return dict(self.constants)


#: One step of a plan.
PlanStep: TypeAlias = (
    LinearStep | Conv2dStep | BatchNormStep | PoolStep | FlattenStep | ActivationStep
)


def _activation_step(path: str, m: nn.Module) -> ActivationStep:
    if isinstance(m, nn.ELU):
        return ActivationStep(path, "elu", (("alpha", float(m.alpha)),))
    if isinstance(m, nn.LeakyReLU):
        return ActivationStep(path, "leaky_relu", (("negative_slope", float(m.negative_slope)),))
    if isinstance(m, nn.Softplus):
        return ActivationStep(
            path, "softplus", (("beta", float(m.beta)), ("threshold", float(m.threshold)))
        )
    if isinstance(m, nn.GELU):
        return ActivationStep(path, "gelu_tanh" if m.approximate == "tanh" else "gelu")
    return ActivationStep(path, _PLAIN_ACTIVATIONS[type(m)])


_PLAIN_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu",
    nn.Identity: "identity",
}
_PARAMETRISED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.GELU,
)

#: The names an :class:`ActivationStep` may carry.
ACTIVATIONS: tuple[str, ...] = (
    *_PLAIN_ACTIVATIONS.values(),
    "elu",
    "leaky_relu",
    "softplus",
    "gelu",
    "gelu_tanh",
)

#: The module types a plan is made of (exact types: a subclass may change ``forward``).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    *_PLAIN_ACTIVATIONS,
    *_PARAMETRISED_ACTIVATIONS,
)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _leaves(module: nn.Sequential, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    # every position, repeats included (named_children() yields a reused layer only once)
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path + ".")
        else:
            yield path, child


def _step(path: str, leaf: nn.Module, names: frozenset[str]) -> PlanStep | None:
    """The step of one supported layer, or ``None`` if an option has no step form."""
    prefix = f"{path}." if path else ""

    def name(param: str) -> str | None:
        full = f"{prefix}{param}"
        return full if full in names else None

    weight, bias = name("weight"), name("bias")
    if isinstance(leaf, (nn.Linear, nn.Conv2d)):
        if weight is None or (leaf.bias is not None and bias is None):
            return None  # a parameter shared with another layer appears once in the layout
        if isinstance(leaf, nn.Linear):
            return LinearStep(path, weight, bias)
        if leaf.groups != 1 or leaf.padding_mode != "zeros" or isinstance(leaf.padding, str):
            return None
        return Conv2dStep(
            path, weight, bias, _pair(leaf.stride), _pair(leaf.padding), _pair(leaf.dilation)
        )
    if isinstance(leaf, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if leaf.affine and (weight is None or bias is None):
            return None
        return BatchNormStep(path, weight, bias, float(leaf.eps))
    if isinstance(leaf, nn.Flatten):
        return FlattenStep(path) if (leaf.start_dim, leaf.end_dim) == (1, -1) else None
    if isinstance(leaf, nn.MaxPool2d):
        if leaf.return_indices:
            return None
        return PoolStep(
            path,
            "max",
            _pair(leaf.kernel_size),
            _pair(leaf.stride),
            _pair(leaf.padding),
            _pair(leaf.dilation),
            bool(leaf.ceil_mode),
        )
    if isinstance(leaf, nn.AvgPool2d):
        return PoolStep(
            path,
            "avg",
            _pair(leaf.kernel_size),
            _pair(leaf.stride),
            _pair(leaf.padding),
            (1, 1),
            bool(leaf.ceil_mode),
            bool(leaf.count_include_pad),
            leaf.divisor_override,
        )
    return _activation_step(path, leaf)


def network_plan(
    module: nn.Module, parameter_names: tuple[str, ...]
) -> tuple[PlanStep, ...] | None:
    """The steps of a supported module, or ``None`` when it needs the generic path.

    Parameters
    ----------
    module:
        An ``nn.Sequential`` (possibly nested) of :data:`SUPPORTED_LAYERS`, or one of them.
    parameter_names:
        The module's ``named_parameters()`` names (its layout), which the steps refer to.
    """
    if isinstance(module, nn.Sequential):
        leaves = list(_leaves(module))
    elif type(module) in SUPPORTED_LAYERS:
        leaves = [("", module)]
    else:
        return None
    names = frozenset(parameter_names)
    steps: list[PlanStep] = []
    for path, leaf in leaves:
        step = _step(path, leaf, names) if type(leaf) in SUPPORTED_LAYERS else None
        if step is None:
            return None
        steps.append(step)
    return tuple(steps)
