r"""A ``torch.nn.Module`` as a batched function of a flat per-task parameter vector.

Meta-learning evaluates one network at ``T`` different parameter vectors at once, one per task:

.. math::

    f(\phi_j; x_{j,n}), \qquad \phi \in \mathbb{R}^{T \times D},\;
    x \in \mathbb{R}^{T \times N \times \cdots}.

:class:`BatchedNetwork` turns a module into that function without touching the module:
the module's own parameters only supply the layout and the initial value
:math:`\theta_0` (the module's own initialisation). Two implementations share one contract:

* a fast path for (nested) ``nn.Sequential`` stacks of ``Linear``, ``Conv2d``, pooling,
  ``Flatten``, batch norm and element-wise activations. The module is read once into a
  :attr:`BatchedNetwork.plan`, an immutable tuple of plain-data steps
  (:mod:`hierbayes.models.network_plan`), which this module interprets with batched matrix
  products (``baddbmm``) and grouped convolutions, recording on request every
  ``Linear``/``Conv2d`` layer's input and pre-activation output for the curvature backends
  (generalised Gauss--Newton Gram matrices, K-FAC factors). The JAX density of
  :mod:`hierbayes.inference.references.jax_density` interprets the same plan;
* ``torch.func.vmap`` over ``torch.func.functional_call`` for any other module.

The tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from hierbayes.models.network_ops import torch_step
from hierbayes.models.network_plan import (
    SUPPORTED_LAYERS,
    ActivationStep,
    Conv2dStep,
    LinearStep,
    PlanStep,
    network_plan,
)

__all__ = ["BatchedNetwork", "LayerRecord", "ParameterLayout", "unfold_patches"]


@dataclass(frozen=True)
class ParameterLayout:
    r"""Where each named parameter of a module lives in the flat vector :math:`\phi`.

    Parameters are laid out in ``module.named_parameters()`` order, each flattened in
    row-major order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_module(cls, module: nn.Module) -> ParameterLayout:
        named = list(module.named_parameters())
        if not named:
            raise ValueError(
                f"{type(module).__name__} has no parameters: a per-task parameter vector needs "
                "at least one."
            )
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def _split_sizes(self) -> list[int]:
        return list(self.sizes)

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def slice(self, name: str) -> slice:
        """The slice of the flat vector that holds parameter ``name``."""
        start = 0
        for n, size in zip(self.names, self.sizes, strict=True):
            if n == name:
                return slice(start, start + size)
            start += size
        raise KeyError(f"no parameter named {name!r}; the layout holds {list(self.names)}")

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``flat`` of shape ``(..., D)`` into ``{name: (..., *shape)}`` views."""
        parts = torch.split(flat, self._split_sizes, dim=-1)
        batch = flat.shape[:-1]
        # a vector parameter (a bias) is its split piece already; only matrices are reshaped
        return {
            n: p if len(s) == 1 else p.reshape(*batch, *s)
            for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`: ``{name: (..., *shape)}`` to ``(..., D)``."""
        first = tensors[self.names[0]]
        batch = first.shape[: first.dim() - len(self.shapes[0])]
        return torch.cat([tensors[n].reshape(*batch, -1) for n in self.names], dim=-1)


@dataclass
class LayerRecord:
    r"""One ``Linear`` or ``Conv2d`` layer seen during a recorded forward pass.

    ``inputs`` is the layer's input :math:`a` and ``outputs`` its pre-activation output
    :math:`s = W a + b`, both with the task dimension first: ``(T, N, ...)``. ``outputs`` is
    part of the autograd graph, so gradients of the network output with respect to it give
    the :math:`g` of the K-FAC and Gram-matrix formulas.
    """

    name: str
    kind: Literal["linear", "conv2d"]
    weight: str
    bias: str | None
    inputs: Tensor
    outputs: Tensor
    module: nn.Module


class BatchedNetwork:
    r"""Evaluate ``module`` at a batch of flat parameter vectors, one per task.

    Parameters
    ----------
    module:
        Any ``torch.nn.Module`` mapping a batch of inputs ``(N, *input_shape)`` to outputs
        ``(N, *output_shape)``. It is never modified; its parameters give the layout and the
        initial value.

    Notes
    -----
    Batch-norm layers use the statistics of each task's own points (the convention of MAML,
    Finn et al. 2017); running statistics are neither read nor updated.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.layout = ParameterLayout.from_module(module)
        self._plan = network_plan(module, self.layout.names)
        self._backprop_supported = _backprop_plan(self._plan)
        self._buffers = dict(module.named_buffers())
        # the modules of the weight layers, for LayerRecord.module
        self._layers: dict[str, nn.Module] = {
            step.path: module.get_submodule(step.path)
            for step in self._plan or ()
            if isinstance(step, (LinearStep, Conv2dStep))
        }

    @property
    def num_params(self) -> int:
        """:math:`D`, the length of the flat parameter vector."""
        return self.layout.num_params

    @property
    def plan(self) -> tuple[PlanStep, ...] | None:
        """The fast path's description: one immutable step per layer, in order
        (:mod:`hierbayes.models.network_plan`), or ``None`` when the module runs through
        ``torch.func.vmap`` instead. Parameters are named as in :attr:`layout`."""
        return self._plan

    @property
    def has_batch_norm(self) -> bool:
        """Whether the module normalises each task's batch of points (any batch-norm layer)."""
        return any(
            isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            for m in self.module.modules()
        )

    @property
    def has_fast_path(self) -> bool:
        """Whether the batched-matrix-product implementation (and layer records) applies."""
        return self._plan is not None

    def initial_parameters(self) -> Tensor:
        r""":math:`\theta_0`: the module's own initialisation as a flat vector ``(D,)``."""
        params = dict(self.module.named_parameters())
        return self.layout.flatten({n: p.detach() for n, p in params.items()}).clone()

    def __call__(self, phi: Tensor, x: Tensor) -> Tensor:
        """Outputs ``(T, N, *output_shape)`` for ``phi`` ``(T, D)`` and ``x`` ``(T, N, ...)``."""
        self._check(phi, x)
        if self._plan is None:
            return self._vmapped(phi, x)
        out, _ = self._run_plan(phi, x, record=False)
        return out

    def forward_with_records(self, phi: Tensor, x: Tensor) -> tuple[Tensor, list[LayerRecord]]:
        """Like calling the network, also returning a :class:`LayerRecord` per weight layer.

        Only available on the fast path (``has_fast_path``).
        """
        self._check(phi, x)
        if self._plan is None:
            raise NotImplementedError(
                "layer records need a plain nn.Sequential of "
                f"{[c.__name__ for c in SUPPORTED_LAYERS]}; "
                f"{type(self.module).__name__} runs through torch.func.vmap instead. Use a "
                "curvature backend that needs no layer structure ('full' or 'ggn' with "
                "jacobian='autograd')."
            )
        return self._run_plan(phi, x, record=True)

    def output_gradients(
        self, phi: Tensor, records: list[LayerRecord], seed: Tensor
    ) -> list[Tensor] | None:
        r"""Gradients of (combinations of) the outputs with respect to every layer's
        pre-activation, by explicit back-propagation, or ``None`` where not supported.

        ``seed`` ``(T, N, K, C)`` holds, for each of ``K`` combinations, the weights of the ``C``
        outputs: the result for layer ``l`` is ``(T, N, K, out_l)`` with entries
        :math:`\sum_c \mathrm{seed}_{n,k,c}\,\partial f_{n,c}/\partial s_{l,n}`. Written as
        ordinary tensor operations (matrix products with each layer's weights, activation
        derivatives from the recorded pre-activations), so differentiating the result is one
        plain backward pass rather than autograd's double backward. Supported: stacks of
        ``Linear`` layers, each followed by at most one ReLU, LeakyReLU, Tanh, Sigmoid or
        Identity.
        """
        if self._plan is None or not self._backprop_supported:
            return None
        T = phi.shape[0]
        params = self.layout.unflatten(phi)
        linear = [step for step in self._plan if isinstance(step, LinearStep)]
        if len(linear) != len(records) or any(r.inputs.dim() != 3 for r in records):
            return None
        grads: list[Tensor] = [seed] * len(records)
        current = seed  # gradient with respect to the output of the last step seen
        index = len(records) - 1
        for step in reversed(self._plan):
            if isinstance(step, LinearStep):
                grads[index] = current
                w = params[step.weight]  # (T, out, in)
                N, K = current.shape[1], current.shape[2]
                # one batched product per task: (T, N·K, out) @ (T, out, in)
                current = torch.bmm(current.reshape(T, N * K, -1), w).reshape(T, N, K, -1)
                index -= 1
            else:  # an activation right after linear layer `index`, whose output is its input
                assert isinstance(step, ActivationStep)
                s_pre = records[index].outputs
                current = current * _activation_derivative(step, s_pre).unsqueeze(2)
        return grads

    def vmapped(self, phi: Tensor, x: Tensor) -> Tensor:
        """The generic ``vmap(functional_call)`` implementation (the fast path's reference)."""
        self._check(phi, x)
        return self._vmapped(phi, x)

    # -- implementations -------------------------------------------------------------------

    def _check(self, phi: Tensor, x: Tensor) -> None:
        if phi.dim() != 2 or phi.shape[-1] != self.num_params:
            raise ValueError(
                f"phi must have shape (tasks, {self.num_params}); got {tuple(phi.shape)}"
            )
        if x.dim() < 2 or x.shape[0] != phi.shape[0]:
            raise ValueError(
                f"x must have shape (tasks, points, ...) with {phi.shape[0]} tasks to match phi; "
                f"got {tuple(x.shape)}"
            )

    def _vmapped(self, phi: Tensor, x: Tensor) -> Tensor:
        layout, module, buffers = self.layout, self.module, self._buffers

        def one_task(p: Tensor, xx: Tensor) -> Tensor:
            return functional_call(module, (layout.unflatten(p), buffers), (xx,))

        out: Tensor = vmap(one_task)(phi, x)
        return out

    def _run_plan(
        self, phi: Tensor, x: Tensor, *, record: bool
    ) -> tuple[Tensor, list[LayerRecord]]:
        assert self._plan is not None
        params = self.layout.unflatten(phi)  # {name: (T, *shape)}
        records: list[LayerRecord] = []
        h = x
        for step in self._plan:
            a = h
            h = torch_step(step, h, params)
            if record and isinstance(step, (LinearStep, Conv2dStep)):
                records.append(
                    LayerRecord(
                        step.path,
                        "linear" if isinstance(step, LinearStep) else "conv2d",
                        step.weight,
                        step.bias,
                        a,
                        h,
                        self._layers[step.path],
                    )
                )
        return h, records


def unfold_patches(inputs: Tensor, conv: nn.Conv2d) -> Tensor:
    r"""The input patches each output position of ``conv`` sees (im2col).

    ``inputs`` ``(..., C_in, H, W)`` gives ``(..., C_in·kh·kw, P)`` with ``P`` the number of
    output positions, ordered as ``conv.weight.reshape(C_out, -1)``'s columns, so the
    convolution's output is ``weight.reshape(C_out, -1) @ patches`` (plus the bias). Used for
    per-example weight gradients (Jacobian rows) and K-FAC's input factors of convolutions
    (Grosse & Martens 2016).
    """
    if isinstance(conv.padding, str):
        raise ValueError(
            f"unfold_patches needs numeric padding; got padding={conv.padding!r}, which the "
            "fast-path plan excludes"
        )
    if conv.groups != 1:
        raise ValueError(f"unfold_patches needs groups=1; got groups={conv.groups}")
    batch = inputs.shape[:-3]
    patches = F.unfold(
        inputs.reshape(-1, *inputs.shape[-3:]),
        conv.kernel_size,
        dilation=conv.dilation,
        padding=conv.padding,
        stride=conv.stride,
    )
    return patches.reshape(*batch, *patches.shape[1:])


# -- explicit back-propagation through Linear stacks -----------------------------------------

_DERIVATIVE_KNOWN = frozenset({"relu", "leaky_relu", "tanh", "sigmoid", "identity"})


def _backprop_plan(plan: tuple[PlanStep, ...] | None) -> bool:
    """Whether the plan is Linear layers, each followed by at most one known activation."""
    if not plan or not isinstance(plan[0], LinearStep):
        return False
    previous: PlanStep | None = None
    for step in plan:
        if isinstance(step, ActivationStep):
            if not isinstance(previous, LinearStep) or step.name not in _DERIVATIVE_KNOWN:
                return False
        elif not isinstance(step, LinearStep):
            return False
        previous = step
    return True


def _activation_derivative(step: ActivationStep, s: Tensor) -> Tensor:
    """The derivative of an element-wise activation at its input ``s``."""
    if step.name == "relu":
        return (s > 0).to(s.dtype)
    if step.name == "leaky_relu":
        slope = step.kwargs["negative_slope"]
        return torch.where(s > 0, torch.ones_like(s), torch.full_like(s, slope))
    if step.name == "tanh":
        return 1 - torch.tanh(s).square()
    if step.name == "sigmoid":
        sig = torch.sigmoid(s)
        return sig * (1 - sig)
    return torch.ones_like(s)
