r"""The full-Bayes reference: NUTS over the globals and every task's latent together.

Empirical Bayes (and the NUTS references of :mod:`hierbayes.inference.references.nuts`) fix the
globals at :math:`\hat\theta`. :func:`nuts_full_bayes` samples the whole posterior of a
hierarchical model instead (Grant et al. 2018, eq. 2 with :math:`\theta` a latent):

.. math::

    p(\theta, \phi_{1:T} \mid \mathcal D) \;\propto\; p(\theta)\prod_j p(\phi_j\mid\theta)\,
        p(y^s_j\mid\phi_j, x^s_j),

with Pyro's ``NUTS`` on the potential :math:`U(u, \phi) = -\log p(T(u), \phi, \mathcal D) -
\log\lvert\det \partial T/\partial u\rvert` over the unconstrained globals :math:`u`
(:class:`~hierbayes.inference.posteriors.unconstrained.GlobalCoordinates`, the bijections Pyro's
own NUTS uses) and :math:`\phi`, read from the model's
:class:`~hierbayes.models.TaskDensity`: any Pyro program that follows the contract, each task
conditioned on its support set (a query-less task set, e.g. counties as tasks, is conditioned
on all its data), padded points of unequal tasks masked out. Chains run one after another from
dispersed starts (the globals' values in ``params`` or their prior means, each task at its prior
mean, plus :math:`U[-r, r]` noise in the unconstrained space).

The result, :class:`FullBayesPosterior`, is a
:class:`~hierbayes.inference.posteriors.samples.SamplePosterior` of :math:`\phi` (its marginal
draws, diagnostics and flagged tasks, as every NUTS reference) that also holds the draws of the
globals, their :math:`\hat R` and ESS, and predicts with the joint draws
(:func:`~hierbayes.inference.posteriors.joint.predict_from_joint_draws`): it is the gold-standard
row of :func:`~hierbayes.inference.diagnostics.compare_approximations` and converts to ArviZ with the globals
in the posterior group under their site names.

NumPyro: the JAX translation of :mod:`hierbayes.inference.references.jax_density` covers a ``TaskModel``'s
per-task density only (not its hyperprior), so the full-Bayes reference is Pyro's.

References
----------
1. Hoffman & Gelman (2014). The No-U-Turn sampler. JMLR.
2. Betancourt & Girolami (2015). Hamiltonian Monte Carlo for hierarchical models. In *Current
   Trends in Bayesian Methodology with Applications*.
3. Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021). Rank-normalization, folding, and
   localization: an improved R-hat. Bayesian Analysis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.core.joint import model_log_density
from hierbayes.inference.posteriors.joint import predict_from_joint_draws
from hierbayes.inference.posteriors.samples import (
    RHAT_THRESHOLD,
    SamplePosterior,
    _worst,
    thinning_index,
)
from hierbayes.inference.posteriors.unconstrained import GlobalCoordinates
from hierbayes.inference.predictions import Prediction
from hierbayes.inference.references.chains import check_counts, run_pyro_chain
from hierbayes.inference.references.target import resolve_density
from hierbayes.models.density import TaskDensity
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection
from hierbayes.tasks.source import as_batch

__all__ = ["FullBayesPosterior", "nuts_full_bayes"]

#: Joint draws a prediction mixes over by default (evenly spaced, shared by the chains).
PREDICT_DRAWS = 400


class FullBayesPosterior(SamplePosterior):
    r"""Joint NUTS draws of the globals and every task's :math:`\phi`.

    Parameters
    ----------
    density:
        The task density.
    fixed:
        Global values that were not sampled (``pyro.param`` sites).
    draws:
        ``(C, S, T, D)`` draws of :math:`\phi`.
    global_draws:
        Each global site's draws ``(C, S, *site_shape)``, constrained.
    kwargs:
        As :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` (``wall_time``,
        ``engine``, ``sampler_stats``, ``diagnostics``, ``settings``) and
        ``global_diagnostics``: per global site ``{"rhat", "ess_bulk", "ess_tail"}``, each a
        tensor of the site's shape.

    Notes
    -----
    ``params`` holds the globals' posterior means (over ``fixed``): what code that needs one
    value of the globals reads; :meth:`predict` and the ArviZ bridge use the joint draws.
    """

    def __init__(
        self,
        density: TaskDensity,
        fixed: Mapping[str, Tensor],
        draws: Tensor,
        global_draws: Mapping[str, Tensor],
        *,
        global_diagnostics: Mapping[str, Mapping[str, Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.fixed = {k: v.detach() for k, v in fixed.items()}
        self.global_draws = {k: v.detach() for k, v in global_draws.items()}
        means = {k: v.double().mean(dim=(0, 1)).to(v.dtype) for k, v in self.global_draws.items()}
        super().__init__(density, {**self.fixed, **means}, draws, **kwargs)
        self.global_diagnostics = {
            k: {name: torch.as_tensor(t) for name, t in v.items()}
            for k, v in (global_diagnostics or {}).items()
        }

    def with_diagnostics(self, diagnostics: Mapping[str, Tensor]) -> FullBayesPosterior:
        return FullBayesPosterior(
            self.density,
            self.fixed,
            self.draws,
            self.global_draws,
            global_diagnostics=self.global_diagnostics,
            wall_time=self.wall_time,
            engine=self.engine,
            sampler_stats=self.sampler_stats,
            diagnostics=diagnostics,
            rhat_threshold=self.rhat_threshold,
            settings=self.settings,
        )

    def joint_draws(
        self, num_chains: int, num_draws: int, *, seed: int = 0
    ) -> tuple[dict[str, Tensor], Tensor]:
        r"""The chains' own joint draws, each thinned to ``num_draws`` evenly spaced ones
        (``num_chains`` and ``seed`` are ignored: these are the sampler's chains)."""
        index = thinning_index(self.num_draws, num_draws, self.draws.device)
        globals_ = {k: v[:, index] for k, v in self.global_draws.items()}
        return globals_, self.draws[:, index]

    def predict(self, x: Tensor, *, num_samples: int | None = None, **kwargs: object) -> Prediction:
        r"""The mixture :math:`\frac1S\sum_s p(y\mid x, \phi^{(s)}_j, \theta^{(s)})` over
        ``num_samples`` (default 400) evenly spaced joint draws shared equally by the chains."""
        C = self.num_chains
        per_chain = max(1, math.ceil((num_samples or PREDICT_DRAWS) / C))
        globals_, phi = self.joint_draws(C, per_chain)
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in globals_.items()}
        return predict_from_joint_draws(
            self.density, self.fixed, flat, phi.reshape(-1, *phi.shape[2:]), x
        )

    @property
    def globals_flagged(self) -> list[str]:
        r"""Global sites whose largest :math:`\hat R` exceeds the threshold (or is NaN)."""
        found = []
        for name, diag in self.global_diagnostics.items():
            rhat = diag["rhat"]
            if bool(torch.isnan(rhat).any()) or float(rhat.max()) > self.rhat_threshold:
                found.append(name)
        return found

    @property
    def rhat_max(self) -> float:
        r"""The largest :math:`\hat R` over every task's :math:`\phi` and every global, a number
        (NaN when some chain is constant); per task in :attr:`rhat_max_per_task`, per global
        site in :attr:`global_diagnostics`."""
        values = [self.rhat_max_per_task.double().flatten()]
        values += [d["rhat"].double().flatten() for d in self.global_diagnostics.values()]
        return _worst(torch.cat(values))

    @property
    def ess_bulk_min(self) -> float:
        r"""The smallest bulk effective sample size over every task's :math:`\phi` and every
        global, a number; per task in :attr:`ess_bulk_min_per_task`."""
        values = [self.ess_bulk_min_per_task.double().flatten()]
        values += [d["ess_bulk"].double().flatten() for d in self.global_diagnostics.values()]
        return float(torch.cat(values).min())

    @property
    def converged(self) -> bool:
        """No task and no global site is flagged."""
        return not self.flagged and not self.globals_flagged

    def global_summary(self) -> dict[str, dict[str, Any]]:
        """Per global site: posterior mean, sd, median, 5% and 95% quantiles, R-hat, bulk ESS
        and the Monte Carlo standard error of the mean (sd / sqrt(ESS)), as plain lists."""
        out: dict[str, dict[str, Any]] = {}
        for name, value in self.global_draws.items():
            flat = value.double().reshape(-1, *value.shape[2:])
            sd = flat.std(0)
            entry: dict[str, Any] = {
                "mean": flat.mean(0).tolist(),
                "sd": sd.tolist(),
                "median": flat.median(0).values.tolist(),
                "q05": flat.quantile(0.05, dim=0).tolist(),
                "q95": flat.quantile(0.95, dim=0).tolist(),
            }
            diag = self.global_diagnostics.get(name)
            if diag is not None:
                ess = diag["ess_bulk"].double()
                entry["rhat"] = diag["rhat"].tolist()
                entry["ess_bulk"] = ess.tolist()
                entry["mcse_mean"] = (sd / ess.sqrt()).tolist()
            out[name] = entry
        return out

    def summary(self) -> dict[str, Any]:
        """As :meth:`SamplePosterior.summary`, with ``globals`` (:meth:`global_summary`),
        ``globals_flagged`` and ``divergences_total``: a divergent transition moves every task,
        so the per-task ``divergences`` each count all of them."""
        out = super().summary()
        out["divergences_total"] = int(self.sampler_stats["diverging"][..., 0].sum())
        out["globals"] = self.global_summary()
        out["globals_flagged"] = self.globals_flagged
        return out


def nuts_full_bayes(
    model_or_density: Any,
    tasks: TaskBatch | TaskCollection,
    *,
    params: Mapping[str, Tensor] | None = None,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    init_radius: float = 0.5,
    jit_compile: bool = False,
) -> FullBayesPosterior:
    r"""NUTS draws of :math:`p(\theta, \phi_{1:T}\mid\mathcal D^s)` by Pyro; see the module docstring.

    Parameters
    ----------
    model_or_density:
        Any hierbayes model (a Pyro program following the contract) or its
        :class:`~hierbayes.models.TaskDensity`.
    tasks:
        The tasks; their support sets ``(T, N, ...)`` and support mask are the data (a
        query-less task set holds all its data there). Query sets are not used.
    params:
        Starting values of the global sample sites (e.g. a fit's ``params``; default their
        prior means) and the values of any ``pyro.param`` site, which is held fixed.
    num_warmup, num_samples, num_chains:
        Adaptation steps, kept draws per chain, chains (>= 2 for a meaningful :math:`\hat R`).
    seed:
        Seeds the starting points and each chain; the global torch RNG is left as it was.
    target_accept_prob, max_tree_depth:
        NUTS' adaptation target and tree-depth limit.
    init_radius:
        Half-width of the uniform jitter added to the starts, in the unconstrained space.
    jit_compile:
        Pyro's ``torch.jit`` tracing of the potential's gradient.

    Returns
    -------
    :class:`FullBayesPosterior` with draws of :math:`\phi` ``(C, S, T, D)``, the globals' draws,
    divergences, wall time and :math:`\hat R`/ESS of every task parameter and global.
    """
    tasks = as_batch(tasks, "nuts_full_bayes")

    from hierbayes.inference.diagnostics.arviz_bridge import convergence_diagnostics

    check_counts(num_warmup, num_samples, num_chains)
    density = resolve_density(model_or_density, tasks)
    structure = density.structure
    given = {k: v.detach() for k, v in (params or {}).items()}
    missing = [name for name in structure.param_sites if name not in given]
    if missing:
        raise ValueError(
            f"the model's pyro.param site(s) {missing} need values: pass params= (e.g. a fit's "
            "params); full Bayes samples the global sample sites only"
        )
    start = {site.name: site.prior_mean.to(tasks.support_x) for site in structure.global_sites}
    start.update({k: v for k, v in given.items() if k in start})
    fixed = {k: v for k, v in given.items() if k not in start}
    coords = GlobalCoordinates(density, start)
    x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask
    T, C, S = tasks.num_tasks, num_chains, num_samples
    with torch.no_grad():
        u0 = coords.pack(start)
        phi0 = density.prior_mean({**fixed, **start}, x).detach().expand(T, -1)
    D = phi0.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    evaluations = [0]

    def potential(values: Mapping[str, Tensor]) -> Tensor:
        evaluations[0] += 1
        globals_, log_jacobian = coords.unpack(values["u"], fixed)
        return -(model_log_density(density, globals_, values["phi"], x, y, mask) + log_jacobian)

    u_draws = u0.new_empty((C, S, coords.size))
    phi_draws = phi0.new_empty((C, S, T, D))
    diverging = torch.zeros((C, S), dtype=torch.bool)
    seeds = torch.randint(2**62, (C,), generator=torch.Generator().manual_seed(seed + 1))
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        for c in range(C):
            jitter_u = 2 * torch.rand(u0.shape, generator=generator, dtype=u0.dtype) - 1
            jitter_phi = 2 * torch.rand(phi0.shape, generator=generator, dtype=phi0.dtype) - 1
            torch.manual_seed(int(seeds[c]))
            samples, divergent = run_pyro_chain(
                potential,
                {
                    "u": u0 + init_radius * jitter_u.to(u0),
                    "phi": phi0 + init_radius * jitter_phi.to(phi0),
                },
                num_samples=S,
                num_warmup=num_warmup,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                jit_compile=jit_compile,
            )
            u_draws[c] = samples["u"].reshape(S, coords.size)
            phi_draws[c] = samples["phi"].reshape(S, T, D)
            diverging[c, divergent] = True
    wall = time.perf_counter() - started
    with torch.no_grad():
        constrained, _ = coords.unpack(u_draws)
    global_draws = {name: constrained[name] for name in coords.names}
    global_diagnostics = {}
    for name, value in global_draws.items():
        flat = value.reshape(C, S, 1, -1)
        found = convergence_diagnostics(flat)
        global_diagnostics[name] = {k: v.reshape(value.shape[2:]) for k, v in found.items()}
    return FullBayesPosterior(
        density,
        fixed,
        phi_draws,
        global_draws,
        global_diagnostics=global_diagnostics,
        wall_time=wall,
        engine="pyro-full-bayes",
        sampler_stats={"diverging": diverging.unsqueeze(-1).expand(C, S, T).clone()},
        diagnostics=convergence_diagnostics(phi_draws),
        rhat_threshold=RHAT_THRESHOLD,
        settings=dict(
            num_warmup=num_warmup,
            num_samples=S,
            num_chains=C,
            seed=seed,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            init_radius=init_radius,
            jit_compile=jit_compile,
            torch_threads=torch.get_num_threads(),
            potential_evaluations=evaluations[0],
            globals=coords.names,
        ),
    )
