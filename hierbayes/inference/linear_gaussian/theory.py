r"""Linear-Gaussian exactness: truncated gradient descent is MAP under an implied Gaussian prior.

In linear regression with Gaussian noise everything in the hierarchical reading of MAML is
closed form (Grant et al. 2018, §3.1; MATH.md §3). A task has inputs :math:`X \in \mathbb
R^{N\times D}` and targets :math:`y \in \mathbb R^N`,

.. math::

    y \mid \phi \sim \mathcal N(X\phi, \sigma^2 I), \qquad
    \ell(\phi) = \frac{\lVert y - X\phi\rVert^2}{2\sigma^2},

and :math:`k` steps of (preconditioned) gradient descent from :math:`\phi_{(0)} = \theta`,

.. math::

    \phi_{(i)} = \phi_{(i-1)} - \alpha B \nabla\ell(\phi_{(i-1)})
               = \phi_{(i-1)} + \frac{\alpha}{\sigma^2} B X^\top (y - X\phi_{(i-1)}),

land **exactly** on the MAP estimate under the prior :math:`\phi \sim \mathcal N(\theta, Q)`
(Santos 1996). With :math:`B = LL^\top` (any square root; :math:`L = B^{1/2}` in MATH.md) and

.. math::

    L^\top X^\top X L / \sigma^2 = O\,\mathrm{diag}(\lambda_i)\,O^\top,

the implied prior covariance is

.. math::

    Q = L\,O\,\mathrm{diag}(q_i)\,O^\top L^\top, \qquad
    q_i = \frac{(1-\alpha\lambda_i)^{-k} - 1}{\lambda_i}, \qquad
    q_i = k\alpha \text{ where } \lambda_i = 0,

valid when :math:`0 \le \alpha\lambda_i < 1` for every :math:`i`. Equivalently the prior
precision in the eigenbasis is :math:`\gamma_i = 1/q_i = \lambda_i(1-\alpha\lambda_i)^k /
(1-(1-\alpha\lambda_i)^k)`, and
:math:`Q = \alpha\sum_{i=1}^{k}(I - \alpha B X^\top X/\sigma^2)^{-i}B`
(a form without eigenvectors, used by the tests). Why: along eigenvector :math:`i`, gradient
descent moves the iterate from :math:`\theta` toward the least-squares solution and leaves the
fraction :math:`(1-\alpha\lambda_i)^k` of the way untravelled; the MAP under a prior of
precision :math:`\gamma_i` leaves the fraction :math:`\gamma_i/(\lambda_i+\gamma_i)`. Equating
the two gives :math:`\gamma_i`. The prior depends on :math:`\alpha`, :math:`k`, :math:`B` and
the task's own inputs :math:`X`: MAML's inner loop assumes a *different* Gaussian prior for
every task, and a learned preconditioner (Meta-SGD's per-parameter step sizes, Li et al. 2017)
is a learned prior covariance.

With a Gaussian prior the rest is closed form too:

.. math::

    p(y \mid \theta) &= \mathcal N(y;\, X\theta,\, \sigma^2 I + X Q X^\top)
        &&\text{(evidence)}\\
    p(\phi \mid y, \theta) &= \mathcal N(\mu, H^{-1}),\quad
        H = X^\top X/\sigma^2 + Q^{-1},\quad
        \mu = H^{-1}(X^\top y/\sigma^2 + Q^{-1}\theta) = \phi_{(k)}
        &&\text{(posterior)}

and so are the two estimators of :math:`\theta` from :math:`J` tasks that this module
compares: exact empirical Bayes (a generalised least-squares problem, :func:`empirical_bayes_theta`)
and MAML (an ordinary least-squares problem, because :math:`\hat\phi_j` is affine in
:math:`\theta`; :func:`maml_theta`).

Shapes: ``X`` is ``(..., N, D)`` with any leading batch (task) dimensions; ``y`` is
``(..., N)`` or ``(..., N, 1)`` (the :class:`~hierbayes.tasks.TaskBatch` layout); ``theta`` is
``(D,)`` or broadcasts against ``(..., D)``. A preconditioner is ``(D,)`` (diagonal) or
``(D, D)`` (full), shared by every task, and must be symmetric positive definite. For the
built-in :class:`~hierbayes.models.BayesianLinearRegression`, :func:`design_matrix` builds
``X`` from the inputs, and the guide's step size :math:`\alpha` on the summed log likelihood
is exactly the ``step_size`` here. Everything is differentiable in ``theta`` (and in
``step_size``) with torch autograd.

Numerics: only Cholesky factorisations, triangular solves and symmetric eigendecompositions
are used (never ``slogdet``, ``lu`` or ``solve``, whose batched CPU versions in torch 2.13 are
wrong for matrices of size 256 and more when several threads run).

References
----------
1. Santos (1996). Equivalence of regularization and truncated iteration for general
   ill-posed problems. Linear Algebra and its Applications 236, 25--33.
2. Grant, Finn, Levine, Darrell & Griffiths (2018). Recasting gradient-based meta-learning as
   hierarchical Bayes. ICLR. §3.1.
3. Finn, Abbeel & Levine (2017). Model-agnostic meta-learning for fast adaptation of deep
   networks. ICML.
4. Li, Zhou, Chen & Li (2017). Meta-SGD: learning to learn quickly for few-shot learning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hierbayes.errors import HierbayesError

__all__ = [
    "AdaptationMap",
    "InadmissibleStepSizeError",
    "LinearGaussianPosterior",
    "design_matrix",
    "gradient_descent_affine_map",
    "gradient_descent_iterate",
    "implied_prior_covariance",
    "implied_prior_precision",
    "largest_admissible_step_size",
    "log_evidence",
    "posterior",
]

_LOG_2PI = math.log(2 * math.pi)

Scalar = float | Tensor


class InadmissibleStepSizeError(HierbayesError, ValueError):
    r"""A step size with :math:`\alpha\lambda_{\max} \ge 1`, outside the theorem's regime.

    There the :math:`k`-step iterate is no longer MAP under the implied prior of Santos (1996);
    for odd :math:`k`, :math:`\alpha\lambda = 1` or :math:`\alpha\lambda \ge 2` it is MAP
    under no Gaussian prior centred at :math:`\theta` at all.

    Attributes
    ----------
    step_size:
        The :math:`\alpha` that was passed.
    largest_eigenvalue:
        :math:`\lambda_{\max}` of :math:`L^\top X^\top X L/\sigma^2` (over all tasks).
    largest_admissible_step_size:
        :math:`1/\lambda_{\max}`; every smaller positive step size is admissible.
    task:
        The (flattened) index of the first offending task, or ``None`` for unbatched ``X``.
    """

    def __init__(
        self,
        message: str,
        *,
        step_size: float,
        largest_eigenvalue: float,
        largest_admissible_step_size: float,
        task: int | None,
    ) -> None:
        super().__init__(message)
        self.step_size = step_size
        self.largest_eigenvalue = largest_eigenvalue
        self.largest_admissible_step_size = largest_admissible_step_size
        self.task = task


# -- input handling ------------------------------------------------------------------------------


def design_matrix(x: Tensor, *, bias: bool = False) -> Tensor:
    r"""The design matrix :math:`X` of :class:`~hierbayes.models.BayesianLinearRegression`.

    ``x`` ``(..., N, d)`` becomes ``(..., N, d + 1)`` with a trailing column of ones when
    ``bias`` (the model's layout :math:`\phi = (w, b)`), and is returned unchanged otherwise.
    """
    if not bias:
        return x
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def _check_design(X: Tensor) -> None:
    if X.dim() < 2:
        raise ValueError(f"X must have shape (..., N, D); got {tuple(X.shape)}")
    if not torch.is_floating_point(X):
        raise TypeError(f"X must be a floating-point tensor; got dtype {X.dtype}")


def _targets(y: Tensor, X: Tensor, name: str = "y") -> Tensor:
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


def _positive(value: Scalar, name: str) -> None:
    if not bool(torch.all(torch.as_tensor(value) > 0)):
        raise ValueError(f"{name} must be positive; got {value}")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")


def _check_preconditioner(B: Tensor | None, D: int) -> None:
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


def _preconditioner_factor(B: Tensor | None) -> Tensor | None:
    r"""A factor :math:`L` with :math:`B = LL^\top`: ``sqrt(B)`` (diagonal) or Cholesky (full)."""
    if B is None:
        return None
    if B.dim() == 1:
        return B.sqrt()
    L, info = torch.linalg.cholesky_ex(0.5 * (B + B.mT))
    if int(info) != 0:
        raise ValueError(
            "the full preconditioner is not positive definite (its Cholesky factorisation "
            f"failed at column {int(info) - 1}); gradient descent with it is not a descent method "
            "and implies no Gaussian prior"
        )
    return L


def _apply_B(B: Tensor | None, v: Tensor) -> Tensor:
    r""":math:`Bv` for ``v`` ``(..., D)``."""
    if B is None:
        return v
    if B.dim() == 1:
        return B * v
    return v @ B  # B is symmetric


def _apply_B_left(B: Tensor | None, M: Tensor) -> Tensor:
    r""":math:`BM` for ``M`` ``(..., D, K)``."""
    if B is None:
        return M
    if B.dim() == 1:
        return B[:, None] * M
    return B @ M


def _gram(X: Tensor, noise_scale: Scalar) -> Tensor:
    r""":math:`X^\top X/\sigma^2`, ``(..., D, D)``, exactly symmetric."""
    G = X.mT @ X
    G = 0.5 * (G + G.mT)
    return G / torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2


def _chol(A: Tensor, what: str) -> Tensor:
    """Cholesky factor of a batch of matrices, with an error that names the first bad task."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        bad = int((info.reshape(-1) != 0).nonzero()[0])
        where = f" (task {bad})" if info.dim() > 0 else ""
        raise ValueError(f"{what} is not positive definite{where}")
    return L


# -- gradient descent ------------------------------------------------------------------------------


def gradient_descent_iterate(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> Tensor:
    r"""The iterate :math:`\phi_{(k)}` of :math:`k` (preconditioned) gradient steps from θ.

    .. math::

        \phi_{(0)} = \theta,\qquad
        \phi_{(i)} = \phi_{(i-1)} + \frac{\alpha}{\sigma^2} B X^\top (y - X\phi_{(i-1)}),

    i.e. gradient descent on :math:`\lVert y - X\phi\rVert^2/(2\sigma^2)`, or gradient ascent
    on :math:`\log\mathcal N(y \mid X\phi, \sigma^2 I)`: exactly what
    :class:`~hierbayes.inference.TruncatedGradientGuide` computes for the linear model (its
    per-parameter step sizes are :math:`\alpha B` with :math:`B` diagonal). This is the plain
    loop, with no admissibility check; it is differentiable in ``theta`` and ``step_size``.

    Parameters
    ----------
    theta:
        :math:`\theta`, ``(D,)`` or broadcasting against ``(..., D)``.
    X, y:
        ``(..., N, D)`` inputs and ``(..., N)`` or ``(..., N, 1)`` targets.
    noise_scale, step_size, steps:
        :math:`\sigma > 0`, :math:`\alpha > 0` and :math:`k \ge 0`.
    preconditioner:
        :math:`B`: ``None`` (identity), ``(D,)`` diagonal or ``(D, D)`` symmetric positive definite.

    Returns
    -------
    Tensor
        :math:`\phi_{(k)}`, ``(..., D)``.
    """
    _check_design(X)
    _check_steps(steps)
    _positive(noise_scale, "noise_scale")
    _positive(step_size, "step_size")
    _check_preconditioner(preconditioner, X.shape[-1])
    t = _targets(y, X)
    batch = torch.broadcast_shapes(theta.shape[:-1], X.shape[:-2])
    phi = theta.expand(*batch, X.shape[-1])
    inv_var = 1.0 / torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    for _ in range(steps):
        residual = t - (X @ phi.unsqueeze(-1))[..., 0]
        grad_log_lik = (X.mT @ residual.unsqueeze(-1))[..., 0] * inv_var
        phi = phi + step_size * _apply_B(preconditioner, grad_log_lik)
    return phi


class AdaptationMap(NamedTuple):
    r""":math:`\phi_{(k)} = A\theta + Cy`: gradient descent as an affine map.

    ``theta_matrix`` is :math:`A = (I - \alpha B X^\top X/\sigma^2)^k`, ``(..., D, D)``;
    ``target_matrix`` is :math:`C = \sum_{i=0}^{k-1}(I - \alpha B X^\top X/\sigma^2)^i\,\alpha
    B X^\top/\sigma^2`, ``(..., D, N)``. Since :math:`\theta` is a fixed point on noise-free
    targets :math:`y = X\theta`, :math:`CX = I - A`.
    """

    theta_matrix: Tensor
    target_matrix: Tensor

    def __call__(self, theta: Tensor, y: Tensor) -> Tensor:
        r""":math:`A\theta + Cy`, ``(..., D)``, for ``theta`` ``(..., D)``, ``y`` ``(..., N)``."""
        return (self.theta_matrix @ theta.unsqueeze(-1) + self.target_matrix @ y.unsqueeze(-1))[
            ..., 0
        ]


def gradient_descent_affine_map(
    X: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> AdaptationMap:
    r"""The matrices :math:`(A, C)` with :math:`\phi_{(k)} = A\theta + Cy` (:class:`AdaptationMap`).

    Computed by the recursion :math:`A_0 = I,\ C_0 = 0,\ A_i = MA_{i-1},\ C_i = MC_{i-1} +
    \alpha BX^\top/\sigma^2` with :math:`M = I - \alpha BX^\top X/\sigma^2`. ``X`` is
    ``(..., N, D)``; the other arguments are those of :func:`gradient_descent_iterate`.
    """
    _check_design(X)
    _check_steps(steps)
    _positive(noise_scale, "noise_scale")
    _positive(step_size, "step_size")
    D = X.shape[-1]
    _check_preconditioner(preconditioner, D)
    inv_var = 1.0 / torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    eye = torch.eye(D, dtype=X.dtype, device=X.device)
    BXt = step_size * inv_var * _apply_B_left(preconditioner, X.mT)  # (..., D, N)
    M = eye - BXt @ X
    A = eye.expand_as(M)
    C = torch.zeros_like(BXt)
    for _ in range(steps):
        A = M @ A
        C = M @ C + BXt
    return AdaptationMap(A, C)


# -- the implied prior -----------------------------------------------------------------------------


class _Spectrum(NamedTuple):
    eigenvalues: Tensor  # (..., D), thresholded: exactly 0 where numerically zero
    eigenvectors: Tensor  # (..., D, D)
    factor: Tensor | None  # L with B = L L^T: None, (D,) or (D, D) lower triangular


def _spectrum(X: Tensor, noise_scale: Scalar, preconditioner: Tensor | None) -> _Spectrum:
    r"""Eigenpairs of :math:`L^\top X^\top X L/\sigma^2`, numerically-zero eigenvalues set to 0.

    An eigenvalue is treated as exactly zero when it is at most
    :math:`10\max(N, D)\,\varepsilon\,\lambda_{\max}` (:math:`\varepsilon` the machine epsilon
    of ``X``'s dtype): rounding in :math:`X^\top X` and in the eigensolver makes the zero
    eigenvalues of a rank-deficient ``X`` come out as tiny numbers of either sign. Because
    :math:`q(\lambda)` is continuous at 0 (:math:`q(\lambda) = k\alpha + O(\lambda)`), the
    choice of threshold changes :math:`Q` by far less than rounding does.
    """
    _check_design(X)
    _positive(noise_scale, "noise_scale")
    N, D = X.shape[-2], X.shape[-1]
    _check_preconditioner(preconditioner, D)
    L = _preconditioner_factor(preconditioner)
    G = _gram(X, noise_scale)
    if L is not None:
        G = L[:, None] * G * L[None, :] if L.dim() == 1 else L.mT @ G @ L
        G = 0.5 * (G + G.mT)
    lam, O = torch.linalg.eigh(G)
    eps = torch.finfo(X.dtype).eps
    top = lam[..., -1:].clamp_min(0.0)
    lam = torch.where(lam <= 10 * max(N, D) * eps * top, torch.zeros_like(lam), lam)
    return _Spectrum(lam, O, L)


def largest_admissible_step_size(
    X: Tensor, *, noise_scale: Scalar, preconditioner: Tensor | None = None
) -> Tensor:
    r""":math:`1/\lambda_{\max}` per task, ``(...)``: every smaller step size implies a prior.

    :math:`\lambda_{\max}` is the largest eigenvalue of :math:`L^\top X^\top X L/\sigma^2`
    (:math:`B = LL^\top`); it is ``inf`` for ``X = 0``. Gradient descent on the task's loss
    converges for :math:`\alpha < 2/\lambda_{\max}`, but it is MAP under a Gaussian prior
    centred at :math:`\theta` (for every :math:`k`) only for :math:`\alpha < 1/\lambda_{\max}`.
    """
    lam = _spectrum(X, noise_scale, preconditioner).eigenvalues[..., -1]
    return torch.where(lam > 0, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), math.inf)


def _check_admissible(lam: Tensor, step_size: Scalar, steps: int) -> None:
    alpha = float(torch.as_tensor(step_size).detach())
    top = lam[..., -1]
    bad = (alpha * top) >= 1
    if not bool(bad.any()):
        return
    lam_max = float(top.max())
    task = int(bad.reshape(-1).nonzero()[0]) if top.dim() > 0 else None
    where = f" (task {task} is the first such)" if task is not None else ""
    bound = 1.0 / lam_max
    raise InadmissibleStepSizeError(
        f"step_size α = {alpha:.6g} is too large for these inputs{where}: the largest "
        f"eigenvalue of B^(1/2) X^T X B^(1/2) / σ² is λ_max = {lam_max:.6g}, so "
        f"αλ_max = {alpha * lam_max:.6g} ≥ 1. Along that eigenvector gradient descent reaches "
        f"or overshoots the least-squares solution, and its {steps}-step iterate no longer "
        "corresponds to the Gaussian prior N(θ, Q) of Santos (1996), which needs αλ < 1: for "
        "odd k, αλ = 1 or αλ ≥ 2 it is the MAP under no Gaussian prior centred at θ at all "
        "(for even k and 1 < αλ < 2 it matches only the prior of the mirrored step "
        "(2 - αλ)/λ, which is not reported). Use step_size < 1/λ_max = "
        f"{bound:.6g}{' (over all tasks)' if task is not None else ''}.",
        step_size=alpha,
        largest_eigenvalue=lam_max,
        largest_admissible_step_size=bound,
        task=task,
    )


def _implied_variances(lam: Tensor, step_size: Scalar, steps: int) -> Tensor:
    r""":math:`q_i = ((1-\alpha\lambda_i)^{-k} - 1)/\lambda_i`, and :math:`k\alpha` where 0.

    Written as :math:`\operatorname{expm1}(-k\operatorname{log1p}(-\alpha\lambda))/\lambda`, which
    has no cancellation for small :math:`\alpha\lambda`.
    """
    zero = lam == 0
    safe = torch.where(zero, torch.ones_like(lam), lam)
    alpha = torch.as_tensor(step_size, dtype=lam.dtype, device=lam.device)
    q = torch.expm1(-steps * torch.log1p(-alpha * safe)) / safe
    return torch.where(zero, steps * alpha * torch.ones_like(lam), q)


def implied_prior_covariance(
    X: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> Tensor:
    r"""The covariance :math:`Q` of the Gaussian prior :math:`\mathcal N(\theta, Q)` under which
    :math:`k` gradient-descent steps from :math:`\theta` are exactly MAP.

    .. math::

        L^\top X^\top X L/\sigma^2 = O\,\mathrm{diag}(\lambda_i)\,O^\top,\qquad
        Q = L\,O\,\mathrm{diag}(q_i)\,O^\top L^\top,\qquad
        q_i = \frac{(1-\alpha\lambda_i)^{-k}-1}{\lambda_i}
        \ \ (q_i = k\alpha \text{ if } \lambda_i = 0),

    where :math:`B = LL^\top` is the preconditioner (Santos 1996; Grant et al. 2018, §3.1;
    MATH.md §3). Directions the task's data cannot see (:math:`\lambda_i = 0`) keep the prior
    variance :math:`k\alpha` (times :math:`B`); eigenvalues below a relative threshold
    (:math:`10\max(N,D)\varepsilon\lambda_{\max}`) count as zero, see the module notes.
    ``steps = 0`` gives :math:`Q = 0`: the prior is a point mass at :math:`\theta`.

    Parameters
    ----------
    X:
        The task's inputs, ``(..., N, D)``; one :math:`Q` per task.
    noise_scale, step_size, steps, preconditioner:
        :math:`\sigma`, :math:`\alpha`, :math:`k` and :math:`B`, as in
        :func:`gradient_descent_iterate`.

    Returns
    -------
    Tensor
        :math:`Q`, ``(..., D, D)``, symmetric positive definite for :math:`k \ge 1`.

    Raises
    ------
    InadmissibleStepSizeError
        If :math:`\alpha\lambda_i \ge 1` for some eigenvalue of some task; the message gives
        :math:`\lambda_{\max}` and the largest admissible step size :math:`1/\lambda_{\max}`.
    """
    _check_steps(steps)
    _positive(step_size, "step_size")
    spec = _spectrum(X, noise_scale, preconditioner)
    _check_admissible(spec.eigenvalues, step_size, steps)
    q = _implied_variances(spec.eigenvalues, step_size, steps)
    O, L = spec.eigenvectors, spec.factor
    if L is not None:
        O = L[:, None] * O if L.dim() == 1 else L @ O
    Q = (O * q.unsqueeze(-2)) @ O.mT
    return 0.5 * (Q + Q.mT)


def implied_prior_precision(
    X: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> Tensor:
    r""":math:`Q^{-1}`, the precision of the implied prior (see :func:`implied_prior_covariance`).

    .. math::

        Q^{-1} = L^{-\top} O\,\mathrm{diag}(\gamma_i)\,O^\top L^{-1},\qquad
        \gamma_i = \frac{\lambda_i(1-\alpha\lambda_i)^k}{1-(1-\alpha\lambda_i)^k}
                 = \frac{1}{q_i}\ \ (\gamma_i = 1/(k\alpha) \text{ if } \lambda_i = 0).

    Better conditioned than :math:`Q` itself: :math:`\gamma_i` is small where :math:`q_i` is
    huge (:math:`\alpha\lambda_i` near 1, many steps), and the posterior precision
    :math:`H = X^\top X/\sigma^2 + Q^{-1}` has eigenvalues :math:`\lambda_i + \gamma_i =
    \lambda_i/(1-(1-\alpha\lambda_i)^k)`, between :math:`1/(k\alpha)` and
    :math:`\lambda_{\max}/(1-(1-\alpha\lambda_{\max})^k)` in the whitened coordinates: a
    condition number of at most :math:`k` (times that of :math:`B`). Needs :math:`k \ge 1`.
    Shapes and errors as in :func:`implied_prior_covariance`.
    """
    _check_steps(steps)
    if steps == 0:
        raise ValueError(
            "steps = 0 implies the point-mass prior at θ (Q = 0), which has no precision; "
            "use implied_prior_covariance, which returns Q = 0"
        )
    _positive(step_size, "step_size")
    spec = _spectrum(X, noise_scale, preconditioner)
    _check_admissible(spec.eigenvalues, step_size, steps)
    gamma = 1.0 / _implied_variances(spec.eigenvalues, step_size, steps)
    W, L = spec.eigenvectors, spec.factor
    if L is not None:
        if L.dim() == 1:
            W = W / L[:, None]
        else:
            W = torch.linalg.solve_triangular(L.mT.expand(*W.shape), W, upper=True)
    P = (W * gamma.unsqueeze(-2)) @ W.mT
    return 0.5 * (P + P.mT)


# -- posterior and evidence ------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGaussianPosterior:
    r"""The Gaussian task posterior :math:`\mathcal N(\mu, \Sigma)` of :func:`posterior`.

    ``mean`` is :math:`\mu` ``(..., D)``, ``covariance`` :math:`\Sigma = H^{-1}` ``(..., D, D)``.
    ``precision`` is :math:`H = X^\top X/\sigma^2 + Q^{-1}`: kept from the information form
    (``_precision``), or computed on use from a covariance (it needs :math:`\Sigma`
    non-singular).
    """

    mean: Tensor
    covariance: Tensor
    _precision: Tensor | None = None

    @property
    def precision(self) -> Tensor:
        r""":math:`H = \Sigma^{-1}`, ``(..., D, D)``."""
        if self._precision is not None:
            return self._precision
        L = _chol(self.covariance, "the posterior covariance (from a singular prior covariance?)")
        return torch.cholesky_inverse(L)


def posterior(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    noise_scale: Scalar,
    prior_covariance: Tensor | None = None,
    prior_precision: Tensor | None = None,
) -> LinearGaussianPosterior:
    r"""The exact task posterior :math:`p(\phi\mid y,\theta)` under a Gaussian prior.

    .. math::

        H = X^\top X/\sigma^2 + Q^{-1},\qquad
        \mu = H^{-1}\bigl(X^\top y/\sigma^2 + Q^{-1}\theta\bigr)
            = \theta + QX^\top(\sigma^2 I + XQX^\top)^{-1}(y - X\theta),\qquad
        \Sigma = H^{-1} = Q - QX^\top(\sigma^2 I + XQX^\top)^{-1}XQ.

    :math:`\mu` is the MAP estimate; under the implied prior of :math:`k` gradient-descent steps
    (:func:`implied_prior_covariance`) it equals :func:`gradient_descent_iterate`.

    Give exactly one of ``prior_covariance`` (the second, "Kalman" forms above: an
    :math:`N\times N` Cholesky factorisation; :math:`Q` may be singular) or ``prior_precision``
    (the first, "information" form: a :math:`D\times D` Cholesky factorisation of :math:`H`).
    Prefer the precision for implied priors with :math:`\alpha\lambda_{\max}` near 1 and many
    steps: their variances span :math:`k\alpha` to about
    :math:`(1-\alpha\lambda_{\max})^{-k}/\lambda_{\max}`, forming :math:`Q` already rounds
    its small directions by :math:`\varepsilon\lVert Q\rVert`, and the covariance form is
    then only accurate to about :math:`\varepsilon(1-\alpha\lambda_{\max})^{-k}`, while the
    information form stays at rounding level (see :func:`implied_prior_precision`).

    Parameters
    ----------
    theta:
        Prior mean, ``(D,)`` or broadcasting against ``(..., D)``.
    X, y:
        ``(..., N, D)`` and ``(..., N)`` or ``(..., N, 1)``.
    noise_scale:
        :math:`\sigma`.
    prior_covariance, prior_precision:
        :math:`Q` or :math:`Q^{-1}`, ``(D, D)`` or ``(..., D, D)``.
    """
    _check_design(X)
    _positive(noise_scale, "noise_scale")
    if (prior_covariance is None) == (prior_precision is None):
        raise ValueError("give exactly one of prior_covariance and prior_precision")
    t = _targets(y, X)
    sigma2 = torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    if prior_precision is not None:
        H = _gram(X, noise_scale) + prior_precision
        L = _chol(H, "the posterior precision X^T X/σ² + Q^(-1)")
        rhs = (X.mT @ t.unsqueeze(-1))[..., 0] / sigma2 + (prior_precision @ theta.unsqueeze(-1))[
            ..., 0
        ]
        batch = torch.broadcast_shapes(L.shape[:-2], rhs.shape[:-1])
        mean = torch.cholesky_solve(rhs.expand(*batch, rhs.shape[-1]).unsqueeze(-1), L)[..., 0]
        return LinearGaussianPosterior(mean, torch.cholesky_inverse(L), H)
    assert prior_covariance is not None
    Q = prior_covariance
    XQ = X @ Q  # (..., N, D)
    S = XQ @ X.mT
    S = 0.5 * (S + S.mT) + sigma2 * torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    L = _chol(S, "the marginal covariance σ²I + XQX^T")
    residual = t - (X @ theta.unsqueeze(-1))[..., 0]
    # K^T = S^{-1} X Q, so mean = θ + K r and Σ = Q - K X Q.
    Kt = torch.cholesky_solve(XQ, L)  # (..., N, D)
    mean = theta + (Kt.mT @ residual.unsqueeze(-1))[..., 0]
    cov = Q - XQ.mT @ Kt
    return LinearGaussianPosterior(mean, 0.5 * (cov + cov.mT))


def log_evidence(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    noise_scale: Scalar,
    prior_covariance: Tensor,
) -> Tensor:
    r"""The log marginal likelihood :math:`\log p(y \mid \theta)` of each task.

    .. math::

        \log p(y\mid\theta) = \log\int\mathcal N(y; X\phi, \sigma^2 I)\,
            \mathcal N(\phi;\theta, Q)\,d\phi
          = \log\mathcal N(y;\, X\theta,\, S),\qquad S = \sigma^2 I + XQX^\top,

    evaluated as :math:`-\tfrac12\lVert L^{-1}(y - X\theta)\rVert^2 - \sum_n\log L_{nn}
    - \tfrac N2\log 2\pi` with the Cholesky factor :math:`S = LL^\top`. This is the quantity
    empirical Bayes maximises over :math:`\theta` (Grant et al. 2018, eq. 2); it is
    differentiable in ``theta``, ``prior_covariance`` and ``noise_scale``.

    Parameters
    ----------
    theta:
        ``(D,)`` or broadcasting against ``(..., D)``.
    X, y:
        ``(..., N, D)`` and ``(..., N)`` or ``(..., N, 1)``.
    noise_scale:
        :math:`\sigma`.
    prior_covariance:
        :math:`Q`, ``(D, D)`` or ``(..., D, D)``, symmetric positive semi-definite.

    Returns
    -------
    Tensor
        ``(...)``, one log evidence per task.
    """
    _check_design(X)
    _positive(noise_scale, "noise_scale")
    t = _targets(y, X)
    N = X.shape[-2]
    sigma2 = torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    S = X @ prior_covariance @ X.mT
    S = 0.5 * (S + S.mT) + sigma2 * torch.eye(N, dtype=X.dtype, device=X.device)
    L = _chol(S, "the marginal covariance σ²I + XQX^T")
    residual = t - (X @ theta.unsqueeze(-1))[..., 0]
    batch = torch.broadcast_shapes(L.shape[:-2], residual.shape[:-1])
    z = torch.linalg.solve_triangular(
        L.expand(*batch, N, N), residual.expand(*batch, N).unsqueeze(-1), upper=False
    )[..., 0]
    half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * z.square().sum(-1) - half_logdet - 0.5 * N * _LOG_2PI
