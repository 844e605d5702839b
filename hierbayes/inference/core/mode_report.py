r"""What a Newton mode search returns: the last iterate with everything known there
(:class:`ModeSearch`), and its detached summary (:class:`ModeReport`), the value an objective
returns beside its losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hierbayes.inference.core.joint import laplace_evidence
from hierbayes.inference.curvature import CurvatureEstimate

__all__ = ["ModeReport", "ModeSearch"]


class ModeReport(NamedTuple):
    r"""Where a mode search ended, detached: what an objective returns beside its losses.

    Attributes
    ----------
    steps:
        Newton steps taken.
    gradient_norm, decrement, distance:
        ``(T,)`` :math:`\lVert g_j\rVert`, :math:`\tfrac12 g^\top\hat H^{-1}g` and
        :math:`\sqrt{g^\top\hat H^{-1}g}` at the last iterate.
    converged:
        ``(T,)`` whether each task's decrement is within the tolerance.
    failed:
        ``(T,)`` tasks whose Newton direction was not finite (a curvature solve that returned
        NaN or infinity): they were kept where they were.
    """

    steps: int
    gradient_norm: Tensor
    decrement: Tensor
    distance: Tensor
    converged: Tensor
    failed: Tensor

    @property
    def unconverged_tasks(self) -> list[int]:
        """The indices of the tasks that did not reach the tolerance."""
        return [int(i) for i in (~self.converged).nonzero().flatten()]

    @property
    def failed_tasks(self) -> list[int]:
        """The indices of the tasks whose Newton direction was not finite."""
        return [int(i) for i in self.failed.nonzero().flatten()]


class ModeSearch(NamedTuple):
    r"""The result of :func:`newton_mode`: the last iterate and everything known there.

    Attributes
    ----------
    phi:
        ``(T, D)`` the last iterate (differentiable when the search kept a graph).
    log_joint:
        ``(T,)`` :math:`\ell_j` at ``phi``.
    gradient:
        ``(T, D)`` :math:`g_j` at ``phi``.
    curvature:
        :math:`\hat H_j` at ``phi``.
    decrement:
        ``(T,)`` :math:`\tfrac12 g^\top\hat H^{-1}g` at ``phi`` (differentiable like ``phi``).
    history:
        ``(steps + 1, T)`` the log joint at every iterate, detached (non-decreasing per task).
    steps:
        Newton steps taken (``0``: only the starting point was evaluated).
    rejected:
        ``(T,)`` whether the task's last step was rejected at every halving (it stopped early).
    converged:
        ``(T,)`` whether the task's decrement is within the tolerance.
    failed:
        ``(T,)`` whether a task's Newton direction was not finite at some iterate (it stayed
        where it was from then on).
    """

    phi: Tensor
    log_joint: Tensor
    gradient: Tensor
    curvature: CurvatureEstimate
    decrement: Tensor
    history: Tensor
    steps: int
    rejected: Tensor
    converged: Tensor
    failed: Tensor

    @property
    def gradient_norm(self) -> Tensor:
        r""":math:`\lVert g_j\rVert` at ``phi``, ``(T,)``, detached."""
        return self.gradient.detach().norm(dim=-1)

    @property
    def distance(self) -> Tensor:
        r""":math:`\sqrt{g^\top\hat H^{-1}g}`: how many posterior standard deviations (in the
        :math:`\hat H` norm) ``phi`` lies from the mode, to second order, ``(T,)``, detached."""
        return (2 * self.decrement.detach()).clamp_min(0.0).sqrt()

    def report(self) -> ModeReport:
        """The detached summary of this search (no graph, no curvature kept)."""
        return ModeReport(
            self.steps,
            self.gradient_norm,
            self.decrement.detach(),
            self.distance,
            self.converged,
            self.failed,
        )

    def log_evidence(
        self, *, newton_correction: bool = True, log_joint: Tensor | None = None
    ) -> Tensor:
        r"""The Laplace evidence at ``phi``, ``(T,)``
        (:func:`~hierbayes.inference.core.joint.laplace_evidence`), from the search's own
        curvature (no second build); ``log_joint`` replaces the search's own log joint at
        ``phi`` (``0`` gives the Laplace terms alone).

        After a search (``steps > 0``) the correction :math:`\tfrac12 g^\top\hat H^{-1}g` is
        added only for the tasks that converged, where it is below the tolerance and the
        quadratic model it extrapolates is accurate. A task that stopped short keeps its log
        joint at the last iterate, which lies below the log joint at the mode: far from the
        mode the quadratic model's :math:`\tfrac12 g^\top\hat H^{-1}g` can be far above the
        true gain (a Gauss--Newton :math:`\hat H` of a classifier made "-log evidence" of
        discrete labels negative, repro_12), and meta-training would exploit it. With
        ``steps = 0`` the correction is applied everywhere: one Newton step from any point,
        exact for the linear-Gaussian model."""
        D = self.phi.shape[-1]
        correction: Tensor | None = None
        if newton_correction:
            correction = (
                self.decrement
                if self.steps == 0
                else torch.where(self.converged, self.decrement, torch.zeros_like(self.decrement))
            )
        value = self.log_joint if log_joint is None else log_joint
        return laplace_evidence(value, self.curvature.logdet(), D, correction)
