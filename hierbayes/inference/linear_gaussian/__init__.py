r"""Linear-Gaussian exactness: truncated gradient descent is MAP under an implied Gaussian prior
(Santos 1996; Grant et al. 2018, §3.1; MATH.md §3).

:mod:`~hierbayes.inference.linear_gaussian.theory` holds the model's closed forms (the
gradient-descent iterate, the implied prior covariance and precision, the posterior and the
evidence); :mod:`~hierbayes.inference.linear_gaussian.estimators` the estimators of
:math:`\theta` from many tasks with their sampling covariances.
"""

from hierbayes.inference.linear_gaussian.estimators import (
    ThetaEstimate,
    empirical_bayes_theta,
    maml_theta,
)
from hierbayes.inference.linear_gaussian.theory import (
    AdaptationMap,
    InadmissibleStepSizeError,
    LinearGaussianPosterior,
    design_matrix,
    gradient_descent_affine_map,
    gradient_descent_iterate,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
    log_evidence,
    posterior,
)

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
