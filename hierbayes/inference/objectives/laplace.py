r"""The options every Laplace meta-objective shares, its task posterior, and the paper's loss.

LLAMA and its successors are meta-objectives with a differentiable Laplace correction, each
differentiable in :math:`\theta` through the inner loop's :math:`\hat\phi_j(\theta)` and through
the curvature :math:`\hat H_j`; each implies the task posterior
:math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})` with :math:`\hat H_j` of the support set
(:meth:`LaplaceObjective.posterior`, beside the losses).

``"paper"`` (:class:`LaplacePenaltyObjective`), the loss of Grant et al. (2018, Algorithm 4,
ML-LAPLACE) with a curvature of the query set:

.. math::

    \mathcal L = \frac1T\sum_j\Big[-\log p(y^q_j\mid\hat\phi_j) + \eta\,\log\det\hat H_j\Big],
    \qquad \eta = 10^{-6}\ \text{(the paper's cross-validated value)}.

**The τ collapse.** In the paper's loss a learned prior precision :math:`\tau` gets a gradient
only from :math:`\eta\log\det\hat H`, which always pushes it down; with Adam the step size does
not depend on :math:`\eta`, and a prototype saw :math:`\tau` fall from 100 to 2e-7. Here the
paper's loss holds a learned prior precision fixed (detached), and says so once, when it is
checked against the model; the evidence and predictive objectives learn it properly, because
their prior terms pull the other way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.core.laplace import prior_precision
from hierbayes.inference.core.losses import CurvatureData, penalty_losses
from hierbayes.inference.curvature import CurvatureBuilder, get_curvature
from hierbayes.inference.objectives.base import MetaObjective, ReplayedModel, TaskLosses
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.laplace import laplace_posterior
from hierbayes.models.density import (
    PyroTaskDensity,
    TaskDensity,
    capabilities,
)
from hierbayes.models.structure import per_task_log_prob
from hierbayes.tasks.batch import TaskBatch

__all__ = ["EXACT_HESSIAN_MAX_PARAMS", "LaplaceObjective", "LaplacePenaltyObjective"]

#: Curvature backends that need a network's layer structure (the NetworkDensity protocol);
#: ``ggn`` and ``diag`` take any Pyro program's observation sites otherwise.
_NETWORK_CURVATURES = ("kfac",)
_OBSERVATION_CURVATURES = ("ggn", "diag")
#: ``curvature="auto"`` takes the exact Hessian of an objective evaluated at the mode for
#: models with at most this many per-task parameters (``T·D²`` numbers; ``D`` reverse passes).
EXACT_HESSIAN_MAX_PARAMS = 64


class LaplaceObjective(MetaObjective):
    """Options shared by the Laplace meta-objectives, and their task posterior.

    Parameters
    ----------
    num_tasks:
        :math:`J` for the hyperprior weight (``None``: endless family).
    curvature:
        A registered curvature name (``"ggn"``, ``"kfac"``, ``"diag"``, ``"full"``,
        ``"fisher_diag"``), a builder, or ``"auto"`` (the default): the exact Hessian
        (``"full"``) for an objective evaluated at each task's mode (``"evidence"``) of a plain
        Pyro program with at most :data:`EXACT_HESSIAN_MAX_PARAMS` per-task parameters (there
        the Laplace evidence is then the classical one, not an approximation of it), the exact
        GGN (``"ggn"``) otherwise (a network's Hessian is indefinite away from a mode; the GGN
        is positive definite, and exact for the linear-Gaussian model).
    curvature_data:
        Which of each task's data the curvature is of.
    damping:
        Use :math:`\\tau I` as the prior's curvature instead of the model's prior precision.
    jacobian:
        How output Jacobians are formed: ``"auto"``, ``"layers"`` or ``"autograd"``.
    **options:
        ``hyperprior_space``: see :class:`~hierbayes.inference.objectives.base.MetaObjective`.
    """

    default_data: CurvatureData = "support"
    #: Whether ``curvature="auto"`` takes the exact Hessian for small models.
    exact_when_small = False

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        curvature: str | CurvatureBuilder = "auto",
        curvature_data: CurvatureData | None = None,
        damping: float | None = None,
        jacobian: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        if curvature != "auto":
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

    @property
    def options(self) -> dict[str, Any]:
        return {
            "curvature": self.curvature,
            "curvature_data": self.curvature_data,
            "damping": self.damping,
            "jacobian": self.jacobian,
        }

    def curvature_for(self, density: TaskDensity) -> str | CurvatureBuilder:
        """The curvature this objective uses for ``density`` (``"auto"`` resolved)."""
        if self.curvature != "auto":
            return self.curvature
        small = density.structure.num_params <= EXACT_HESSIAN_MAX_PARAMS
        network = capabilities(density).network
        return "full" if self.exact_when_small and small and not network else "ggn"

    def check(self, density: TaskDensity) -> None:
        caps = capabilities(density)
        curvature = self.curvature_for(density)
        if curvature in _NETWORK_CURVATURES:
            caps.require(
                "network",
                f"curvature={curvature!r} (Kronecker factors of network layers)",
                "use curvature='ggn', 'diag' or 'full' for another Pyro program",
            )
        elif (
            curvature in _OBSERVATION_CURVATURES
            and not caps.network
            and not isinstance(density, PyroTaskDensity)
        ):
            raise ModelContractError(
                f"curvature={curvature!r} needs a network model or a Pyro program (whose "
                f"observation sites it differentiates); got a {type(density).__name__}. Use "
                "curvature='full'"
            )
        if self.damping is None:
            caps.require(
                "diagonal_prior",
                f"the {self.name} objective's prior curvature",
                "pass damping=τ to use τI instead",
            )

    def precision(self, density: TaskDensity, params: Mapping[str, Tensor], T: int) -> Tensor:
        """The diagonal prior precision ``(T, D)`` the curvature adds."""
        return prior_precision(density, params, T, damping=self.damping)

    def posterior(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskPosterior:
        r""":math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})` with this objective's curvature of
        each task's support set."""
        return laplace_posterior(
            density,
            params,
            phi,
            batch.support_x,
            batch.support_y,
            batch.support_mask,
            curvature=self.curvature_for(density),
            damping=self.damping,
            jacobian=self.jacobian,
        )


class LaplacePenaltyObjective(LaplaceObjective):
    r"""The paper's LLAMA loss: query NLL plus :math:`\eta\log\det\hat H_j` (query curvature)."""

    name = "paper"
    default_data: CurvatureData = "query"

    def __init__(self, num_tasks: int | None = None, *, eta: float = 1e-6, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0; got {eta}")
        self.eta = eta

    @property
    def options(self) -> dict[str, Any]:
        return {**super().options, "eta": self.eta}

    def _precision(self, density: TaskDensity, params: Mapping[str, Tensor], T: int) -> Tensor:
        P = self.precision(density, params, T)
        if P.requires_grad:
            warnings.warn(
                "the paper's LLAMA loss gives a learned prior precision a gradient only "
                "through eta * log det H, which drives it to zero whatever eta is (measured: "
                "100 -> 2e-7); it is held fixed (detached) in this objective. Use "
                "objective='evidence' or 'predictive' to learn the prior scale.",
                UserWarning,
                stacklevel=4,
            )
        return P.detach()

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskLosses:
        return TaskLosses(
            penalty_losses(
                density,
                params,
                phi,
                batch,
                precision=self._precision(density, params, phi.shape[0]),
                eta=self.eta,
                curvature=self.curvature_for(density),
                curvature_data=self.curvature_data,
                jacobian=self.jacobian,
                capabilities=capabilities(density),
            )
        )

    def replayed_losses(
        self,
        model: Callable[..., Any],
        density: TaskDensity,
        replayed: ReplayedModel,
        batch: TaskBatch,
    ) -> Tensor:
        """The query NLL the replayed model's sites score, plus the weighted log determinant."""
        T = replayed.phi.shape[0]
        nll = -per_task_log_prob(replayed.trace, density.structure, T, replayed.mask)
        if self.eta == 0:
            return nll
        penalty = penalty_losses(
            density,
            replayed.params,
            replayed.phi,
            batch,
            precision=self._precision(density, replayed.params, T),
            eta=self.eta,
            curvature=self.curvature_for(density),
            curvature_data=self.curvature_data,
            jacobian=self.jacobian,
            capabilities=capabilities(density),
            likelihood=False,
        )
        return nll + penalty * replayed.scale
