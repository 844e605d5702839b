r"""Inputs of the linear-Gaussian closed forms: the design matrix and the checks on every argument.

Shapes (see :mod:`hierbayes.inference.linear_gaussian`): ``X`` is ``(..., N, D)``, ``y`` is
``(..., N)`` or ``(..., N, 1)``, a preconditioner :math:`B` is ``(D,)`` (diagonal) or
``(D, D)`` (full), symmetric positive definite. Every check raises before any work is done and
says what was expected and what came.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "Scalar",
    "check_design",
    "check_positive",
    "check_preconditioner",
    "check_steps",
    "design_matrix",
    "target_vector",
]

#: A positive scalar argument (:math:`\sigma`, :math:`\alpha`): a float or a 0-d tensor (so that
#: it can carry a gradient).
Scalar = float | Tensor


def design_matrix(x: Tensor, *, bias: bool = False) -> Tensor:
    r"""The design matrix :math:`X` of :class:`~hierbayes.models.BayesianLinearRegression`.

    ``x`` ``(..., N, d)`` becomes ``(..., N, d + 1)`` with a trailing column of ones when
    ``bias`` (the model's layout :math:`\phi = (w, b)`), and is returned unchanged otherwise.
    """
    if not bias:
        return x
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def check_design(X: Tensor) -> None:
    """Raise unless ``X`` is a floating-point ``(..., N, D)`` tensor."""
    if X.dim() < 2:
        raise ValueError(f"X must have shape (..., N, D); got {tuple(X.shape)}")
    if not torch.is_floating_point(X):
        raise TypeError(f"X must be a floating-point tensor; got dtype {X.dtype}")


def target_vector(y: Tensor, X: Tensor, name: str = "y") -> Tensor:
    """``y`` as ``(..., N)``, from ``(..., N)`` or ``(..., N, 1)``; ``X`` is ``(..., N, D)``."""
    batch_n = X.shape[:-1]
    if y.shape == batch_n:
        return y
    if y.shape == (*batch_n, 1):
        return y[..., 0]
    raise ValueError(
        f"{name} must have shape {tuple(batch_n)} or {(*batch_n, 1)} to match X of shape "
        f"{tuple(X.shape)} (..., N, D); got {tuple(y.shape)}"
    )


def check_positive(value: Scalar, name: str) -> None:
    """Raise unless every entry of ``value`` is positive."""
    if not bool(torch.all(torch.as_tensor(value) > 0)):
        raise ValueError(f"{name} must be positive; got {value}")


def check_steps(steps: int) -> None:
    """Raise unless ``steps`` is a non-negative ``int`` (not a ``bool``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")


def check_preconditioner(B: Tensor | None, D: int) -> None:
    r"""Raise unless :math:`B` is ``None``, a positive ``(D,)`` diagonal or a symmetric
    ``(D, D)`` matrix (its positive definiteness is checked by its Cholesky factorisation,
    :func:`~hierbayes.inference.linear_gaussian.linalg.preconditioner_factor`)."""
    if B is None:
        return
    if B.dim() == 1:
        if B.shape != (D,):
            raise ValueError(
                f"a diagonal preconditioner must have shape ({D},) for D = {D}; "
                f"got {tuple(B.shape)}"
            )
        if not bool(torch.all(B > 0)) or not bool(torch.isfinite(B).all()):
            raise ValueError(
                "a diagonal preconditioner must have finite, positive entries (it must be "
                f"positive definite); got minimum {float(B.min()):g}"
            )
        return
    if B.dim() != 2 or B.shape != (D, D):
        raise ValueError(
            f"the preconditioner must have shape ({D},) (diagonal) or ({D}, {D}) (full) for D = "
            f"{D}; got {tuple(B.shape)}"
        )
    asym = float((B - B.mT).abs().max())
    scale = float(B.abs().max())
    if asym > 1e-12 * max(scale, 1e-300):
        raise ValueError(
            f"a full preconditioner must be symmetric; max |B - B^T| = {asym:.3g} "
            f"(max |B| = {scale:.3g})"
        )
