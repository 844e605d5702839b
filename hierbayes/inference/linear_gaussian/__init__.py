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

and so are the two estimators of :math:`\theta` from :math:`J` tasks that this package
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

Modules
-------
:mod:`~hierbayes.inference.linear_gaussian.gradient_descent`
    The :math:`k`-step iterate and its affine map :math:`\phi_{(k)} = A\theta + Cy`.
:mod:`~hierbayes.inference.linear_gaussian.implied_prior`
    The implied prior covariance :math:`Q` and precision :math:`Q^{-1}`, the admissible step
    sizes and the error outside them.
:mod:`~hierbayes.inference.linear_gaussian.conjugate`
    The posterior and the evidence under any Gaussian prior.
:mod:`~hierbayes.inference.linear_gaussian.estimators`
    Empirical Bayes and MAML estimates of :math:`\theta` from :math:`J` tasks, with their exact
    sampling covariances.
:mod:`~hierbayes.inference.linear_gaussian.validation`, :mod:`~hierbayes.inference.linear_gaussian.linalg`
    The design matrix, the checks on every argument, and the shared factorisations.

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

from hierbayes.inference.linear_gaussian.conjugate import (
    LinearGaussianPosterior,
    log_evidence,
    posterior,
)
from hierbayes.inference.linear_gaussian.estimators import (
    ThetaEstimate,
    empirical_bayes_theta,
    maml_theta,
)
from hierbayes.inference.linear_gaussian.gradient_descent import (
    AdaptationMap,
    gradient_descent_affine_map,
    gradient_descent_iterate,
)
from hierbayes.inference.linear_gaussian.implied_prior import (
    InadmissibleStepSizeError,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
)
from hierbayes.inference.linear_gaussian.validation import design_matrix

__all__ = [
    "AdaptationMap",
    "InadmissibleStepSizeError",
    "LinearGaussianPosterior",
    "ThetaEstimate",
    "design_matrix",
    "empirical_bayes_theta",
    "gradient_descent_affine_map",
    "gradient_descent_iterate",
    "implied_prior_covariance",
    "implied_prior_precision",
    "largest_admissible_step_size",
    "log_evidence",
    "maml_theta",
    "posterior",
]
