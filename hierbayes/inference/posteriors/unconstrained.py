r"""The global latents of a model as one unconstrained vector, and the joint log density.

A model's global sample sites (:math:`\mu`, a scale :math:`\tau > 0`, weights, ...) are mapped
to one flat vector :math:`u \in \mathbb R^K` through each site's bijection onto its support
(``pyro.distributions.transforms.biject_to``, as Pyro's NUTS and autoguides do):
:math:`\theta = T(u)`, e.g. :math:`\tau = \exp(u_\tau)`. A density over :math:`u` carries the
log-Jacobian :math:`\log\lvert\det \partial T/\partial u\rvert`.

The log density of everything over :math:`u` is
:func:`~hierbayes.inference.core.joint.model_log_density` plus this log-Jacobian.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from pyro.distributions.transforms import biject_to
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.models.density import TaskDensity

__all__ = ["GlobalCoordinates"]


@dataclass(frozen=True)
class _Block:
    name: str
    shape: torch.Size  # constrained value shape
    unconstrained_shape: torch.Size
    start: int
    stop: int


class GlobalCoordinates:
    r"""The model's global sample sites as one unconstrained vector :math:`u` ``(K,)``.

    Parameters
    ----------
    density:
        The model's task density; its ``structure.global_sites`` are the coordinates (the order
        of the program). ``pyro.param`` sites are not coordinates: they stay as given.
    example:
        Global values (constrained), e.g. a fit's ``params``; they fix each site's shape.
    """

    def __init__(self, density: TaskDensity, example: Mapping[str, Tensor]) -> None:
        self.sites = {site.name: site for site in density.structure.global_sites}
        if not self.sites:
            raise ModelContractError(
                "the model has no global sample site: there is nothing to integrate over "
                "(declare the globals with pyro.sample outside the tasks plate)"
            )
        missing = [name for name in self.sites if name not in example]
        if missing:
            raise ValueError(
                f"global values for {missing} are missing; got {sorted(example)} "
                "(pass the fit's params)"
            )
        blocks: list[_Block] = []
        start = 0
        for name, site in self.sites.items():
            value = example[name].detach()
            u = biject_to(site.support).inv(value)
            blocks.append(_Block(name, value.shape, u.shape, start, start + u.numel()))
            start += u.numel()
        self.blocks = tuple(blocks)
        self.size = start

    @property
    def names(self) -> list[str]:
        """The sites, in the order of :math:`u`."""
        return [b.name for b in self.blocks]

    def labels(self) -> list[str]:
        """A label per entry of :math:`u`: ``"log(tau)"``-like names are not guessed; entries
        read ``"<site>"`` for scalars and ``"<site>[i]"`` otherwise (unconstrained values)."""
        found: list[str] = []
        for b in self.blocks:
            n = b.stop - b.start
            found.extend(
                [b.name]
                if n == 1 and len(b.unconstrained_shape) == 0
                else [f"{b.name}[{i}]" for i in range(n)]
            )
        return found

    def pack(self, params: Mapping[str, Tensor]) -> Tensor:
        """:math:`u = T^{-1}(\\theta)` ``(K,)`` from constrained values."""
        parts = [
            biject_to(self.sites[b.name].support).inv(params[b.name]).reshape(-1)
            for b in self.blocks
        ]
        return torch.cat(parts)

    def unpack(
        self, u: Tensor, fixed: Mapping[str, Tensor] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        r"""``(params, log_jacobian)``: the constrained values :math:`T(u)` over ``fixed`` and
        :math:`\log\lvert\det\partial T/\partial u\rvert` (a scalar), differentiable in ``u``.
        ``u`` may carry leading batch dimensions ``(..., K)``; the values then do too."""
        params = dict(fixed or {})
        batch = u.shape[:-1]
        log_jacobian = u.new_zeros(batch)
        for b in self.blocks:
            piece = u[..., b.start : b.stop].reshape((*batch, *b.unconstrained_shape))
            transform = biject_to(self.sites[b.name].support)
            value = transform(piece)
            params[b.name] = value
            ladj = transform.log_abs_det_jacobian(piece, value)
            extra = ladj.dim() - len(batch)
            log_jacobian = log_jacobian + (
                ladj.reshape((*batch, -1)).sum(-1) if extra > 0 else ladj
            )
        return params, log_jacobian
