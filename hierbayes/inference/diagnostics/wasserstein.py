r"""The 2-Wasserstein distance between Gaussians, and the symmetric matrix square root it needs.

Between :math:`\mathcal N(\mu_1,\Sigma_1)` and :math:`\mathcal N(\mu_2,\Sigma_2)`
(Givens & Shortt 1984; Dowson & Landau 1982)

.. math::

    W_2^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
            - 2\,(\Sigma_2^{1/2}\Sigma_1\Sigma_2^{1/2})^{1/2}\big),

with symmetric square roots from ``eigh`` (negative round-off eigenvalues set to 0; a matrix
indefinite beyond round-off is reported with a
:class:`~hierbayes.inference.core.numerics.ClampWarning`). A point mass has
:math:`\Sigma_1 = 0`, so :math:`W_2^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_2`.

References
----------
1. Givens & Shortt (1984). A class of Wasserstein metrics for probability distributions.
   Michigan Mathematical Journal 31.
2. Dowson & Landau (1982). The Fréchet distance between multivariate normal distributions.
   Journal of Multivariate Analysis 12.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierbayes.inference.core.numerics import nonnegative_eigenvalues

__all__ = ["symmetric_sqrt", "wasserstein2_gaussian"]


def symmetric_sqrt(matrix: Tensor) -> Tensor:
    r"""The symmetric positive semi-definite square root :math:`V\sqrt{\max(\Lambda,0)}V^\top`
    of symmetric ``matrix`` ``(..., D, D)`` (symmetrised first; ``eigh``)."""
    sym = 0.5 * (matrix + matrix.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(sym)
    root = nonnegative_eigenvalues(evals, "the matrix in symmetric_sqrt").sqrt()
    return (evecs * root.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def wasserstein2_gaussian(
    mean1: Tensor,
    cov1: Tensor | None,
    mean2: Tensor,
    cov2: Tensor | None,
    *,
    sqrt_cov2: Tensor | None = None,
) -> Tensor:
    r"""The 2-Wasserstein distance between :math:`\mathcal N(\mu_1,\Sigma_1)` and
    :math:`\mathcal N(\mu_2,\Sigma_2)`, batched over leading dimensions.

    .. math::

        W_2^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
                - 2\operatorname{tr}\big(\Sigma_2^{1/2}\Sigma_1\Sigma_2^{1/2}\big)^{1/2}

    Parameters
    ----------
    mean1, mean2:
        ``(..., D)``.
    cov1, cov2:
        ``(..., D, D)`` symmetric positive semi-definite, or ``None`` for a point mass
        (:math:`\Sigma = 0`).
    sqrt_cov2:
        :math:`\Sigma_2^{1/2}` if already computed (:func:`symmetric_sqrt`).

    Returns
    -------
    ``(...)`` distances (the square root of the clamped-at-zero :math:`W_2^2`).
    """
    w2sq = (mean1 - mean2).square().sum(-1)
    if cov1 is not None:
        w2sq = w2sq + cov1.diagonal(dim1=-2, dim2=-1).sum(-1)
    if cov2 is not None:
        w2sq = w2sq + cov2.diagonal(dim1=-2, dim2=-1).sum(-1)
    if cov1 is not None and cov2 is not None:
        root2 = symmetric_sqrt(cov2) if sqrt_cov2 is None else sqrt_cov2
        middle = root2 @ cov1 @ root2
        evals = torch.linalg.eigvalsh(0.5 * (middle + middle.transpose(-1, -2)))
        w2sq = w2sq - 2 * evals.clamp_min(0).sqrt().sum(-1)
    return w2sq.clamp_min(0).sqrt()
