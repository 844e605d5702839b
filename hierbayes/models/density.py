r"""Per-task log densities of a hierbayes model, and the capabilities a model declares.

:class:`TaskDensity` is the protocol every inference routine evaluates: per-task log likelihoods
and log priors as pure functions of the global values and of :math:`\phi \in \mathbb{R}^{T\times
D}`. :class:`PyroTaskDensity` implements it for any Pyro program by re-running it under
``poutine.condition``; built-in models (:class:`hierbayes.models.TaskModel`) implement it
natively, and the tests check the two agree.

What more a curvature backend or a predictive needs is a **declared** protocol, checked once
(:func:`capabilities`) when an objective or a posterior is built, never probed at use:

* :class:`DiagonalPriorDensity`: :math:`p(\phi\mid\theta)` has a diagonal precision;
* :class:`NetworkDensity`: :math:`\phi` parametrises a :class:`~hierbayes.models.BatchedNetwork`
  whose outputs enter a :class:`~hierbayes.models.Likelihood` (output Jacobians, layer records,
  the output-space Hessian :math:`\Lambda = LL^\top`, the likelihood's per-task parameters).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.models.structure import ModelStructure, per_task_log_prob, trace_nodes

if TYPE_CHECKING:
    from hierbayes.models.likelihoods import Likelihood
    from hierbayes.models.network import BatchedNetwork, LayerRecord

__all__ = [
    "Capabilities",
    "DiagonalPriorDensity",
    "JointDensity",
    "NetworkDensity",
    "PyroTaskDensity",
    "TaskDensity",
    "capabilities",
    "task_density",
]


@runtime_checkable
class TaskDensity(Protocol):
    r"""Per-task log densities as pure functions of global values and :math:`\phi` ``(T, D)``.

    ``params`` maps each global latent site's name to its (constrained) value. ``mask``, when
    given, is ``(T, N)`` boolean, ``True`` for real points.
    """

    structure: ModelStructure

    def log_likelihood(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\log p(y_j \mid \phi_j, x_j)`, shape ``(T,)``."""
        ...

    def log_prior(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> Tensor:
        r""":math:`\log p(\phi_j \mid \theta)`, shape ``(T,)``."""
        ...

    def prior_mean(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        r""":math:`\mathbb{E}[\phi_j \mid \theta]`, shape ``(T, D)``: where the inner loop starts."""
        ...

    def log_hyperprior(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        r""":math:`\log p(\theta, \ldots)` of the global latents, a scalar."""
        ...

    def predictive(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> dist.Distribution:
        r""":math:`p(y \mid \phi_j, x)` with batch shape ``(T, N)``."""
        ...


@runtime_checkable
class DiagonalPriorDensity(Protocol):
    r"""A density whose prior :math:`p(\phi\mid\theta)` has a diagonal precision."""

    def prior_precision(self, params: Mapping[str, Tensor]) -> Tensor:
        r"""The diagonal of :math:`-\nabla^2_\phi \log p(\phi\mid\theta)`, ``(D,)``."""
        ...


@runtime_checkable
class NetworkDensity(Protocol):
    r"""A density whose :math:`\phi` parametrises a batched network feeding a known likelihood.

    What the layer-structured curvature backends (``ggn``, ``diag``, ``kfac`` by layer
    records), the linearised predictive and the paper loss's shared forward pass need.
    """

    network: BatchedNetwork
    likelihood: Likelihood
    has_batch_norm: bool

    def outputs(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> Tensor:
        r""":math:`f(x_{jn}; \phi_j)`, ``(T, N, *output_shape)``."""
        ...

    def outputs_with_records(
        self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor
    ) -> tuple[Tensor, list[LayerRecord]]:
        """Outputs and one record per weight layer (fast path only)."""
        ...

    def output_factor(self, params: Mapping[str, Tensor], phi: Tensor, f: Tensor) -> Tensor:
        r""":math:`L_n` with :math:`\Lambda_n = L_nL_n^\top` at outputs ``f``."""
        ...

    def noise_variance(self, params: Mapping[str, Tensor], phi: Tensor, f: Tensor) -> Tensor:
        r"""Gaussian observation-noise variance shaped like ``f`` (Gaussian likelihoods only)."""
        ...

    def log_likelihood_of_outputs(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        f: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\log p(y_j\mid\phi_j)` from already computed outputs ``f`` at ``phi``."""
        ...

    def diagonal_curvature(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor | None:
        """Fisher information of the likelihood's per-task parameters, ``(T, D)``, or ``None``."""
        ...

    def check_mask(self, mask: Tensor | None) -> None:
        """Raise :class:`~hierbayes.errors.TaskDataError` if the network cannot take ``mask``."""
        ...


@runtime_checkable
class JointDensity(Protocol):
    r"""A density that evaluates a task's log joint and the globals' hyperprior in one pass (a
    Pyro program is traced once instead of three times)."""

    def log_joint_parts(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r""":math:`\log p(y_j\mid\phi_j) + \log p(\phi_j\mid\theta)` ``(T,)`` and
        :math:`\log p(\theta)` (a scalar)."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a density declares, read once (:func:`capabilities`)."""

    #: :class:`NetworkDensity`: a batched network and a known likelihood.
    network: bool
    #: The network has the batched fast path (layer records for Gram matrices and K-FAC).
    layer_records: bool
    #: The network normalises each task's batch (batch norm).
    batch_norm: bool
    #: The likelihood is Gaussian with a known noise variance.
    gaussian: bool
    #: Targets are class labels.
    classification: bool
    #: :class:`DiagonalPriorDensity`.
    diagonal_prior: bool

    def require(self, what: str, needed_for: str, fix: str) -> None:
        """Raise :class:`~hierbayes.errors.ModelContractError` unless capability ``what`` holds."""
        if not getattr(self, what):
            described = {
                "network": "a hierbayes network model (a TaskModel: a BatchedNetwork and a Likelihood)",
                "layer_records": "a network on the batched fast path (a plain nn.Sequential of "
                "Linear/Conv2d layers and element-wise activations)",
                "gaussian": "a Gaussian likelihood with a known noise variance",
                "classification": "a classification likelihood",
                "diagonal_prior": "a prior p(phi | theta) with a diagonal precision (a Normal)",
                "batch_norm": "batch norm",
            }[what]
            raise ModelContractError(f"{needed_for} needs {described}; {fix}")


_CAPABILITIES: weakref.WeakKeyDictionary[Any, Capabilities] = weakref.WeakKeyDictionary()


def capabilities(density: TaskDensity) -> Capabilities:
    """Read the protocols ``density`` implements, once per density (then remembered)."""
    try:
        return _CAPABILITIES[density]
    except (KeyError, TypeError):
        pass
    found = _read_capabilities(density)
    with contextlib.suppress(TypeError):  # a density without weak references: read each time
        _CAPABILITIES[density] = found
    return found


def _read_capabilities(density: TaskDensity) -> Capabilities:
    if isinstance(density, NetworkDensity):
        likelihood = density.likelihood
        return Capabilities(
            network=True,
            layer_records=density.network.has_fast_path,
            batch_norm=density.has_batch_norm,
            gaussian=likelihood.noise_variance_known,
            classification=likelihood.is_classification,
            diagonal_prior=isinstance(density, DiagonalPriorDensity),
        )
    return Capabilities(
        network=False,
        layer_records=False,
        batch_norm=False,
        gaussian=False,
        classification=False,
        diagonal_prior=isinstance(density, DiagonalPriorDensity),
    )


class PyroTaskDensity:
    """:class:`TaskDensity` of any Pyro program, by re-running it under ``poutine.condition``.

    Correct for every program that follows the contract; it pays Pyro's tracing cost at each
    evaluation. Each evaluation is internal to the inference algorithm, so its sample sites are
    hidden from the handlers around it (``poutine.block(hide_types=["sample", "observe"])``): a user's
    ``poutine.trace`` or ``scale`` never sees them. Its ``param`` sites are not hidden, so
    ``pyro.infer.SVI`` finds and trains a program's ``pyro.param`` statements. The observed
    sites are named explicitly (from the prototype trace), so the conditioned per-task latent,
    which ``poutine.condition`` also marks as observed, never enters the likelihood.

    It must not be evaluated inside a ``pyro.plate`` (the program opens its own plates).
    """

    def __init__(
        self, model: Callable[..., Any], structure: ModelStructure, example_x: Tensor | None = None
    ) -> None:
        self.model = model
        self.structure = structure
        self._example_x = example_x

    def trace(
        self, params: Mapping[str, Tensor], phi: Tensor | None, x: Tensor, y: Tensor | None
    ) -> Trace:
        """The program's trace with the globals (and ``phi``, when given) conditioned.

        Without ``y`` the program draws its observations (and without ``phi`` its per-task
        latent) from the random generators; those draws are never used here (only the sites'
        distributions are), so they run on a forked generator state: evaluating a density leaves
        the user's random stream where it was."""
        self._example_x = x[:1]
        data = dict(params)
        if phi is not None:
            data[self.structure.task_site] = self.structure.to_site(phi)
        run = poutine.trace(poutine.condition(self.model, data=data))
        with poutine.block(hide_types=["sample", "observe"]):
            if y is not None and phi is not None:
                return run.get_trace(x, y)
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                return run.get_trace(x, y)

    def log_likelihood(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        return per_task_log_prob(self.trace(params, phi, x, y), self.structure, phi.shape[0], mask)

    def log_prior(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> Tensor:
        site = trace_nodes(self.trace(params, phi, x, None))[self.structure.task_site]
        return site["fn"].log_prob(site["value"]).reshape(phi.shape[0])

    def log_joint_parts(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``(log_joint, log_hyperprior)`` from one run of the program:
        :math:`\log p(y_j\mid\phi_j) + \log p(\phi_j\mid\theta)` per task ``(T,)`` and
        :math:`\log p(\theta)` (a scalar) (:class:`JointDensity`)."""
        trace = self.trace(params, phi, x, y)
        nodes = trace_nodes(trace)
        T = phi.shape[0]
        site = nodes[self.structure.task_site]
        per_task = per_task_log_prob(trace, self.structure, T, mask) + site["fn"].log_prob(
            site["value"]
        ).reshape(T)
        hyper = x.new_zeros(()) if torch.is_floating_point(x) else phi.new_zeros(())
        for g in self.structure.global_sites:
            node = nodes[g.name]
            hyper = hyper + node["fn"].log_prob(node["value"]).sum()
        return per_task, hyper

    def _task_prior(self, params: Mapping[str, Tensor], x: Tensor) -> Any:
        r"""The per-task latent's distribution :math:`p(\phi\mid\theta)` in the program."""
        return trace_nodes(self.trace(params, None, x, None))[self.structure.task_site]["fn"]

    def prior_mean(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        fn = self._task_prior(params, x)
        T = x.shape[0]
        batch = [1] * self.structure.task_batch_ndim
        batch[self.structure.tasks_dim] = T
        mean = fn.mean.expand(fn.batch_shape + fn.event_shape)
        return self.structure.from_site(mean.expand(*batch, *self.structure.task_event_shape))

    def prior_precision(self, params: Mapping[str, Tensor]) -> Tensor:
        r"""Diagonal of :math:`-\nabla^2\log p(\phi\mid\theta)`, ``(D,)``, for a Normal prior."""
        if self._example_x is None:
            raise ModelContractError(
                "prior_precision needs the density to have seen an input batch"
            )
        fn = self._task_prior(params, self._example_x)
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        if not isinstance(fn, dist.Normal):
            raise ModelContractError(
                f"the per-task prior is {type(fn).__name__}, not Normal: its precision is not "
                "diagonal-constant; pass damping=τ to use τI as the prior's curvature"
            )
        scale = fn.scale.expand(fn.batch_shape)
        return (1.0 / scale.square()).reshape(-1, self.structure.num_params)[0]

    def log_hyperprior(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        trace = self.trace(params, None, x, None)
        total = x.new_zeros(())
        for site in self.structure.global_sites:
            node = trace_nodes(trace)[site.name]
            total = total + node["fn"].log_prob(node["value"]).sum()
        return total

    def predictive(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> dist.Distribution:
        if len(self.structure.observed_sites) != 1:
            raise ModelContractError(
                f"predictions need one observed site; the model has {list(self.structure.observed_sites)}"
            )
        fn: dist.Distribution = trace_nodes(self.trace(params, phi, x, None))[
            self.structure.observed_sites[0]
        ]["fn"]
        return fn


def task_density(
    model: Callable[..., Any], structure: ModelStructure, example_x: Tensor | None = None
) -> TaskDensity:
    """The model's native :class:`TaskDensity` where it declares one (a ``task_density``
    method, as :class:`~hierbayes.models.TaskModel` has), else :class:`PyroTaskDensity`."""
    if isinstance(model, NativeDensityModel):
        return model.task_density(structure)
    return PyroTaskDensity(model, structure, None if example_x is None else example_x[:1])


@runtime_checkable
class NativeDensityModel(Protocol):
    """A model that provides its own closed-form :class:`TaskDensity`."""

    def task_density(self, structure: ModelStructure) -> TaskDensity: ...
