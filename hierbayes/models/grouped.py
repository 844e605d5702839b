r"""Grouped regression: the statistician's hierarchical models as hierbayes models.

Groups are tasks (:mod:`hierbayes.tasks.grouped`): group :math:`j` has its own coefficients
:math:`\phi_j` drawn around global ones, and every model here is a plain Pyro program
``model(x, y=None)`` over a batch of groups with the hierbayes contract
(:mod:`hierbayes.models.structure`): the hyperparameters are **global sample sites** with
proper priors (so ``fit`` point-estimates them, type-II MAP, and a full-Bayes sampler can
sample them with everything else), the group coefficients are the one sample site in
``pyro.plate("tasks")``, and the observations sit in a nested ``pyro.plate("data")``.

:class:`VaryingIntercepts` (Gelman & Hill 2006, §12.3), with ``x`` ``(T, N, K)``:

.. math::

    \mu \sim \mathcal N(0, s^2),\ \tau \sim \mathcal N^+(0, s_\tau^2),\
    w \sim \mathcal N(0, s^2 I_K),\ \sigma \sim \mathcal N^+(0, s_\tau^2),\qquad
    \alpha_j \mid \mu, \tau \sim \mathcal N(\mu, \tau^2),\qquad
    y_{ji} \sim \mathcal N(\alpha_j + x_{ji}^\top w,\ \sigma^2).

:class:`ContextualEffects` is that model on the radon columns ``(log_uranium, floor,
floor_by_county)`` (Gelman & Hill 2006, §12.6 and §21.7; Inference Gym's "radon contextual
effects"). :class:`VaryingInterceptsSlopes` lets the first ``varying`` columns' slopes vary
by group too (independent normals, :math:`(\alpha_j, \beta_j) \sim \mathcal N(\mu, \operatorname{diag}\tau^2)`).
:class:`EightSchools` (Rubin 1981; Gelman et al. 2013, §5.5) is the normal-means model with
known standard errors, :math:`y_j \sim \mathcal N(\theta_j, \sigma_j^2)`,
:math:`\theta_j \sim \mathcal N(\mu, \tau^2)`, with posteriordb's priors
:math:`\mu \sim \mathcal N(0, 5^2)`, :math:`\tau \sim \text{half-Cauchy}(0, 5)`.

Each model is linear-Gaussian in its group coefficients, so the Laplace evidence of
``fit(..., method="llama", objective="evidence")`` is its exact marginal likelihood
:math:`p(y_j \mid \mu, \tau, w, \sigma)` and empirical Bayes is exact type-II MAP. Each is
rebuilt by :func:`hierbayes.load` from its ``constructor``.

References
----------
1. Gelman & Hill (2006). *Data Analysis Using Regression and Multilevel/Hierarchical Models*.
2. Gelman, Carlin, Stern, Dunson, Vehtari & Rubin (2013). *Bayesian Data Analysis*, 3rd ed.
3. Rubin (1981). Estimation in parallel randomized experiments. *J. Educ. Stat.* 6(4).
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.tasks.grouped import CONTEXTUAL_FEATURES

__all__ = [
    "ContextualEffects",
    "EightSchools",
    "GroupedModel",
    "VaryingIntercepts",
    "VaryingInterceptsSlopes",
]


class GroupedModel:
    """Base of the built-in grouped models: a Pyro program ``model(x, y=None)`` with a
    ``constructor`` (``{"class": name, "kwargs": {...}}``) that :func:`hierbayes.load` rebuilds
    it from, and the global sites' starting values (:meth:`initial_values`)."""

    constructor: dict[str, Any]
    #: The number of columns of ``x`` the model reads.
    num_features: int

    def __call__(self, x: Tensor, y: Tensor | None = None) -> None:
        raise NotImplementedError

    def initial_values(self) -> dict[str, Tensor]:
        """Where the guide starts the global sites (means 0, scales 1)."""
        return {}

    def _check_x(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.num_features:
            raise ModelContractError(
                f"{type(self).__name__} reads x of shape (groups, points, {self.num_features}); "
                f"got {tuple(x.shape)}"
                + (" (radon_tasks(features=...) chooses the columns)" if x.dim() == 3 else "")
            )

    def __repr__(self) -> str:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.constructor["kwargs"].items())
        return f"{type(self).__name__}({kwargs})"


def _scalar(value: float, x: Tensor) -> Tensor:
    return torch.tensor(float(value), dtype=x.dtype, device=x.device)


class VaryingIntercepts(GroupedModel):
    r"""Varying intercepts with fixed slopes: :math:`y_{ji} \sim \mathcal N(\alpha_j +
    x_{ji}^\top w, \sigma^2)`, :math:`\alpha_j \sim \mathcal N(\mu, \tau^2)`.

    Sites: globals ``mu`` (scalar), ``tau`` (scalar, positive), ``w`` (``(K,)``, absent when
    ``num_features=0``), ``sigma`` (scalar, positive); per group ``alpha`` (``(T, 1)`` in the
    tasks plate at dim -2); observations ``y`` (``(T, N)``).

    Parameters
    ----------
    num_features:
        :math:`K`, the columns of ``x`` (group-level predictors are columns too).
    loc_scale:
        :math:`s`, the prior scale of :math:`\mu` and :math:`w` (normal, mean 0).
    scale_scale:
        :math:`s_\tau`, the half-normal prior scale of :math:`\tau` and :math:`\sigma`.
    """

    def __init__(
        self, num_features: int, *, loc_scale: float = 1.0, scale_scale: float = 1.0
    ) -> None:
        if num_features < 0:
            raise ValueError(f"num_features must be >= 0; got {num_features}")
        if not (loc_scale > 0 and scale_scale > 0):
            raise ValueError(
                f"prior scales must be positive; got loc_scale={loc_scale}, "
                f"scale_scale={scale_scale}"
            )
        self.num_features = num_features
        self.loc_scale = loc_scale
        self.scale_scale = scale_scale
        self.constructor = {
            "class": type(self).__name__,
            "kwargs": self._kwargs(),
        }

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            num_features=self.num_features, loc_scale=self.loc_scale, scale_scale=self.scale_scale
        )

    def initial_values(self) -> dict[str, Tensor]:
        values = {"mu": torch.tensor(0.0), "tau": torch.tensor(1.0), "sigma": torch.tensor(1.0)}
        if self.num_features:
            values["w"] = torch.zeros(self.num_features)
        return values

    def __call__(self, x: Tensor, y: Tensor | None = None) -> None:
        self._check_x(x)
        T, N = x.shape[:2]
        s, s_tau = _scalar(self.loc_scale, x), _scalar(self.scale_scale, x)
        mu = pyro.sample("mu", dist.Normal(_scalar(0.0, x), s))
        tau = pyro.sample("tau", dist.HalfNormal(s_tau))
        fixed: Tensor | float = 0.0
        if self.num_features:
            w = pyro.sample("w", dist.Normal(torch.zeros_like(x[0, 0]), s).to_event(1))  # (K,)
            fixed = (x * w).sum(-1)  # (T, N)
        sigma = pyro.sample("sigma", dist.HalfNormal(s_tau))
        with pyro.plate("tasks", T, dim=-2):
            alpha = pyro.sample("alpha", dist.Normal(mu, tau))  # (T, 1)
            with pyro.plate("data", N, dim=-1):
                pyro.sample("y", dist.Normal(alpha + fixed, sigma), obs=y)


class ContextualEffects(VaryingIntercepts):
    r"""The radon contextual-effects model (Gelman & Hill 2006, §12.6):

    .. math::

        \log\text{radon}_i \sim \mathcal N\big(\alpha_{c(i)} + w_1 \log\text{uranium}_{c(i)}
            + w_2\,\text{floor}_i + w_3\,\overline{\text{floor}}_{c(i)},\ \sigma^2\big),
        \quad \alpha_j \sim \mathcal N(\mu, \tau^2),

    with :math:`\mu, w \sim \mathcal N(0, 1)` and :math:`\tau, \sigma \sim \mathcal N^+(0, 1)`:
    :class:`VaryingIntercepts` on the three columns of
    :func:`~hierbayes.tasks.radon_tasks`'s default ``features``
    (:data:`~hierbayes.tasks.grouped.CONTEXTUAL_FEATURES`).
    """

    features = CONTEXTUAL_FEATURES

    def __init__(self, *, loc_scale: float = 1.0, scale_scale: float = 1.0) -> None:
        super().__init__(len(CONTEXTUAL_FEATURES), loc_scale=loc_scale, scale_scale=scale_scale)

    def _kwargs(self) -> dict[str, Any]:
        return dict(loc_scale=self.loc_scale, scale_scale=self.scale_scale)


class VaryingInterceptsSlopes(GroupedModel):
    r"""Varying intercepts and slopes:

    .. math::

        y_{ji} \sim \mathcal N\big(\alpha_j + x_{ji,1:V}^\top \beta_j + x_{ji,V+1:K}^\top w,\
            \sigma^2\big),\qquad (\alpha_j, \beta_j) \sim \mathcal N(\mu, \operatorname{diag}\tau^2),

    the first ``varying`` columns of ``x`` with group-specific slopes, the rest with global
    ones. Sites: ``mu`` and ``tau`` (``(1 + V,)``), ``w`` (``(K - V,)``, absent when
    ``K = V``), ``sigma``; per group ``coef`` (``(T, 1, 1 + V)``: intercept first).
    Gelman & Hill's radon model with a county-varying floor effect is
    ``VaryingInterceptsSlopes(2, varying=1)`` on ``radon_tasks(features=("floor",
    "log_uranium"))``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        varying: int = 1,
        loc_scale: float = 1.0,
        scale_scale: float = 1.0,
    ) -> None:
        if not 0 <= varying <= num_features:
            raise ValueError(
                f"varying must be between 0 and num_features={num_features}; got {varying}"
            )
        if not (loc_scale > 0 and scale_scale > 0):
            raise ValueError(
                f"prior scales must be positive; got loc_scale={loc_scale}, "
                f"scale_scale={scale_scale}"
            )
        self.num_features = num_features
        self.varying = varying
        self.loc_scale = loc_scale
        self.scale_scale = scale_scale
        self.constructor = {
            "class": "VaryingInterceptsSlopes",
            "kwargs": dict(
                num_features=num_features,
                varying=varying,
                loc_scale=loc_scale,
                scale_scale=scale_scale,
            ),
        }

    def initial_values(self) -> dict[str, Tensor]:
        D = 1 + self.varying
        values = {"mu": torch.zeros(D), "tau": torch.ones(D), "sigma": torch.tensor(1.0)}
        if self.num_features > self.varying:
            values["w"] = torch.zeros(self.num_features - self.varying)
        return values

    def __call__(self, x: Tensor, y: Tensor | None = None) -> None:
        self._check_x(x)
        T, N = x.shape[:2]
        V = self.varying
        zeros = torch.zeros(1 + V, dtype=x.dtype, device=x.device)
        s, s_tau = _scalar(self.loc_scale, x), _scalar(self.scale_scale, x)
        mu = pyro.sample("mu", dist.Normal(zeros, s).to_event(1))
        tau = pyro.sample("tau", dist.HalfNormal(s_tau.expand(1 + V)).to_event(1))
        fixed: Tensor | float = 0.0
        if self.num_features > V:
            w = pyro.sample("w", dist.Normal(torch.zeros_like(x[0, 0, V:]), s).to_event(1))
            fixed = (x[..., V:] * w).sum(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(s_tau))
        with pyro.plate("tasks", T, dim=-2):
            coef = pyro.sample("coef", dist.Normal(mu, tau).to_event(1))  # (T, 1, 1 + V)
            mean = coef[..., 0] + (x[..., :V] * coef[..., 1:]).sum(-1) + fixed
            with pyro.plate("data", N, dim=-1):
                pyro.sample("y", dist.Normal(mean, sigma), obs=y)


class EightSchools(GroupedModel):
    r"""Eight schools: :math:`y_j \sim \mathcal N(\theta_j, \sigma_j^2)` with known
    :math:`\sigma_j` (``x[j, :, 0]``), :math:`\theta_j \sim \mathcal N(\mu, \tau^2)`,
    :math:`\mu \sim \mathcal N(0, 5^2)`, :math:`\tau \sim \text{half-Cauchy}(0, 5)`
    (posteriordb's ``eight_schools``), in the centred parametrisation (the group effect
    ``theta`` is the per-task site, as the hierbayes contract needs).

    Its marginal likelihood in :math:`\tau` peaks at :math:`\tau = 0`: empirical Bayes drives
    :math:`\hat\tau` to the boundary, which ``fit`` detects and warns about.
    """

    num_features = 1

    def __init__(self, *, loc_scale: float = 5.0, scale_scale: float = 5.0) -> None:
        if not (loc_scale > 0 and scale_scale > 0):
            raise ValueError(
                f"prior scales must be positive; got loc_scale={loc_scale}, "
                f"scale_scale={scale_scale}"
            )
        self.loc_scale = loc_scale
        self.scale_scale = scale_scale
        self.constructor = {
            "class": "EightSchools",
            "kwargs": dict(loc_scale=loc_scale, scale_scale=scale_scale),
        }

    def initial_values(self) -> dict[str, Tensor]:
        return {"mu": torch.tensor(0.0), "tau": torch.tensor(float(self.scale_scale))}

    def __call__(self, x: Tensor, y: Tensor | None = None) -> None:
        self._check_x(x)
        T, N = x.shape[:2]
        mu = pyro.sample("mu", dist.Normal(_scalar(0.0, x), _scalar(self.loc_scale, x)))
        tau = pyro.sample("tau", dist.HalfCauchy(_scalar(self.scale_scale, x)))
        with pyro.plate("tasks", T, dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, tau))  # (T, 1)
            with pyro.plate("data", N, dim=-1):
                pyro.sample("y", dist.Normal(theta, x[..., 0]), obs=y)
