r"""Exact Fisher informations of the common observation families, in their own parameters.

For an observation :math:`y \sim p(\cdot\mid\eta)` the Fisher information in the parameters
:math:`\eta` the program passed is

.. math::

    F(\eta) = \mathbb E_{y\sim p(\cdot\mid\eta)}\big[\nabla_\eta\log p(y\mid\eta)\,
        \nabla_\eta\log p(y\mid\eta)^\top\big]
      = -\mathbb E_{y}\big[\nabla^2_\eta\log p(y\mid\eta)\big],

and :func:`exact_fisher` returns it as pieces ``(eta, L)`` with :math:`F = LL^\top`, only for the
parameters that depend on :math:`\phi` (a parameter that does not has a zero Jacobian, and the
off-diagonal blocks it shares with one that does meet a zero, so the block of the varying ones
is the whole of :math:`J^\top F J`). Two parameters with a cross term are one piece with a
``2 x 2`` Cholesky factor

.. math::

    L = \begin{pmatrix}\sqrt{F_{aa}} & 0\\ F_{ab}/\sqrt{F_{aa}} &
        \sqrt{F_{bb} - F_{ab}^2/F_{aa}}\end{pmatrix}.

Families with probabilities are worked in their logits whichever way they were built (the
distribution computes one from the other differentiably, and the Fisher transforms with the
chain rule, so :math:`J_{\text{logits}}^\top F_{\text{logits}} J_{\text{logits}}` is the same
matrix as in probabilities). With :math:`p = \sigma(\ell)`, :math:`\psi'` the trigamma function
and :math:`\gamma` Euler's constant, per point:

==================================  ===========================================================
distribution                        :math:`F` in the parameters the program passed
==================================  ===========================================================
Normal(loc, scale)                  :math:`1/\sigma^2` (loc); :math:`2/\sigma^2` (scale)
StudentT(df, loc, scale)            :math:`(\nu+1)/((\nu+3)\sigma^2)` (loc); :math:`2\nu/((\nu+3)\sigma^2)` (scale)
Bernoulli(logits | probs)           :math:`p(1-p)` in the logits
Binomial(n, logits | probs)         :math:`n\,p(1-p)` in the logits
Geometric(logits | probs)           :math:`1-p` in the logits (failures before the first success)
NegativeBinomial(r, logits | probs) :math:`r\,p` in the logits (successes before the r-th failure)
Categorical(logits | probs)         :math:`\operatorname{diag}(p)-pp^\top` in the logits
Poisson(rate)                       :math:`1/\lambda`
Exponential(rate)                   :math:`1/\lambda^2`
Gamma(concentration, rate)          :math:`\begin{pmatrix}\psi'(\alpha) & -1/\beta\\ -1/\beta & \alpha/\beta^2\end{pmatrix}`
Beta(a, b)                          :math:`\begin{pmatrix}\psi'(a)-\psi'(a+b) & -\psi'(a+b)\\ -\psi'(a+b) & \psi'(b)-\psi'(a+b)\end{pmatrix}`
LogNormal(loc, scale)               as Normal (it is a Normal of :math:`\log y`)
Laplace(loc, scale)                 :math:`1/b^2` (loc); :math:`1/b^2` (scale)
Cauchy(loc, scale)                  :math:`1/(2\gamma^2)` (loc); :math:`1/(2\gamma^2)` (scale)
HalfNormal(scale)                   :math:`2/\sigma^2`
HalfCauchy(scale)                   :math:`1/(2\gamma^2)`
Gumbel(loc, scale)                  :math:`\beta^{-2}\begin{pmatrix}1 & \gamma-1\\ \gamma-1 & (1-\gamma)^2+\pi^2/6\end{pmatrix}`
==================================  ===========================================================

A family is matched by its exact class (Pyro's wrapper or torch's own), never a subclass,
which may be another distribution under the same attributes. ``None`` (the caller's Monte
Carlo Fisher) is returned for any other family, and for a StudentT whose ``df``, a Binomial or
NegativeBinomial whose count depends on :math:`\phi`. Factors are written so that their
gradients stay finite where a probability underflows (:math:`\sqrt{p}` as
:math:`e^{\frac12\log\sigma(\ell)}`), since the log determinant is differentiated into
:math:`\theta`.

References: Lehmann & Casella (1998), *Theory of Point Estimation*, §2.6 (the table's
entries); Lange, Little & Taylor (1989), Robust statistical modeling using the t distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
import torch.distributions as tdist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EXACT_FAMILIES", "exact_fisher"]

#: ``[(eta (*batch, k), factor (*batch, k) or (*batch, k, k))]``: a Fisher :math:`F = LL^\top`.
Pieces = list[tuple[Tensor, Tensor]]
_EULER = 0.5772156649015329


def _depends_on(value: Any, phi: Tensor) -> bool:
    if not isinstance(value, Tensor) or not value.requires_grad:
        return False
    (grad,) = torch.autograd.grad(value.sum(), phi, retain_graph=True, allow_unused=True)
    return grad is not None


def _scalar(fn: Any, param: Tensor, root_fisher: Tensor) -> tuple[Tensor, Tensor]:
    """One parameter with :math:`\\sqrt F` ``root_fisher``, both ``(*batch, 1)``."""
    shape = fn.batch_shape
    return param.expand(shape).unsqueeze(-1), root_fisher.expand(shape).unsqueeze(-1)


def _diagonal(fn: Any, phi: Tensor, *named: tuple[Tensor, Tensor]) -> Pieces:
    """Parameters without cross terms: the first always (the location), the rest where they
    depend on :math:`\\phi`."""
    first, *rest = named
    return [_scalar(fn, *first)] + [_scalar(fn, *p) for p in rest if _depends_on(p[0], phi)]


def _pair(
    fn: Any,
    phi: Tensor,
    a: Tensor,
    b: Tensor,
    fisher: tuple[Tensor, Tensor, Tensor],
    schur: Tensor,
) -> Pieces:
    r"""Two parameters with Fisher ``(F_aa, F_ab, F_bb)`` and Schur complement ``schur``
    :math:`= F_{bb} - F_{ab}^2/F_{aa}` (given by each family in a form without cancellation
    where it has one): the ``2 x 2`` Cholesky factor where both depend on :math:`\phi`, else
    the one that does (``a`` when neither does, whose rows are then zero)."""
    f_aa, f_ab, f_bb = fisher
    vary_a, vary_b = _depends_on(a, phi), _depends_on(b, phi)
    if vary_a and vary_b:
        shape = fn.batch_shape
        l_aa = f_aa.expand(shape).sqrt()
        l_ba = f_ab.expand(shape) / l_aa
        l_bb = schur.expand(shape).clamp_min(torch.finfo(l_aa.dtype).tiny).sqrt()
        factor = torch.stack(
            [torch.stack([l_aa, torch.zeros_like(l_aa)], -1), torch.stack([l_ba, l_bb], -1)], -2
        )
        return [(torch.stack([a.expand(shape), b.expand(shape)], -1), factor)]
    if vary_b:
        return [_scalar(fn, b, f_bb.sqrt())]
    return [_scalar(fn, a, f_aa.sqrt())]


def _normal(fn: Any, phi: Tensor) -> Pieces:
    return _diagonal(fn, phi, (fn.loc, 1.0 / fn.scale), (fn.scale, 2.0**0.5 / fn.scale))


def _student_t(fn: Any, phi: Tensor) -> Pieces | None:
    if _depends_on(fn.df, phi):
        return None
    df, scale = fn.df, fn.scale
    return _diagonal(
        fn,
        phi,
        (fn.loc, ((df + 1) / (df + 3)).sqrt() / scale),
        (scale, (2 * df / (df + 3)).sqrt() / scale),
    )


def _bernoulli(fn: Any, phi: Tensor) -> Pieces:
    logits = fn.logits  # sqrt(p (1 - p)) from log-probabilities: finite where p underflows
    return [_scalar(fn, logits, torch.exp(0.5 * (F.logsigmoid(logits) + F.logsigmoid(-logits))))]


def _binomial(fn: Any, phi: Tensor) -> Pieces | None:
    if _depends_on(fn.total_count, phi):
        return None
    logits = fn.logits
    half_log = 0.5 * (F.logsigmoid(logits) + F.logsigmoid(-logits))
    return [_scalar(fn, logits, torch.as_tensor(fn.total_count).sqrt() * torch.exp(half_log))]


def _geometric(fn: Any, phi: Tensor) -> Pieces:
    logits = fn.logits
    return [_scalar(fn, logits, torch.exp(0.5 * F.logsigmoid(-logits)))]


def _negative_binomial(fn: Any, phi: Tensor) -> Pieces | None:
    if _depends_on(fn.total_count, phi):
        return None
    logits = fn.logits
    root = torch.as_tensor(fn.total_count).sqrt() * torch.exp(0.5 * F.logsigmoid(logits))
    return [_scalar(fn, logits, root)]


def _poisson(fn: Any, phi: Tensor) -> Pieces:
    return [_scalar(fn, fn.rate, fn.rate.clamp_min(torch.finfo(phi.dtype).tiny).rsqrt())]


def _categorical(fn: Any, phi: Tensor) -> Pieces:
    logits = fn.logits
    logits = logits.expand(*fn.batch_shape, logits.shape[-1])
    log_p = torch.log_softmax(logits, -1)
    p, root = log_p.exp(), (0.5 * log_p).exp()  # sqrt(p) with finite gradients at p -> 0
    return [(logits, torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2))]


def _exponential(fn: Any, phi: Tensor) -> Pieces:
    return [_scalar(fn, fn.rate, 1.0 / fn.rate)]


def _gamma(fn: Any, phi: Tensor) -> Pieces:
    alpha, beta = fn.concentration, fn.rate
    trigamma = torch.polygamma(1, alpha)
    fisher = (trigamma, -1.0 / beta, alpha / beta.square())
    return _pair(fn, phi, alpha, beta, fisher, (alpha - 1.0 / trigamma) / beta.square())


def _beta(fn: Any, phi: Tensor) -> Pieces:
    a, b = fn.concentration1, fn.concentration0
    t_a, t_b, t_ab = torch.polygamma(1, a), torch.polygamma(1, b), torch.polygamma(1, a + b)
    f_aa = t_a - t_ab
    schur = (t_a * t_b - t_ab * (t_a + t_b)) / f_aa  # det F / F_aa
    return _pair(fn, phi, a, b, (f_aa, -t_ab, t_b - t_ab), schur)


def _laplace(fn: Any, phi: Tensor) -> Pieces:
    return _diagonal(fn, phi, (fn.loc, 1.0 / fn.scale), (fn.scale, 1.0 / fn.scale))


def _cauchy(fn: Any, phi: Tensor) -> Pieces:
    root = 0.5**0.5 / fn.scale
    return _diagonal(fn, phi, (fn.loc, root), (fn.scale, root))


def _half_normal(fn: Any, phi: Tensor) -> Pieces:
    return [_scalar(fn, fn.scale, 2.0**0.5 / fn.scale)]


def _half_cauchy(fn: Any, phi: Tensor) -> Pieces:
    return [_scalar(fn, fn.scale, 0.5**0.5 / fn.scale)]


def _gumbel(fn: Any, phi: Tensor) -> Pieces:
    loc, scale = fn.loc, fn.scale
    inv2 = scale.square().reciprocal()
    fisher = (inv2, (_EULER - 1.0) * inv2, ((1.0 - _EULER) ** 2 + math.pi**2 / 6) * inv2)
    return _pair(fn, phi, loc, scale, fisher, (math.pi**2 / 6) * inv2)


_RULES: dict[str, Callable[[Any, Tensor], Pieces | None]] = {
    "Normal": _normal,
    "StudentT": _student_t,
    "Bernoulli": _bernoulli,
    "Binomial": _binomial,
    "Geometric": _geometric,
    "NegativeBinomial": _negative_binomial,
    "Poisson": _poisson,
    "Categorical": _categorical,
    "Exponential": _exponential,
    "Gamma": _gamma,
    "Beta": _beta,
    "LogNormal": _normal,  # loc and scale are those of the Normal of log y
    "Laplace": _laplace,
    "Cauchy": _cauchy,
    "HalfNormal": _half_normal,
    "HalfCauchy": _half_cauchy,
    "Gumbel": _gumbel,
}

#: The families with an exact Fisher: each class, Pyro's wrapper and torch's own, to its rule.
EXACT_FAMILIES: dict[type, Callable[[Any, Tensor], Pieces | None]] = {
    cls: rule
    for name, rule in _RULES.items()
    for cls in (getattr(dist, name), getattr(tdist, name))
}


def exact_fisher(fn: Any, phi: Tensor) -> Pieces | None:
    r"""``[(eta, factor)]`` for ``fn``'s parameters that depend on :math:`\phi`, ``eta``
    ``(*batch, k)`` and ``factor`` ``(*batch, k)`` (diagonal :math:`L`) or ``(*batch, k, k)``
    with :math:`F = LL^\top` (the module's table); ``None`` where no exact Fisher is known
    (the caller's Monte Carlo Fisher then)."""
    rule = EXACT_FAMILIES.get(type(fn))
    return None if rule is None else rule(fn, phi)
