r"""Minnesota radon, counties as tasks: empirical Bayes, hyper-Laplace and NUTS side by side.

``python -m hierbayes radon --out DIR`` fits the contextual-effects model
(:class:`~hierbayes.models.ContextualEffects`; Gelman & Hill 2006, §12.6) to the 919 houses of
:func:`~hierbayes.tasks.radon_tasks` (85 counties, every house in its county's support set):

.. math::

    \log\text{radon}_i \sim \mathcal N\big(\alpha_{c(i)} + w_1 \log\text{uranium}_{c(i)}
        + w_2\,\text{floor}_i + w_3\,\overline{\text{floor}}_{c(i)},\ \sigma^2\big),
    \qquad \alpha_j \sim \mathcal N(\mu, \tau^2),

and reports every county's posterior by three methods:

1. ``empirical_bayes``: type-II MAP of :math:`(\mu, \tau, w, \sigma)` (``fit(..., method="llama",
   objective="evidence")``, L-BFGS on the exact marginal likelihood), then each county's
   Laplace posterior at its mode (``result.adapt``; exact here, the counties being
   linear-Gaussian); intervals :math:`m_j \mp 1.645\,s_j`.
2. ``hyper_laplace``: ``hyper_laplace(result, tasks, quadrature="draws", importance=True,
   num_nodes=2000)``, a Gaussian over the unconstrained globals with importance-weighted draws,
   each county's posterior a mixture of Gaussians over them; quantiles of the mixture by
   bisection of its CDF.
3. ``nuts``: ``nuts_full_bayes(result.model, tasks)``, Pyro's NUTS over the globals and the 85
   intercepts together (from the prior means, not the fit); empirical quantiles of the draws.

**The county effect is the county intercept** :math:`\alpha_j`: the model's per-task site
``alpha`` is the intercept itself (not a deviation from :math:`\mu`), so it is reported as it
is. It excludes the county-level terms: a county's expected log radon in a basement is
:math:`\alpha_j + w_1\log\text{uranium}_j + w_3\overline{\text{floor}}_j`.

``DIR/metrics.json``:

* ``hyper``: ``sites`` (which global site each quantity is: ``county_effect_mean`` is ``mu``,
  ``county_effect_scale`` ``tau``, ``weights`` ``w`` (:math:`w_1, w_2, w_3` on
  ``weight_features`` log uranium, floor, county mean floor), ``noise_scale`` ``sigma``);
  ``empirical_bayes`` the point estimates; ``hyper_laplace`` and ``nuts`` each quantity's
  posterior ``{"mean", "sd"}`` (over hyper-Laplace's importance-weighted draws of the globals,
  over NUTS' draws), lists of three for ``weights``;
* ``counties``: 85 entries in the data file's county order (``county`` is the 1-based
  ``county_idx``; the file carries no names), with ``houses`` and, per method,
  ``{"mean", "sd", "q05", "q95"}`` of :math:`\alpha_j`;
* ``against_nuts``: per approximation, the mean and largest :math:`|\Delta\text{mean}|` over
  counties and the mean ratio of its sds to NUTS';
* ``diagnostics``: ``empirical_bayes`` (``result.convergence``), ``hyper_laplace`` (its search,
  the importance weights' ESS), ``nuts`` (largest :math:`\hat R`, smallest bulk ESS,
  divergences, flagged counties and hyperparameters, per-hyperparameter :math:`\hat R` and
  ESS, settings);
* ``settings``, ``figures``, ``timings`` (seconds of each method and the total).

``DIR/forest.png``: every county's mean and 90 % interval by the three methods side by side,
sorted by the empirical-Bayes mean.

The defaults (NUTS 4 chains × (300 warm-up + 300 draws), 2,000 hyper-Laplace draws) take 2 to
3½ minutes on one core, nearly all of it NUTS; ``--quick`` about 15 seconds. The centred
parametrisation's funnel (small :math:`\tau`) can stall a NUTS chain: the report says when
NUTS is flagged, and ``--target-accept 0.95`` or longer runs are the remedy
(:class:`~hierbayes.experiments.radon.config.RadonConfig`).

Modules: :mod:`~hierbayes.experiments.radon.config` (the settings, the site of each
hyperparameter), :mod:`~hierbayes.experiments.radon.summaries` (each method's numbers),
:mod:`~hierbayes.experiments.radon.figures` (the forest plot) and
:mod:`~hierbayes.experiments.radon.command` (the command line).

References
----------
1. Gelman & Hill (2006). *Data Analysis Using Regression and Multilevel/Hierarchical Models*.
2. Kass & Steffey (1989). Approximate Bayesian inference in conditionally independent
   hierarchical models (parametric empirical Bayes models). JASA 84.
3. Hoffman & Gelman (2014). The No-U-Turn sampler. JMLR.
"""

from hierbayes.experiments.radon.command import (
    METHODS,
    add_parser,
    fit_empirical_bayes,
    format_report,
    run,
    run_radon,
)
from hierbayes.experiments.radon.config import HYPERPARAMETERS, WEIGHT_FEATURES, RadonConfig
from hierbayes.experiments.radon.figures import plot_forest
from hierbayes.experiments.radon.summaries import mixture_quantiles

__all__ = [
    "HYPERPARAMETERS",
    "METHODS",
    "WEIGHT_FEATURES",
    "RadonConfig",
    "add_parser",
    "fit_empirical_bayes",
    "format_report",
    "mixture_quantiles",
    "plot_forest",
    "run",
    "run_radon",
]
