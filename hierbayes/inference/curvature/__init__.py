r"""Curvature estimates :math:`\hat H_j` of each task's negative log posterior, by name.

=========  =========================================================  ======================
name       matrix                                                     cost per task
=========  =========================================================  ======================
``full``   exact Hessian + P (indefinite: eigenvalues floored)        ``D`` backward passes, ``D²`` memory
``ggn``    exact GGN :math:`\tilde J^\top\tilde J + P` (default)      ``O(R²D)``, ``R = N·C``
``diag``   diagonal of the GGN + P                                    ``O(RD)``
``kfac``   per-layer :math:`c\,G\otimes A + \tau I` (the paper's)      small eigendecompositions
=========  =========================================================  ======================

``ggn`` and ``diag`` take a network model's output Jacobian (the ``NetworkDensity`` fast path)
and any other Pyro program's observation sites: the Jacobian of each observation distribution's
parameters and its Fisher information (:mod:`~hierbayes.inference.curvature.observation`),
exact for the families of :mod:`~hierbayes.inference.curvature.families` (Normal, StudentT,
Bernoulli, Categorical, Poisson, Binomial, Geometric, NegativeBinomial, Gamma, Exponential,
Beta, LogNormal, Laplace, Cauchy, HalfNormal, HalfCauchy, Gumbel), Monte Carlo with a fixed seed
otherwise. ``kfac`` needs a network.

Register a backend with :func:`register_curvature`; wherever hierbayes takes a curvature it
accepts a registered name or a callable ``builder(inputs: CurvatureInputs) -> CurvatureEstimate``.
"""

from __future__ import annotations

from collections.abc import Callable

from hierbayes.inference.curvature.base import (
    CurvatureEstimate,
    CurvatureInputs,
    cholesky_logdet,
    row_constant,
    safe_cholesky,
)
from hierbayes.inference.curvature.dense import DenseCurvature
from hierbayes.inference.curvature.diag import DiagonalCurvature, diagonal_ggn
from hierbayes.inference.curvature.fisher import sampled_fisher_diagonal
from hierbayes.inference.curvature.full import FullHessianCurvature, full_hessian
from hierbayes.inference.curvature.ggn import GGNCurvature, ggn
from hierbayes.inference.curvature.jacobian import (
    DenseJacobian,
    LayerJacobian,
    OutputJacobian,
    output_jacobian,
)
from hierbayes.inference.curvature.kfac import KFACCurvature, kfac
from hierbayes.inference.curvature.observation import observation_jacobian

__all__ = [
    "CurvatureBuilder",
    "CurvatureEstimate",
    "CurvatureInputs",
    "DenseCurvature",
    "DenseJacobian",
    "DiagonalCurvature",
    "FullHessianCurvature",
    "GGNCurvature",
    "KFACCurvature",
    "LayerJacobian",
    "OutputJacobian",
    "available_curvatures",
    "build_curvature",
    "cholesky_logdet",
    "get_curvature",
    "observation_jacobian",
    "output_jacobian",
    "register_curvature",
    "row_constant",
    "safe_cholesky",
    "sampled_fisher_diagonal",
]

CurvatureBuilder = Callable[[CurvatureInputs], CurvatureEstimate]

_REGISTRY: dict[str, CurvatureBuilder] = {
    "full": full_hessian,
    "ggn": ggn,
    "diag": diagonal_ggn,
    "kfac": kfac,
    "fisher_diag": sampled_fisher_diagonal,
}


def register_curvature(name: str, builder: CurvatureBuilder, *, overwrite: bool = False) -> None:
    """Make ``builder`` available as ``curvature=name`` everywhere."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a curvature named {name!r} is registered already; pass overwrite=True")
    _REGISTRY[name] = builder


def available_curvatures() -> list[str]:
    """The registered names."""
    return sorted(_REGISTRY)


def get_curvature(curvature: str | CurvatureBuilder) -> CurvatureBuilder:
    """The builder for a registered name, or the callable itself."""
    if callable(curvature):
        return curvature
    if curvature not in _REGISTRY:
        raise ValueError(f"unknown curvature {curvature!r}; registered: {available_curvatures()}")
    return _REGISTRY[curvature]


def build_curvature(
    curvature: str | CurvatureBuilder, inputs: CurvatureInputs
) -> CurvatureEstimate:
    """Build a curvature estimate, checking the result is one."""
    estimate = get_curvature(curvature)(inputs)
    if not isinstance(estimate, CurvatureEstimate):
        raise TypeError(
            f"curvature builder {curvature!r} returned {type(estimate).__name__}, not a CurvatureEstimate"
        )
    return estimate
