r"""LLAMA and its successors: meta-objectives with a differentiable Laplace correction.

All three are differentiable in :math:`\theta` through the inner loop's :math:`\hat\phi_j(\theta)`
and through the curvature, and all are Pyro losses (``SVI(model, guide, optim, loss=...)``) and
``fit(..., method="llama", objective=NAME)`` variants:

``"paper"`` (:class:`LaplacePenaltyObjective`), the loss of Grant et al. (2018, Algorithm 4,
ML-LAPLACE) with a curvature of the query set:

.. math::

    \mathcal L = \frac1T\sum_j\Big[-\log p(y^q_j\mid\hat\phi_j) + \eta\,\log\det\hat H_j\Big],
    \qquad \eta = 10^{-6}\ \text{(the paper's cross-validated value)}.

``"evidence"`` (:class:`LaplaceEvidenceObjective`), the full Laplace evidence of MATH.md §4 of
each task's data (support and query by default), evaluated at each task's mode, found by damped
Newton steps from the guide's :math:`\hat\phi_j` (:func:`~hierbayes.inference.core.mode.newton_mode`;
exact for the linear-Gaussian model, where one step reaches the mode):

.. math::

    \mathcal L = -\frac1T\sum_j \log \hat p(\mathcal D_j\mid\theta).

``"predictive"`` (:class:`LinearizedPredictiveObjective`, the default), the negative log
likelihood of the query set under the Laplace posterior predictive, with :math:`\hat H_j` from
the support set; for a Gaussian network the linearised predictive

.. math::

    \mathcal L = -\frac1T\sum_j\sum_m \log\mathcal N\big(y^q_{jm};\, f(x^q_{jm};\hat\phi_j),\,
        \sigma^2 + J_{jm}\hat H_j^{-1}J_{jm}^\top\big),

for a network classifier its probit approximation, and for any other Pyro program a mixture of
the model's own observation distribution over reparameterised draws of :math:`\phi_j`.

Each adds the hyperprior term :math:`-\frac1J\log p(\theta)` of
:class:`~hierbayes.inference.MAMLObjective`.

**The τ collapse.** In the paper's loss a learned prior precision :math:`\tau` gets a gradient
only from :math:`\eta\log\det\hat H`, which always pushes it down; with Adam the step size does
not depend on :math:`\eta`, and a prototype saw :math:`\tau` fall from 100 to 2e-7. Here the
paper's loss warns and holds a learned prior precision fixed (detached); the evidence and
predictive objectives learn it properly, because their prior terms pull the other way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.core.laplace import prior_precision
from hierbayes.inference.core.losses import (
    CurvatureData,
    PredictiveApprox,
    evidence_losses,
    penalty_losses,
    predictive_losses,
    resolve_predictive,
)
from hierbayes.inference.core.mode import ModeReport
from hierbayes.inference.curvature import CurvatureBuilder, get_curvature
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.laplace import laplace_posterior
from hierbayes.inference.svi.guide import TruncatedGradientGuide
from hierbayes.inference.svi.objectives import MetaObjective
from hierbayes.models.density import Capabilities, PyroTaskDensity, TaskDensity, capabilities
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "LLAMA_OBJECTIVES",
    "LaplaceEvidenceObjective",
    "LaplaceObjective",
    "LaplacePenaltyObjective",
    "LinearizedPredictiveObjective",
    "llama_objective",
    "llama_posterior",
]

#: Curvature backends that need a network's layer structure (the NetworkDensity protocol);
#: ``ggn`` and ``diag`` take any Pyro program's observation sites otherwise.
_NETWORK_CURVATURES = ("kfac",)
_OBSERVATION_CURVATURES = ("ggn", "diag")


class LaplaceObjective(MetaObjective):
    """Shared options of the Laplace meta-objectives.

    Parameters
    ----------
    num_tasks:
        :math:`J` for the hyperprior weight (``None``: endless family).
    curvature:
        A registered curvature name (``"ggn"``, ``"kfac"``, ``"diag"``, ``"full"``) or a builder.
    curvature_data:
        Which of each task's data the curvature is of.
    damping:
        Use :math:`\\tau I` as the prior's curvature instead of the model's prior precision.
    jacobian:
        How output Jacobians are formed: ``"auto"``, ``"layers"`` or ``"autograd"``.
    """

    default_data: CurvatureData = "support"

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        curvature: str | CurvatureBuilder = "ggn",
        curvature_data: CurvatureData | None = None,
        damping: float | None = None,
        jacobian: str = "auto",
    ) -> None:
        super().__init__(num_tasks)
        get_curvature(curvature)  # fail early on an unknown name
        self.curvature = curvature
        self.curvature_data: CurvatureData = curvature_data or self.default_data
        if self.curvature_data not in ("support", "query", "both"):
            raise ValueError(
                f"curvature_data must be 'support', 'query' or 'both'; got {curvature_data!r}"
            )
        if damping is not None and not damping > 0:
            raise ValueError(f"damping must be positive; got {damping}")
        if jacobian not in ("auto", "layers", "autograd"):
            raise ValueError(f"jacobian must be 'auto', 'layers' or 'autograd'; got {jacobian!r}")
        self.damping = damping
        self.jacobian = jacobian
        self.capabilities: Capabilities | None = None

    def check(self, density: TaskDensity) -> None:
        caps = capabilities(density)
        if self.curvature in _NETWORK_CURVATURES:
            caps.require(
                "network",
                f"curvature={self.curvature!r} (Kronecker factors of network layers)",
                "use curvature='ggn', 'diag' or 'full' for another Pyro program",
            )
        elif (
            self.curvature in _OBSERVATION_CURVATURES
            and not caps.network
            and not isinstance(density, PyroTaskDensity)
        ):
            raise ModelContractError(
                f"curvature={self.curvature!r} needs a network model or a Pyro program (whose "
                f"observation sites it differentiates); got a {type(density).__name__}. Use "
                "curvature='full'"
            )
        if self.damping is None:
            caps.require(
                "diagonal_prior",
                f"the {self.name} objective's prior curvature",
                "pass damping=τ to use τI instead",
            )
        self.capabilities = caps

    def _caps(self) -> Capabilities:
        if self.capabilities is None:  # pragma: no cover - bind() always runs first
            raise RuntimeError("the objective was not bound to a density")
        return self.capabilities

    def precision(self, density: TaskDensity, params: Mapping[str, Tensor], T: int) -> Tensor:
        """The diagonal prior precision ``(T, D)`` the curvature adds."""
        return prior_precision(density, params, T, damping=self.damping)


class LaplacePenaltyObjective(LaplaceObjective):
    r"""The paper's LLAMA loss: query NLL plus :math:`\eta\log\det\hat H_j` (query curvature)."""

    name = "paper"
    default_data: CurvatureData = "query"

    def __init__(self, num_tasks: int | None = None, *, eta: float = 1e-6, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if eta < 0:
            raise ValueError(f"eta must be >= 0; got {eta}")
        self.eta = eta
        self._warned = False

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> Tensor:
        P = self.precision(density, params, phi.shape[0])
        if P.requires_grad:
            if not self._warned:
                warnings.warn(
                    "the paper's LLAMA loss gives a learned prior precision a gradient only "
                    "through eta * log det H, which drives it to zero whatever eta is (measured: "
                    "100 -> 2e-7); it is held fixed (detached) in this objective. Use "
                    "objective='evidence' or 'predictive' to learn the prior scale.",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned = True
            P = P.detach()
        return penalty_losses(
            density,
            params,
            phi,
            batch,
            precision=P,
            eta=self.eta,
            curvature=self.curvature,
            curvature_data=self.curvature_data,
            jacobian=self.jacobian,
            capabilities=self._caps(),
        )


class LaplaceEvidenceObjective(LaplaceObjective):
    r"""Negative Laplace evidence of each task's data (support and query by default), at the
    task's mode.

    The Laplace evidence is the classical approximation only at a mode of the task's log
    joint. Away from one, the one-Newton-step correction :math:`\tfrac12 g^\top\hat H^{-1}g`
    keeps it exact for the linear-Gaussian model, but with a non-Gaussian likelihood or an
    approximate curvature it is neither exact nor a bound, and meta-training exploits it
    (on hierarchical logistic regression the objective fell to 12.8 nats a task while the
    true :math:`-\log p(\mathcal D_j\mid\theta)` at the learned :math:`\theta` was 38.6).
    So the guide's truncated-gradient :math:`\hat\phi_j` is only the start: up to
    ``mode_steps`` damped, monotone Newton steps with the objective's curvature
    (:func:`~hierbayes.inference.core.mode.newton_mode`, differentiable: the meta-gradient
    flows through the refined mode into :math:`\theta`) move it to the mode before the
    evidence is evaluated. One step is exact for the linear-Gaussian model. Each step costs
    one more curvature build (and keeps its graph for the meta-gradient); a task stops as
    soon as it is within ``mode_tolerance``, and the call as soon as every task is.

    Parameters
    ----------
    newton_correction:
        Add :math:`\tfrac12 g^\top\hat H^{-1}g` at the last iterate (below
        ``mode_tolerance`` at a converged mode).
    mode_steps:
        The most Newton steps per call (``0``: evaluate at :math:`\hat\phi_j`, the old
        behaviour, exact only for the linear-Gaussian model).
    mode_tolerance:
        A task's search stops once its Newton decrement :math:`\tfrac12 g^\top\hat H^{-1}g`
        (the nats its log joint lies below the mode, to second order) is at most this; the
        evidence is then within about this many nats of the Laplace evidence at the mode,
        well below the Laplace approximation's own error.

    Attributes
    ----------
    last_mode:
        :class:`~hierbayes.inference.core.mode.ModeReport` of the last call: Newton steps
        taken, and per task the gradient norm, the decrement and whether it converged. When
        a call ends with a task above the tolerance the objective warns (``fit`` reports it
        once, with a count).
    """

    name = "evidence"
    default_data: CurvatureData = "both"

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        newton_correction: bool = True,
        mode_steps: int = 5,
        mode_tolerance: float = 1e-2,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        if mode_steps < 0:
            raise ValueError(f"mode_steps must be >= 0; got {mode_steps}")
        if not mode_tolerance >= 0:
            raise ValueError(f"mode_tolerance must be >= 0; got {mode_tolerance}")
        self.newton_correction = newton_correction
        self.mode_steps = mode_steps
        self.mode_tolerance = mode_tolerance
        self.last_mode: ModeReport | None = None

    @property
    def last_mode_gradient_norm(self) -> float | None:
        r"""The largest :math:`\lVert\nabla_\phi\log p(\mathcal D_j, \phi\mid\theta)\rVert` over
        the tasks of the last call, where the evidence was evaluated (``None`` before one)."""
        if self.last_mode is None:
            return None
        return float(self.last_mode.gradient_norm.max())

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> Tensor:
        losses, search = evidence_losses(
            density,
            params,
            phi,
            batch,
            precision=self.precision(density, params, phi.shape[0]),
            curvature=self.curvature,
            curvature_data=self.curvature_data,
            newton_correction=self.newton_correction,
            mode_steps=self.mode_steps,
            mode_tolerance=self.mode_tolerance,
        )
        self.last_mode = search.report()
        if self.mode_steps > 0 and not bool(self.last_mode.converged.all()):
            advice = "raise mode_steps"
            if self.curvature in ("diag", "kfac"):
                advice += f", or use curvature='ggn' (curvature={self.curvature!r} is coarser)"
            warnings.warn(
                f"the Laplace evidence's mode search stopped with some tasks' Newton decrement "
                f"above mode_tolerance={self.mode_tolerance:g} after mode_steps="
                f"{self.mode_steps}: the evidence is evaluated away from their modes, where it "
                f"is neither exact nor a bound. To fix it, {advice}; objective.last_mode has "
                "each task's gradient norm and decrement",
                UserWarning,
                stacklevel=2,
            )
        return losses


class LinearizedPredictiveObjective(LaplaceObjective):
    r"""Query NLL under the Laplace predictive with support-set curvature, for any model.

    ``predictive`` chooses the approximation (:func:`~hierbayes.inference.core.losses.predictive_losses`):
    ``"auto"`` (default) takes the linearised Gaussian predictive for a Gaussian network, the
    probit approximation for a network classifier and ``num_samples`` reparameterised draws of
    :math:`\phi_j` through the model's own observation site for any other Pyro program.
    """

    name = "predictive"
    default_data: CurvatureData = "support"

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        predictive: PredictiveApprox = "auto",
        num_samples: int = 16,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        if self.curvature_data != "support":
            raise ValueError(
                "the predictive objective conditions on the support set only: its curvature "
                "must be of the support set (curvature_data='support')"
            )
        if predictive not in ("auto", "linearized", "probit", "sampled"):
            raise ValueError(
                "predictive must be 'auto', 'linearized', 'probit' or 'sampled'; "
                f"got {predictive!r}"
            )
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        self.predictive: PredictiveApprox = predictive
        self.num_samples = num_samples
        self.approximation: str | None = None

    def check(self, density: TaskDensity) -> None:
        super().check(density)
        # refuses, before training, an approximation the model cannot take
        self.approximation = resolve_predictive(self.predictive, self._caps())

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> Tensor:
        return predictive_losses(
            density,
            params,
            phi,
            batch,
            precision=self.precision(density, params, phi.shape[0]),
            curvature=self.curvature,
            jacobian=self.jacobian,
            capabilities=self._caps(),
            predictive=self.predictive,
            num_samples=self.num_samples,
        )


LLAMA_OBJECTIVES: dict[str, type[LaplaceObjective]] = {
    "predictive": LinearizedPredictiveObjective,
    "evidence": LaplaceEvidenceObjective,
    "paper": LaplacePenaltyObjective,
}


def llama_objective(
    num_tasks: int | None = None, objective: str = "predictive", **options: Any
) -> LaplaceObjective:
    """The LLAMA objective named ``objective`` (``"predictive"``, ``"evidence"`` or ``"paper"``)."""
    if objective not in LLAMA_OBJECTIVES:
        raise ValueError(
            f"unknown LLAMA objective {objective!r}; known: {sorted(LLAMA_OBJECTIVES)}"
        )
    return LLAMA_OBJECTIVES[objective](num_tasks, **options)


def llama_posterior(
    guide: TruncatedGradientGuide,
    params: Mapping[str, Tensor],
    phi: Tensor,
    batch: TaskBatch,
    objective: MetaObjective,
) -> TaskPosterior:
    """The Laplace task posterior of an adapted batch, with the objective's curvature and the
    support set's data."""
    if isinstance(objective, LaplaceObjective):
        curvature, damping, jacobian = objective.curvature, objective.damping, objective.jacobian
    else:
        curvature, damping, jacobian = "ggn", None, "auto"
    return laplace_posterior(
        guide.density,
        params,
        phi,
        batch.support_x,
        batch.support_y,
        batch.support_mask,
        curvature=curvature,
        damping=damping,
        jacobian=jacobian,
    )
