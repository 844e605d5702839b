r"""Truncated gradient ascent on each task's log density: the pure inner loop of MAML.

For all tasks of a batch at once,

.. math::

    \phi_{(0)} = \mathbb E[\phi \mid \theta], \qquad
    \phi_{(k)} = \phi_{(k-1)} + \alpha \odot \nabla_\phi \log p(\mathcal D^s_j \mid \phi)\big|_{\phi_{(k-1)}}

(Finn et al. 2017, eq. 1; Grant et al. 2018, eq. 1). ``log p`` may be the support log
likelihood or the log joint :math:`\log p(\mathcal D^s_j\mid\phi) + \log p(\phi\mid\theta)`.
A per-parameter :math:`\alpha \in \mathbb R^D_{>0}` is the diagonal preconditioner of
Meta-SGD (Li et al. 2017), equivalently a learned prior covariance (MATH.md §3).

Because tasks are independent, the gradient of :math:`\sum_j \log p_j(\phi_j)` with respect to
the stacked :math:`\phi \in \mathbb R^{T\times D}` holds every task's own gradient: one autograd
call per step serves the whole plate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, cast

import torch
from torch import Tensor

from hierbayes.inference.core.joint import log_joint
from hierbayes.models.density import NetworkDensity, TaskDensity, capabilities

__all__ = [
    "InnerLoss",
    "adapt_tasks",
    "effective_step_size",
    "gradient_steps",
    "mean_squared_error",
    "support_counts",
]


def gradient_steps(
    log_density: Callable[[Tensor], Tensor],
    phi0: Tensor,
    *,
    steps: int,
    step_size: Tensor | float,
    first_order: bool = False,
    checkpoint: bool = False,
) -> Tensor:
    r"""Take ``steps`` gradient-ascent steps on ``log_density`` from ``phi0``.

    Parameters
    ----------
    log_density:
        Maps :math:`\phi` ``(T, D)`` to per-task log densities ``(T,)``; task ``j``'s value
        must depend on row ``j`` only.
    phi0:
        ``(T, D)`` starting point, usually :math:`\theta` broadcast over tasks.
    steps:
        :math:`k \ge 0`.
    step_size:
        :math:`\alpha`: a scalar, or ``(D,)`` per-parameter step sizes.
    first_order:
        Detach each inner gradient (first-order MAML): the meta-gradient then flows into
        :math:`\theta` only through :math:`\phi_{(0)}` and into :math:`\alpha` through the
        step itself.
    checkpoint:
        Gradient checkpointing (``torch.utils.checkpoint``, non-reentrant): each step keeps
        only its input :math:`\phi_{(i-1)}` for the meta-gradient and recomputes its forward
        and inner backward pass during the outer backward pass, so the memory of a
        second-order meta-gradient no longer grows with every step's activations (about one
        more forward and backward pass a step). The values and gradients are the same. Only
        used when the caller takes second-order meta-gradients.

    Returns
    -------
    Tensor
        :math:`\phi_{(k)}`, ``(T, D)``. When gradients are enabled by the caller it is a
        differentiable function of ``phi0`` and ``step_size`` (second order unless
        ``first_order``); otherwise it is detached and no graph is kept.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad and not first_order
    # Without outer gradients phi0 is detached: under no_grad a view of a parameter still
    # reports requires_grad=True while being outside any graph.
    phi = phi0 if outer_grad else phi0.detach()
    if checkpoint and create_graph:
        return _checkpointed_steps(log_density, phi, steps, step_size)
    with torch.enable_grad():
        for _ in range(steps):
            if not outer_grad or not phi.requires_grad:
                phi = phi.detach().requires_grad_(True)
            value = log_density(phi).sum()
            (grad,) = torch.autograd.grad(value, phi, create_graph=create_graph)
            if first_order or not outer_grad:
                grad = grad.detach()
            phi = phi + step_size * grad
    return phi if outer_grad else phi.detach()


def _checkpointed_steps(
    log_density: Callable[[Tensor], Tensor], phi: Tensor, steps: int, step_size: Tensor | float
) -> Tensor:
    """Second-order inner steps, each under a non-reentrant ``torch.utils.checkpoint``."""
    from torch.utils.checkpoint import checkpoint

    def one_step(current: Tensor, alpha: Tensor | float) -> Tensor:
        if not current.requires_grad:
            current = current.detach().requires_grad_(True)
        value = log_density(current).sum()
        (grad,) = torch.autograd.grad(value, current, create_graph=True)
        return current + alpha * grad

    with torch.enable_grad():
        for _ in range(steps):
            phi = cast(Tensor, checkpoint(one_step, phi, step_size, use_reentrant=False))
    return phi


InnerLoss = Literal["sum", "mean", "mse"]


def support_counts(x: Tensor, mask: Tensor | None) -> Tensor:
    """The number of real support points of each task, ``(T,)``, as ``x``'s dtype."""
    if mask is None:
        return torch.full((x.shape[0],), float(x.shape[1]), dtype=_float(x), device=x.device)
    return mask.sum(1).to(_float(x)).clamp_min(1.0)


def _float(x: Tensor) -> torch.dtype:
    return x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()


def mean_squared_error(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Each task's mean squared error :math:`\frac1{N_j}\sum_n\lVert y_{jn} - f(x_{jn};\phi_j)
    \rVert^2`, ``(T,)``, for a network model (the inner loss of Finn et al. 2017)."""
    capabilities(density).require(
        "network",
        "inner_loss='mse'",
        "use inner_loss='mean' (the mean negative log likelihood) for this model",
    )
    f = cast(NetworkDensity, density).outputs(params, phi, x)
    sq = (y.reshape(f.shape) - f).square().reshape(f.shape[0], f.shape[1], -1).sum(-1)
    if mask is not None:
        sq = torch.where(mask, sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
    return sq.sum(-1) / support_counts(x, mask)


def adapt_tasks(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    steps: int,
    step_size: Tensor | float,
    first_order: bool = False,
    joint: bool = False,
    loss: InnerLoss = "sum",
    checkpoint: bool = False,
) -> Tensor:
    r""":math:`\hat\phi` ``(T, D)``: ``steps`` gradient steps from the prior mean on each task's
    support data ``x`` ``(T, N, ...)``, ``y``, ``mask`` ``(T, N)``.

    ``loss`` chooses what each step climbs, with :math:`N_j` the task's support points:

    * ``"sum"``: :math:`\log p(y^s_j\mid\phi)` (the hierarchical model's own likelihood);
    * ``"mean"``: :math:`\frac1{N_j}\log p(y^s_j\mid\phi)`: the step no longer grows with
      :math:`N_j`;
    * ``"mse"``: :math:`-\frac1{N_j}\sum_n\lVert y_{jn}-f(x_{jn};\phi)\rVert^2`, MAML's own
      step (Finn et al. 2017) for a network model: independent of :math:`N_j` and of a learned
      noise scale :math:`\sigma`. For a Gaussian likelihood it equals the ``"sum"`` step with
      :math:`\alpha_{\text{sum}} = 2\sigma^2\alpha/N_j` (:func:`effective_step_size`).

    With ``joint`` the step adds :math:`\log p(\phi\mid\theta)` (scaled by :math:`1/N_j` with
    ``"mean"``); it starts at :math:`\mathbb E[\phi\mid\theta]` (``density.prior_mean``). A
    pure function of ``params`` and ``step_size``: nothing is mutated, and the result is
    differentiable in both. ``checkpoint`` checkpoints each inner step
    (:func:`gradient_steps`).
    """
    if loss not in ("sum", "mean", "mse"):
        raise ValueError(f"inner loss must be 'sum', 'mean' or 'mse'; got {loss!r}")
    if loss == "mse" and joint:
        raise ValueError(
            "inner_loss='mse' is MAML's likelihood-only step; for a step on the log joint use "
            "inner_loss='mean' or 'sum' with inner_objective='joint'"
        )
    scale = None if loss == "sum" else 1.0 / support_counts(x, mask)

    def log_density(phi: Tensor) -> Tensor:
        if loss == "mse":
            return -mean_squared_error(density, params, phi, x, y, mask)
        if joint:
            value = log_joint(density, params, phi, x, y, mask)
        else:
            value = density.log_likelihood(params, phi, x, y, mask)
        return value if scale is None else value * scale

    return gradient_steps(
        log_density,
        density.prior_mean(params, x),
        steps=steps,
        step_size=step_size,
        first_order=first_order,
        checkpoint=checkpoint,
    )


def effective_step_size(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    x: Tensor,
    mask: Tensor | None,
    step_size: Tensor | float,
    loss: InnerLoss,
) -> Tensor:
    r"""The step size on the summed log likelihood that each task's step amounts to, ``(T,)``
    (or ``(T, D)`` for per-parameter steps): :math:`\alpha` (``"sum"``), :math:`\alpha/N_j`
    (``"mean"``) or :math:`2\sigma^2\alpha/N_j` (``"mse"``, Gaussian likelihoods)."""
    alpha = torch.as_tensor(step_size, dtype=_float(x), device=x.device)
    counts = support_counts(x, mask)
    per_task = torch.ones_like(counts)
    if loss == "mean":
        per_task = 1.0 / counts
    elif loss == "mse":
        caps = capabilities(density)
        caps.require("gaussian", "the effective step of inner_loss='mse'", "use 'mean'")
        net = cast(NetworkDensity, density)
        phi = density.prior_mean(params, x[:, :1])
        f = net.outputs(params, phi, x[:, :1])
        sigma2 = net.noise_variance(params, phi, f).reshape(x.shape[0], -1)[:, 0]
        per_task = 2.0 * sigma2 / counts
    return per_task * alpha if alpha.dim() == 0 else per_task[:, None] * alpha
