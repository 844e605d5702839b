r"""Numerical floors that say when they fire: clamping at zero, with a warning beyond round-off.

A variance computed as a difference, :math:`v = a - b` with :math:`a \ge b` in exact arithmetic
(the linearised predictive's :math:`\operatorname{diag}G_{qq} - \lVert L^{-1}G_{sq}\rVert^2`),
or an eigenvalue of a matrix that is positive semi-definite in exact arithmetic, can come out
slightly negative in floating point. Clamping it at 0 is then right; but a value far below 0
means the digits were lost (float32 cancellation) or the matrix is not semi-definite at all,
and clamping it silently would hide that (an epistemic variance silently 0).

:func:`clamp_nonnegative` clamps and, when an entry is negative beyond round-off, issues a
:class:`ClampWarning` that says how many entries of how many, the most negative value, where,
and what to do. The threshold: an entry :math:`v` is *materially* negative when

.. math::

    v < -\sqrt{\varepsilon}\; r,

with :math:`\varepsilon` the machine epsilon of ``values``' dtype (``2.2e-16`` in float64,
``1.2e-7`` in float32) and :math:`r` the reference magnitude: the entry's own ``scale`` (the
size of the terms whose difference it is) when given, else the largest magnitude in
``values``. A negative of that size means at least half the significant digits of the terms
were lost; anything smaller is round-off and is clamped without a word.

:func:`nonnegative_eigenvalues` is the same floor for the eigenvalues of a symmetric matrix
whose square root or inverse is taken, with each matrix's largest eigenvalue as reference.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = ["ClampWarning", "clamp_nonnegative", "nonnegative_eigenvalues", "roundoff_tolerance"]


class ClampWarning(UserWarning):
    """A quantity that must be non-negative came out negative beyond round-off and was set to 0."""


def roundoff_tolerance(dtype: torch.dtype) -> float:
    r""":math:`\sqrt{\varepsilon}` of ``dtype``: the relative size below which a negative value
    of a non-negative quantity counts as round-off."""
    return math.sqrt(torch.finfo(dtype).eps)


def _advice(dtype: torch.dtype) -> str:
    if torch.finfo(dtype).bits < 64:
        return (
            f"In {dtype} a difference of nearly equal terms loses its digits: compute in "
            "float64 (fit(..., dtype=torch.float64), or convert the model and data with "
            ".to(torch.float64))."
        )
    return (
        "In float64 this means the matrix involved is ill-conditioned or not positive "
        "semi-definite: check the curvature (a 'full' Hessian away from a mode can be "
        "indefinite) or raise the prior precision or damping."
    )


def clamp_nonnegative(
    values: Tensor,
    what: str,
    *,
    scale: Tensor | None = None,
    advice: str | None = None,
    stacklevel: int = 2,
) -> Tensor:
    r"""``values.clamp_min(0)``, warning (:class:`ClampWarning`) when some entry is negative
    beyond round-off (the module's threshold :math:`-\sqrt\varepsilon\,r`).

    The result stays differentiable (``clamp_min``: the gradient of a clamped entry is 0); the
    count is taken under ``torch.no_grad`` with one synchronisation.

    Parameters
    ----------
    values:
        Any shape, floating point.
    what:
        What ``values`` are, for the message (e.g. ``"the linearised predictive's epistemic
        variance"``).
    scale:
        Optional reference magnitudes broadcastable to ``values``: the size of the terms each
        entry is a difference of. Default: the largest magnitude in ``values``.
    advice:
        What to do, replacing the default advice (float64, or check the matrix).
    stacklevel:
        Passed to :func:`warnings.warn` (2: the caller of this function).
    """
    if values.numel() == 0 or not torch.is_floating_point(values):
        return values.clamp_min(0.0)
    with torch.no_grad():
        v = values.detach()
        reference = v.abs().amax() if scale is None else scale.detach().abs().to(v)
        negative = v < -roundoff_tolerance(v.dtype) * reference
        count, worst, largest = torch.stack(
            [negative.sum().to(v.dtype), v.amin(), v.abs().amax()]
        ).tolist()
    if count > 0:
        warnings.warn(
            f"{what}: {int(count)} of {v.numel()} entries were negative beyond round-off (the "
            f"most negative {worst:.3g}, the largest magnitude {largest:.3g}) and were set to "
            f"0. {advice if advice is not None else _advice(v.dtype)}",
            ClampWarning,
            stacklevel=stacklevel + 1,
        )
    return values.clamp_min(0.0)


def nonnegative_eigenvalues(
    eigenvalues: Tensor, what: str, *, advice: str | None = None, stacklevel: int = 2
) -> Tensor:
    r"""The eigenvalues ``(..., D)`` of symmetric matrices clamped at 0, warning
    (:class:`ClampWarning`) when some matrix is indefinite beyond round-off: an eigenvalue
    below :math:`-\sqrt\varepsilon\,\max_i\lvert\lambda_i\rvert` of its own matrix."""
    if eigenvalues.numel() == 0:
        return eigenvalues.clamp_min(0.0)
    scale = eigenvalues.detach().abs().amax(-1, keepdim=True)
    return clamp_nonnegative(
        eigenvalues,
        f"eigenvalues of {what}",
        scale=scale,
        advice=advice
        if advice is not None
        else "The matrix is not positive semi-definite; its negative part was dropped.",
        stacklevel=stacklevel + 1,
    )
