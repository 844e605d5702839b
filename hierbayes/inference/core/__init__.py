r"""The functional core: the mathematics as pure functions of explicit values.

Every front end (the Pyro guide and losses, ``fit``, the posteriors, the references) calls
these functions; each piece of mathematics has one home here:

* :mod:`~hierbayes.inference.core.joint`: the log joint, its exact batched Hessian, the Laplace
  evidence formula;
* :mod:`~hierbayes.inference.core.inner_loop`: truncated gradient ascent (MAML's inner loop);
* :mod:`~hierbayes.inference.core.mode`: the damped Newton mode search;
* :mod:`~hierbayes.inference.core.evidence`: the Laplace evidence after the search, and the
  exact Hessian as a curvature;
* :mod:`~hierbayes.inference.core.laplace`, :mod:`~hierbayes.inference.core.predictive`: the
  Laplace posterior's pieces and predictive;
* :mod:`~hierbayes.inference.core.losses`: the objectives' per-task losses.

(The modules are imported one by one: the curvature backends build on ``joint`` and the rest
build on the curvature backends.)
"""
