r"""The generalised Gauss--Newton matrix of any Pyro program, from its own observation sites.

For a task's observed sites with distributions :math:`p(y_n \mid \eta_n(\phi))`, the GGN is

.. math::

    \hat H_j = \sum_n J_n^\top F_n J_n + P_j, \qquad
    J_n = \frac{\partial \eta_n}{\partial \phi}\Big|_{\hat\phi_j}, \qquad
    F_n = \mathbb E_{y\sim p(\cdot\mid\eta_n)}\big[\nabla_\eta \log p(y\mid\eta_n)
          \nabla_\eta \log p(y\mid\eta_n)^\top\big],

the Fisher information :math:`F_n` of the observation distribution in its own parameters
:math:`\eta_n` pulled back through the Jacobian (Schraudolph 2002; Martens 2020). With a
factor :math:`F_n = L_nL_n^\top` it is :math:`\tilde J^\top\tilde J + P` with whitened rows
:math:`\tilde J_n = L_n^\top J_n`, the form the ``ggn`` and ``diag`` backends take. For
canonical links (Normal location, Bernoulli, Binomial and Categorical logits, Poisson log rate)
the GGN is the exact Hessian of :math:`-\log p(y\mid\phi)` whenever :math:`\eta` is affine in :math:`\phi`.

The Fisher informations are exact for the common families
(:mod:`~hierbayes.inference.curvature.families`: Normal, StudentT, Bernoulli, Binomial,
Geometric, NegativeBinomial, Categorical, Poisson, Exponential, Gamma, Beta, LogNormal,
Laplace, Cauchy, HalfNormal, HalfCauchy, Gumbel). Any other distribution (or a StudentT whose
``df``, a Binomial or NegativeBinomial whose count depends on :math:`\phi`) gets a Monte Carlo
Fisher: with ``S`` draws :math:`y^{(s)}_n \sim p(\cdot\mid\eta_n)`, the rows
:math:`\nabla_\phi \log p(y^{(s)}_n\mid\phi)/\sqrt S`, whose Gram matrix is an unbiased estimate
of :math:`J_n^\top F_n J_n`. The draws come from a generator seeded with a constant (0, unless
the caller passes one), so the estimate, and an evidence built on it, is a deterministic
function of its input, as a deterministic optimiser's line search needs; the global random
stream is left alone. For a discrete family the draws still jump as :math:`\phi` moves, so the
estimate is piecewise smooth in :math:`\theta` and a line search can stall at a jump: prefer
``curvature="full"`` there. Every site's ``scale`` and ``mask`` and the
batch's padding mask ``(T, N)`` weight the rows; one batched reverse-mode call
(``is_grads_batched``) gives every row of every task, differentiable into :math:`\theta` through
:math:`\hat\phi` when ``inputs.create_graph``.

References: Schraudolph (2002), Fast curvature matrix-vector products for second-order gradient
descent; Martens (2020), New insights and perspectives on the natural gradient method; Lange,
Little & Taylor (1989), Robust statistical modeling using the t distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature.base import CurvatureInputs
from hierbayes.inference.curvature.families import exact_fisher
from hierbayes.models.density import PyroTaskDensity
from hierbayes.models.structure import trace_nodes

__all__ = [
    "FISHER_DRAWS",
    "exact_fisher",
    "observation_jacobian",
    "observed_sites",
]

#: Draws per point of the Monte Carlo Fisher (distributions without an exact one).
FISHER_DRAWS = 64


def observed_sites(
    density: PyroTaskDensity, params: Any, phi: Tensor, x: Tensor, y: Tensor | None
) -> dict[str, Any]:
    """The observed sites (name to trace node, ``fn`` its distribution) of the program at ``phi``."""
    nodes = trace_nodes(density.trace(params, phi, x, y))
    return {name: nodes[name] for name in density.structure.observed_sites}


@dataclass
class _Rows:
    """Values ``(T, R_raw)`` whose Jacobian in phi, transformed, gives whitened rows."""

    values: Tensor
    whiten: Callable[[Tensor], Tensor]  # (T, R_raw, D) -> (T, R, D)


def _tasks_first(value: Tensor, axis: int, num_tasks: int, lead: int) -> Tensor:
    """Move batch axis ``axis`` (with ``lead`` leading shape entries) to the front, size ``T``,
    and flatten the batch dims after it: ``(T, M, *rest)``."""
    shape = list(value.shape)
    shape[axis] = num_tasks
    value = value.expand(*shape).movedim(axis, 0)
    return value.reshape(num_tasks, -1, *value.shape[lead:])


def _point_weights(site: Any, fn: Any, inputs: CurvatureInputs, tasks_axis: int) -> Tensor:
    """The weight of each batch element of ``fn`` (site scale, site mask, padding mask)."""
    ref = inputs.phi
    w = torch.ones(fn.batch_shape, dtype=ref.dtype, device=ref.device)
    scale = site["scale"]
    if scale is not None:
        w = w * scale
    site_mask = site["mask"]
    if isinstance(site_mask, bool):
        w = w * float(site_mask)
    elif site_mask is not None:
        w = w * site_mask.to(w.dtype)
    if inputs.mask is not None:
        data_dim = inputs.density.structure.data_dims.get(site["name"])
        if data_dim is None:
            raise ModelContractError(
                f"observed site {site['name']!r} is not in a nested data plate, so tasks of "
                "unequal sizes cannot be masked: put the observations in pyro.plate('data', N)"
            )
        nb = len(fn.batch_shape)
        shape = [1] * nb
        shape[tasks_axis] = inputs.num_tasks
        shape[nb + data_dim] = inputs.mask.shape[1]
        data_axis = nb + data_dim
        m = inputs.mask if tasks_axis < data_axis else inputs.mask.T
        w = w * m.reshape(shape).to(w.dtype)
    return w


def _mask_of(masked: Any, value: Tensor) -> Tensor:
    """The mask of a ``MaskedDistribution`` (``fn.mask(m)``), read through its public
    ``log_prob``: masked-out elements score exactly 0. An element whose unmasked log density is
    itself 0 (probability one: no Fisher information) reads as kept."""
    kept = masked.log_prob(value) != 0
    return kept | (masked.base_dist.log_prob(value) == 0)


def _unwrap(fn: Any, weights: Tensor, value: Tensor) -> tuple[Any, Tensor]:
    """Strip ``Independent``/``Masked``/``Expanded`` wrappers; the weights ``fn.batch_shape``
    (times any wrapper's mask) to the base distribution's batch shape."""
    base, masks = fn, []
    while isinstance(base, (dist.MaskedDistribution, dist.Independent, dist.ExpandedDistribution)):
        if isinstance(base, dist.MaskedDistribution):
            with torch.no_grad():
                masks.append((_mask_of(base, value.detach()), base.batch_shape))
        base = base.base_dist
    full = tuple(base.batch_shape)

    def padded(value: Tensor) -> Tensor:
        return value.reshape(*value.shape, *([1] * (len(full) - value.dim())))

    weights = padded(weights)
    for mask, shape in masks:
        if isinstance(mask, Tensor):
            weights = weights * padded(mask.expand(shape).to(weights.dtype))
        elif not mask:
            weights = weights * 0.0
    return base, weights.expand(full)


def _exact_rows(
    pieces: list[tuple[Tensor, Tensor]], weights: Tensor, axis: int, T: int
) -> list[_Rows]:
    lead = weights.dim()
    root_w = _tasks_first(weights, axis, T, lead).sqrt()  # (T, M)
    rows = []
    for eta, factor in pieces:
        e = _tasks_first(eta, axis, T, lead)  # (T, M, k)
        L = _tasks_first(factor, axis, T, lead)  # (T, M, k) or (T, M, k, k)
        M, k = e.shape[1], e.shape[2]

        def whiten(J: Tensor, L: Tensor = L, M: int = M, k: int = k) -> Tensor:
            J = J.reshape(J.shape[0], M, k, -1)
            if L.dim() == 3:
                Jw = J * (L * root_w.unsqueeze(-1)).unsqueeze(-1)
            else:
                Jw = torch.einsum("tmcd,tmck->tmkd", J, L) * root_w[..., None, None]
            return Jw.reshape(J.shape[0], M * k, -1)

        rows.append(_Rows(e.reshape(T, M * k), whiten))
    return rows


def _draws(fn: Any, num_draws: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``num_draws`` draws from ``fn`` from a seed taken off ``generator`` (Pyro's samplers take
    no generator), leaving the global random state as it was."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return fn.sample((num_draws,)).detach()


def _parameters(fn: Any) -> dict[str, Tensor]:
    """``fn``'s parameter tensors, each expanded to ``fn.batch_shape`` plus its own event part;
    of ``probs``/``logits`` the logits (the same distribution; the Fisher follows the chain rule)."""
    found: dict[str, Tensor] = {}
    for name, constraint in fn.arg_constraints.items():
        if name == "probs" and "logits" in fn.arg_constraints:
            continue
        value = getattr(fn, name, None)
        if not isinstance(value, Tensor):
            continue
        event = value.shape[value.dim() - constraint.event_dim :] if constraint.event_dim else ()
        found[name] = value.expand(*fn.batch_shape, *event)
    return found


def _monte_carlo_rows(
    fn: Any,
    weights: Tensor,
    axis: int,
    T: int,
    num_draws: int,
    generator: torch.Generator,
    create_graph: bool,
) -> _Rows | None:
    r"""Rows :math:`g_{sn}^\top J_n \sqrt{w_n/S}` from the scores :math:`g_{sn} =
    \nabla_\eta\log p(y^{(s)}_n\mid\eta_n)` of ``S`` draws, in the parameters ``fn`` was
    built with (rebuilt from them); ``None`` if ``fn`` cannot be rebuilt so."""
    params = _parameters(fn)
    varying = {k: v for k, v in params.items() if v.requires_grad}
    if not varying:
        return None
    # one copy per draw, so that the gradient of the summed log density holds each draw's score
    sources = {}
    for name, v in varying.items():
        copies = v.expand(num_draws, *v.shape)
        sources[name] = copies if create_graph else copies.detach().requires_grad_(True)
    fixed = {
        k: v.detach().expand(num_draws, *v.shape) for k, v in params.items() if k not in varying
    }
    try:
        rebuilt = type(fn)(**sources, **fixed, validate_args=False)
    except (TypeError, ValueError):
        return None
    draws = _draws(fn, num_draws, generator, weights.device)
    lp = rebuilt.log_prob(draws)  # (S, *batch)
    scores = torch.autograd.grad(lp.sum(), list(sources.values()), create_graph=create_graph)
    lead = weights.dim()
    etas, gs = [], []
    for value, score in zip(varying.values(), scores, strict=True):
        etas.append(
            _tasks_first(value, axis, T, lead).reshape(T, -1, int(value[(0,) * lead].numel()))
        )
        g = _tasks_first(score, axis + 1, T, lead + 1)  # (T, S * M, *event)
        gs.append(g.reshape(T, num_draws, etas[-1].shape[1], -1))
    eta = torch.cat(etas, dim=-1)  # (T, M, k)
    G = torch.cat(gs, dim=-1)  # (T, S, M, k)
    M, k = eta.shape[1], eta.shape[2]
    w = (_tasks_first(weights, axis, T, lead).reshape(T, 1, M) / num_draws).sqrt()

    def whiten(J: Tensor) -> Tensor:
        rows = torch.einsum("tsmk,tmkd->tsmd", G, J.reshape(T, M, k, -1)) * w.unsqueeze(-1)
        return rows.reshape(T, num_draws * M, -1)

    return _Rows(eta.reshape(T, M * k), whiten)


def _pyro_density(inputs: CurvatureInputs) -> PyroTaskDensity:
    if not isinstance(inputs.density, PyroTaskDensity):
        raise ModelContractError(
            "curvature from the observation sites needs a Pyro program's density "
            f"(PyroTaskDensity); got {type(inputs.density).__name__}. Use curvature='full'"
        )
    return inputs.density


def observation_jacobian(
    inputs: CurvatureInputs,
    *,
    num_draws: int = FISHER_DRAWS,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Whitened rows :math:`\tilde J` ``(T, R, D)`` with :math:`\tilde J^\top\tilde J =
    \sum_n J_n^\top F_n J_n`, from every observed site of the program at ``inputs.phi``.

    ``num_draws`` and ``generator`` (default: seeded with 0, so the estimate is a deterministic
    function of :math:`\phi`) are for sites without an exact Fisher.
    """
    density = _pyro_density(inputs)
    structure = density.structure
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    T, D = inputs.num_tasks, inputs.num_params
    cg = inputs.create_graph
    with torch.enable_grad():
        phi = inputs.phi
        if not phi.requires_grad or not cg:
            phi = phi.detach().requires_grad_(True)
        rows: list[_Rows] = []
        sites = observed_sites(density, inputs.params, phi, inputs.x, inputs.y)
        for site in sites.values():
            fn = site["fn"]
            axis = len(fn.batch_shape) + structure.tasks_dim
            weights = _point_weights(site, fn, inputs, axis)
            base, base_weights = _unwrap(fn, weights, site["value"])
            pieces = exact_fisher(base, phi) if base.event_shape == () else None
            if pieces is not None:
                rows.extend(_exact_rows(pieces, base_weights, axis, T))
                continue
            mc = _monte_carlo_rows(base, base_weights, axis, T, num_draws, generator, cg)
            if mc is None:
                raise ModelContractError(
                    f"observed site {site['name']!r}: no Fisher information for "
                    f"{type(base).__name__} (it cannot be rebuilt from its parameters "
                    f"{sorted(base.arg_constraints)}); use curvature='full'"
                )
            rows.append(mc)
        values = torch.cat([r.values for r in rows], dim=1)
        R = values.shape[1]
        J: Tensor | None = None
        if values.requires_grad:
            seeds = torch.eye(R, dtype=values.dtype, device=values.device)
            (J,) = torch.autograd.grad(
                values,
                phi,
                grad_outputs=seeds.reshape(R, 1, R).expand(R, T, R),
                is_grads_batched=True,
                create_graph=cg,
                allow_unused=True,
            )
        J = values.new_zeros(T, R, D) if J is None else J.permute(1, 0, 2)
        blocks, start = [], 0
        for r in rows:
            width = r.values.shape[1]
            blocks.append(r.whiten(J[:, start : start + width]))
            start += width
        whitened = torch.cat(blocks, dim=1)
    return whitened if cg else whitened.detach()
