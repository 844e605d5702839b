r"""A ``torch.nn.Module`` as a batched function of a flat per-task parameter vector.

Meta-learning evaluates one network at ``T`` different parameter vectors at once, one per task:

.. math::

    f(\phi_j; x_{j,n}), \qquad \phi \in \mathbb{R}^{T \times D},\;
    x \in \mathbb{R}^{T \times N \times \cdots}.

:class:`BatchedNetwork` turns a module into that function without touching the module:
the module's own parameters only supply the layout and the initial value
:math:`\theta_0` (the module's own initialisation). Two implementations share one contract:

* a fast path for (nested) ``nn.Sequential`` stacks of ``Linear``, ``Conv2d``, pooling,
  ``Flatten``, batch norm and element-wise activations, written with batched matrix
  products (``baddbmm``) and grouped convolutions, which can also record every
  ``Linear``/``Conv2d`` layer's input and pre-activation output for the curvature backends
  (generalised Gauss--Newton Gram matrices, K-FAC factors);
* ``torch.func.vmap`` over ``torch.func.functional_call`` for any other module.

The tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["BatchedNetwork", "LayerRecord", "ParameterLayout"]


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

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

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
        parts = torch.split(flat, list(self.sizes), dim=-1)
        batch = flat.shape[:-1]
        return {
            n: p.reshape(*batch, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)
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


_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.LeakyReLU,
    nn.Identity,
)
_SUPPORTED: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    *_ELEMENTWISE,
)


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path + ".")
        else:
            yield path, child


_FUNCTIONAL: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.ReLU: torch.relu,
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
    nn.Identity: lambda h: h,
}


@dataclass(frozen=True)
class _Step:
    """One layer of the fast path, with the positions of its parameters in the layout."""

    path: str
    kind: str
    module: nn.Module
    weight: int | None = None
    bias: int | None = None
    weight_shape: tuple[int, ...] = ()
    fn: Callable[[Tensor], Tensor] | None = None


def _fast_plan(module: nn.Module, layout: ParameterLayout) -> list[_Step] | None:
    """The layers of a supported ``nn.Sequential`` (or of one supported layer) as steps, or
    ``None`` for the generic path."""
    if isinstance(module, nn.Sequential):
        leaves = list(_leaves(module))
    elif type(module) in _SUPPORTED:
        leaves = [("", module)]
    else:
        return None
    index = {name: i for i, name in enumerate(layout.names)}
    plan: list[_Step] = []
    for path, leaf in leaves:
        if type(leaf) not in _SUPPORTED:
            return None
        if isinstance(leaf, nn.Conv2d) and (
            leaf.groups != 1 or leaf.padding_mode != "zeros" or isinstance(leaf.padding, str)
        ):
            return None
        if isinstance(leaf, nn.Flatten) and (leaf.start_dim != 1 or leaf.end_dim != -1):
            return None
        prefix = f"{path}." if path else ""
        w, b = index.get(f"{prefix}weight"), index.get(f"{prefix}bias")
        if isinstance(leaf, (nn.Linear, nn.Conv2d)):
            kind = "linear" if isinstance(leaf, nn.Linear) else "conv2d"
            plan.append(_Step(path, kind, leaf, w, b, tuple(leaf.weight.shape)))
        elif isinstance(leaf, (nn.BatchNorm1d, nn.BatchNorm2d)):
            plan.append(_Step(path, "batchnorm", leaf, w, b))
        elif isinstance(leaf, nn.Flatten):
            plan.append(_Step(path, "flatten", leaf))
        elif isinstance(leaf, (nn.MaxPool2d, nn.AvgPool2d)):
            plan.append(_Step(path, "pool", leaf))
        else:
            plan.append(_Step(path, "activation", leaf, fn=_FUNCTIONAL.get(type(leaf), leaf)))
    return plan


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
        self._plan = _fast_plan(module, self.layout)
        self._sizes = list(self.layout.sizes)
        self._backprop_supported = _backprop_plan(self._plan)
        self._buffers = dict(module.named_buffers())

    @property
    def num_params(self) -> int:
        """:math:`D`, the length of the flat parameter vector."""
        return self.layout.num_params

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
                f"layer records need a plain nn.Sequential of {[c.__name__ for c in _SUPPORTED]}; "
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
        parts = torch.split(phi, self._sizes, dim=-1)
        linear = [step for step in self._plan if step.kind == "linear"]
        if len(linear) != len(records) or any(r.inputs.dim() != 3 for r in records):
            return None
        grads: list[Tensor] = [seed] * len(records)
        current = seed  # gradient with respect to the output of the last step seen
        index = len(records) - 1
        for step in reversed(self._plan):
            if step.kind == "linear":
                grads[index] = current
                w = parts[step.weight].view(T, *step.weight_shape)  # type: ignore[index]
                N, K = current.shape[1], current.shape[2]
                # one batched product per task: (T, N·K, out) @ (T, out, in)
                current = torch.bmm(current.reshape(T, N * K, -1), w).reshape(T, N, K, -1)
                index -= 1
            else:  # an activation right after linear layer index+1... i.e. the record at index
                s_pre = records[index].outputs  # its input: the previous linear layer's output
                current = current * _activation_derivative(step.module, s_pre).unsqueeze(2)
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
        T = phi.shape[0]
        parts = torch.split(phi, self._sizes, dim=-1)
        records: list[LayerRecord] = []
        h = x
        for step in self._plan:
            kind = step.kind
            if kind == "activation":
                h = step.fn(h)  # type: ignore[misc]
            elif kind == "linear" or kind == "conv2d":
                w = parts[step.weight].view(T, *step.weight_shape)  # type: ignore[index]
                b = None if step.bias is None else parts[step.bias]
                a = h
                if kind == "linear":
                    h = _batched_linear(a, w, b)
                else:
                    h = _batched_conv2d(a, w, b, step.module)  # type: ignore[arg-type]
                if record:
                    names = self.layout.names
                    records.append(
                        LayerRecord(
                            step.path,
                            kind,  # type: ignore[arg-type]
                            names[step.weight],  # type: ignore[index]
                            None if step.bias is None else names[step.bias],
                            a,
                            h,
                            step.module,
                        )
                    )
            elif kind == "batchnorm":
                scale = None if step.weight is None else parts[step.weight]
                shift = None if step.bias is None else parts[step.bias]
                h = _batched_batch_norm(h, scale, shift, step.module.eps)  # type: ignore[arg-type]
            elif kind == "flatten":
                h = h.reshape(h.shape[0], h.shape[1], -1)
            else:  # pooling over each task's points
                n = h.shape[1]
                y = step.module(h.reshape(T * n, *h.shape[2:]))
                h = y.reshape(T, n, *y.shape[1:])
        return h, records


_DERIVATIVE_KNOWN = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _backprop_plan(plan: list[_Step] | None) -> bool:
    """Whether the plan is Linear layers, each followed by at most one known activation."""
    if plan is None or not plan or plan[0].kind != "linear":
        return False
    previous = ""
    for step in plan:
        if step.kind == "activation":
            if previous != "linear" or not isinstance(step.module, _DERIVATIVE_KNOWN):
                return False
        elif step.kind != "linear":
            return False
        previous = step.kind
    return True


def _activation_derivative(module: nn.Module, s: Tensor) -> Tensor:
    """The derivative of an element-wise activation at its input ``s``."""
    if isinstance(module, nn.ReLU):
        return (s > 0).to(s.dtype)
    if isinstance(module, nn.LeakyReLU):
        return torch.where(s > 0, torch.ones_like(s), torch.full_like(s, module.negative_slope))
    if isinstance(module, nn.Tanh):
        return 1 - torch.tanh(s).square()
    if isinstance(module, nn.Sigmoid):
        sig = torch.sigmoid(s)
        return sig * (1 - sig)
    return torch.ones_like(s)


def _batched_linear(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``a`` ``(T, N, ..., in)``, ``w`` ``(T, out, in)``, ``b`` ``(T, out)``."""
    flat = a if a.dim() == 3 else a.reshape(a.shape[0], -1, a.shape[-1])
    if b is None:
        y = torch.bmm(flat, w.transpose(1, 2))
    else:
        y = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
    return y if a.dim() == 3 else y.reshape(*a.shape[:-1], w.shape[1])


def _batched_conv2d(a: Tensor, w: Tensor, b: Tensor | None, conv: nn.Conv2d) -> Tensor:
    """Grouped convolution: task ``t``'s filters see only task ``t``'s channels."""
    T, N = a.shape[0], a.shape[1]
    c_out = w.shape[1]
    x = a.transpose(0, 1).reshape(N, T * a.shape[2], *a.shape[3:])
    y = F.conv2d(
        x,
        w.reshape(T * c_out, *w.shape[2:]),
        None if b is None else b.reshape(T * c_out),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=T,
    )
    return y.reshape(N, T, c_out, *y.shape[2:]).transpose(0, 1)


def _batched_batch_norm(
    h: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Normalise with each task's own batch statistics over points (and spatial positions)."""
    T, C = h.shape[0], h.shape[2]
    reduce_dims = [1, *range(3, h.dim())]
    mean = h.mean(dim=reduce_dims, keepdim=True)
    var = h.var(dim=reduce_dims, keepdim=True, unbiased=False)
    y = (h - mean) / torch.sqrt(var + eps)
    shape = (T, 1, C) + (1,) * (h.dim() - 3)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y
