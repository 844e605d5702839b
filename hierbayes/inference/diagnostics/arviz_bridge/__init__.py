r"""The ArviZ bridge: task posteriors as ``arviz.InferenceData``, diagnostics, ELPD, figures.

This package is the one place in hierbayes that imports ArviZ: the rest of hierbayes reaches
ArviZ through it, and only when a function of it is called.

:func:`to_inference_data` turns any :class:`~hierbayes.inference.posteriors.TaskPosterior` (a MAML point
mass, a Laplace or mean-field Gaussian, NUTS draws) and a batch of held-out tasks into an
``InferenceData`` with the groups

**Groups as tasks.** Tasks without a query set (counties as tasks, all their data in the
support set) are scored *in sample* on their support sets: the pointwise log likelihood goes
to ArviZ's own ``log_likelihood`` group, where ``az.loo`` is legitimate (the posterior saw those
points; PSIS-LOO estimates out-of-sample fit from them), and :func:`compare_loo` ranks
approximations by it. Sets of unequal sizes (a mask with ``False`` entries: radon counties hold
1 to 116 houses) are laid out along one flattened ``observation`` dimension of the real points,
with the coordinates ``observation_task`` and ``observation_point``; sets of equal size keep
``(task, point)``. A posterior that integrates over the globals (full-Bayes NUTS, the
hyper-Laplace mixture) adds its global sites' draws to ``posterior`` under their site names
(dims ``<site>_dim_i``) and scores each draw with its own globals.

Variables are named after the model's own sites: the per-task site (``phi`` for a ``TaskModel``,
``w`` for a program that samples ``pyro.sample("w", ...)``) and the observed site (``y``):

* ``posterior``: the per-task site (chain, draw, task, parameter), the draws
  :math:`\phi^{(c,s)}_j`;
* ``posterior_predictive``: the observed site (chain, draw, task, point[, output]), draws
  :math:`y \sim p(y\mid\phi^{(c,s)}_j, x^q_{jm})` at the query inputs;
* ``heldout_log_likelihood``: the observed site (chain, draw, task, point),
  :math:`\log p(y^q_{jm}\mid\phi^{(c,s)}_j)` per held-out query point;
* ``observed_data``: the observed site (task, point[, output]), the query targets;
* ``constant_data``: ``x`` (task, point[, input]), the query inputs, and the global values the
  posterior was computed with: ``theta`` (parameter) and the others (``noise_scale``, ...)
  under their site names. This is where :math:`\hat\theta` is recorded;
* ``sample_stats`` (NUTS only): ``diverging`` (chain, draw, task).

Coordinates: ``task`` holds the batch's ``task_ids`` (else ``0..T-1``); ``parameter`` holds, for
a network model, names built from the network's
:class:`~hierbayes.models.network.ParameterLayout` (the module's parameter name and a row-major
index, e.g. ``"0.weight[3,0]"``, ``"2.bias[7]"``), and the integers ``0..D-1`` for any other
model; ``point`` is ``0..M-1``. A target with one output per point is stored without the
``output`` dimension. Non-MCMC posteriors get ``num_chains`` "chains" of independent draws, so
ArviZ's functions apply unchanged. :func:`posterior_variable` and :func:`observed_variable`
name the variables of an ``InferenceData`` (recorded in the attributes ``task_site`` and
``observed_site``).

**Held-out, not in-sample.** The query points never entered the posterior, so their pointwise
log likelihood is kept in ``heldout_log_likelihood``, not in ArviZ's ``log_likelihood`` group:
``az.loo`` and ``az.waic`` estimate out-of-sample fit from *in-sample* points, and fed held-out
ones they would silently report a meaningless PSIS-LOO (``az.loo`` on this ``InferenceData``
refuses: it finds no log likelihood). The held-out ELPD is the plain Monte-Carlo log predictive
density, which :func:`compare_elpd` hands to ``az.compare``.

Modules: :mod:`~hierbayes.inference.diagnostics.arviz_bridge.inference_data`
(:func:`to_inference_data`, :func:`parameter_names`),
:mod:`~hierbayes.inference.diagnostics.arviz_bridge.diagnostics`
(:func:`convergence_diagnostics`), :mod:`~hierbayes.inference.diagnostics.arviz_bridge.elpd`
(:func:`heldout_pointwise`, :func:`compare_elpd`) and
:mod:`~hierbayes.inference.diagnostics.arviz_bridge.figures` (:func:`plot_forest`,
:func:`plot_posterior`).

References
----------
1. Kumar, Carroll, Hartikainen & Martin (2019). ArviZ a unified library for exploratory
   analysis of Bayesian models in Python. JOSS.
2. Vehtari, Gelman & Gabry (2017). Practical Bayesian model evaluation using leave-one-out
   cross-validation and WAIC. Statistics and Computing.
3. Yao, Vehtari, Simpson & Gelman (2018). Using stacking to average Bayesian predictive
   distributions. Bayesian Analysis.
4. Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021). Rank-normalization, folding, and
   localization: an improved R-hat. Bayesian Analysis.
"""

from hierbayes.inference.diagnostics.arviz_bridge.diagnostics import convergence_diagnostics
from hierbayes.inference.diagnostics.arviz_bridge.elpd import (
    compare_elpd,
    compare_loo,
    heldout_pointwise,
)
from hierbayes.inference.diagnostics.arviz_bridge.figures import (
    default_parameters,
    plot_forest,
    plot_posterior,
)
from hierbayes.inference.diagnostics.arviz_bridge.inference_data import (
    observed_variable,
    parameter_coords,
    parameter_names,
    posterior_variable,
    to_inference_data,
)

__all__ = [
    "compare_elpd",
    "compare_loo",
    "convergence_diagnostics",
    "default_parameters",
    "heldout_pointwise",
    "observed_variable",
    "parameter_coords",
    "parameter_names",
    "plot_forest",
    "plot_posterior",
    "posterior_variable",
    "to_inference_data",
]
