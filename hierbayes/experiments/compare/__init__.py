r"""``python -m hierbayes compare``: every posterior approximation beside NUTS, in ArviZ.

Two problems, each meta-trained with MAML (:func:`~hierbayes.inference.training.fit`), then a few held-out
tasks adapted by every method with the same :math:`\hat\theta` (and noise scale):

* **linear**: Bayesian linear regression (:class:`~hierbayes.models.BayesianLinearRegression`,
  ``D = 4``), where the exact posterior :math:`\mathcal N(H^{-1}(X^\top y/\sigma^2 +
  \hat\theta/s^2),\, H^{-1})`, :math:`H = X^\top X/\sigma^2 + I/s^2`, joins as the row ``exact``;
* **sinusoid**: the 1-40-40-1 ReLU network of Finn et al. (2017) (``D = 1761``) on 10-shot
  sinusoid tasks, after a short MAML run.

Rows: ``maml`` (the point mass), ``laplace_<curvature>`` (see :func:`laplace_approximations`),
``meanfield_vi``, ``nuts_pyro``, ``nuts_numpyro`` (the reference) and, for the linear problem,
``exact``. :func:`~hierbayes.inference.diagnostics.compare.compare_approximations` scores them; ``DIR``
receives ``metrics.json``::

    {"linear":   {"approximations": {"maml": {...}, ...}, "reference": ..., ...},
     "sinusoid": {"approximations": {...}, ...},
     "settings": {...}}

with, per approximation, the table's columns, per-task values and the paths of its figures
(``<problem>_forest.png`` shared by all rows, ``<problem>_posterior_<name>.png``).

The sinusoid posterior is hard for NUTS (trees of 1023 leapfrog steps at every draw); on this
project's 2-core machine Pyro's sampler costs about 0.36 ms per gradient against about 45 µs
for NumPyro's (``benchmarks/bench_nuts.py``), so its row there is a shorter run
(``sinusoid_pyro_samples`` = 25 warm-up steps and draws, 2 chains, against NumPyro's 150 and 4
chains). Expect :math:`\hat R > 1.01` at these budgets: the output flags it
(``reference_flagged``, a warning), it is not hidden. On the linear problem both engines get
the same budget.

Modules: :mod:`~hierbayes.experiments.compare.settings` (the sizes of a run),
:mod:`~hierbayes.experiments.compare.problems` (the two problems and the exact linear
posterior), :mod:`~hierbayes.experiments.compare.approximations` (the shared rows and the
scoring of one problem), :mod:`~hierbayes.experiments.compare.command` (the command line).
"""

from hierbayes.experiments.compare.approximations import laplace_approximations
from hierbayes.experiments.compare.command import add_parser, run, run_compare
from hierbayes.experiments.compare.problems import exact_linear_posterior, linear_tasks
from hierbayes.experiments.compare.settings import HELDOUT_SEED, CompareSettings

__all__ = [
    "HELDOUT_SEED",
    "CompareSettings",
    "add_parser",
    "exact_linear_posterior",
    "laplace_approximations",
    "linear_tasks",
    "run",
    "run_compare",
]
