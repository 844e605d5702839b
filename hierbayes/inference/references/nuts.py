r"""Reference task posteriors by the No-U-Turn sampler, through Pyro and through NumPyro.

Both functions sample, for each held-out task :math:`j` separately, the posterior of its
parameters given its support set and the meta-learned globals :math:`\hat\theta` (and noise
scale, prior scale, ...):

.. math::

    p(\phi_j \mid x^s_j, y^s_j, \hat\theta) \;\propto\;
        p(y^s_j \mid \phi_j, x^s_j)\; p(\phi_j \mid \hat\theta),

the exact posterior that MAML's point mass, the Laplace Gaussians and mean-field VI
approximate (Grant et al. 2018, §3). The potential energy is
:math:`U(\phi) = -\log p(y^s_j\mid\phi, x^s_j) - \log p(\phi\mid\hat\theta)`, read from the
model's :class:`~hierbayes.models.TaskDensity` (Pyro) or from its JAX translation
(:func:`~hierbayes.inference.references.jax_density.jax_log_density`, NumPyro).

* :func:`nuts_pyro` runs ``pyro.infer.MCMC(NUTS(potential_fn=U))`` for **any** hierbayes model,
  one chain after another (a task's chains are independent runs from dispersed starts).
* :func:`nuts_numpyro` runs NumPyro's NUTS kernel (``numpyro.infer.hmc.hmc``) on the JAX log
  density of a built-in :class:`~hierbayes.models.TaskModel`, compiled once with ``jax.jit``
  and vectorised over chains with ``jax.vmap`` (and over tasks with ``vectorize_tasks``).

Both use the same defaults as the libraries' own NUTS: windowed adaptation of the step size
(dual averaging to ``target_accept_prob``) and of a diagonal mass matrix during
``num_warmup`` steps, trees of depth at most ``max_tree_depth``. Chains start at
:math:`\phi^{(0)} = \hat\theta + u`, :math:`u \sim U[-r, r]^D` (``init_radius`` :math:`r`), the
same starts for both engines for a given ``seed`` (:func:`initial_points`). The result is a
:class:`~hierbayes.inference.posteriors.samples.SamplePosterior` with its convergence
diagnostics, whose rank-normalised :math:`\hat R` flags tasks above 1.01 (never silently used
as a reference: see :func:`hierbayes.inference.diagnostics.compare.compare_approximations`).

The engines live in :mod:`~hierbayes.inference.references.nuts_pyro` and
:mod:`~hierbayes.inference.references.nuts_numpyro`, what they share in
:mod:`~hierbayes.inference.references.chains`.

References
----------
1. Hoffman & Gelman (2014). The No-U-Turn sampler: adaptively setting path lengths in
   Hamiltonian Monte Carlo. JMLR 15.
2. Bingham et al. (2019). Pyro: deep universal probabilistic programming. JMLR 20.
3. Phan, Pradhan & Jankowiak (2019). Composable effects for flexible and accelerated
   probabilistic programming in NumPyro. arXiv:1912.11554.
4. Grant, Finn, Levine, Darrell & Griffiths (2018). Recasting gradient-based meta-learning as
   hierarchical Bayes. ICLR.
"""

from __future__ import annotations

from hierbayes.inference.references.chains import initial_points
from hierbayes.inference.references.nuts_numpyro import nuts_numpyro
from hierbayes.inference.references.nuts_pyro import nuts_pyro

__all__ = ["initial_points", "nuts_numpyro", "nuts_pyro"]
