r"""Reference posteriors to compare the fast approximations against.

* :func:`nuts_pyro` (any Pyro program) and :func:`nuts_numpyro` (the built-in network models,
  through JAX; the optional extra ``hierbayes[jax]``): NUTS per task with the globals fixed;
* :func:`nuts_full_bayes`: NUTS over the globals and every task's :math:`\phi` together
  (:class:`FullBayesPosterior`), the gold standard for groups as tasks;
* :func:`meanfield_vi`: mean-field Gaussian VI per task (:class:`MeanFieldPosterior`).
"""

from hierbayes.inference.references.full_bayes import FullBayesPosterior, nuts_full_bayes
from hierbayes.inference.references.meanfield import MeanFieldPosterior, meanfield_vi
from hierbayes.inference.references.nuts import nuts_numpyro, nuts_pyro

__all__ = [
    "FullBayesPosterior",
    "MeanFieldPosterior",
    "meanfield_vi",
    "nuts_full_bayes",
    "nuts_numpyro",
    "nuts_pyro",
]
