r"""
# Radon: counties as tasks, beside full-Bayes NUTS

Minnesota's radon survey (Gelman & Hill 2007; the posteriordb copy ships with hierbayes) holds
919 houses in 85 counties. Each county is a task with all its houses in the support set and no
query set; the contextual-effects model gives county $j$ an intercept
$\alpha_j \sim \mathcal N(\mu, \tau^2)$ and shares the slopes $w$ and the noise scale
$\sigma$:

$$\log \text{radon}_i \sim \mathcal N(\alpha_{j(i)} + w_1 \log u_{j(i)} + w_2\,
\text{floor}_i + w_3\, \overline{\text{floor}}_{j(i)},\ \sigma^2).$$

Three answers to "what is county $j$'s intercept?", each more Bayesian than the last:

1. **empirical Bayes**: maximise the marginal likelihood over $(\mu, \tau, w, \sigma)$
   (exact here: the groups are linear-Gaussian), then each county's posterior at that point;
2. **hyper-Laplace**: a Gaussian over the (unconstrained) hyperparameters from the curvature
   of the log marginal likelihood at its optimum, each county's posterior mixed over it;
3. **full Bayes**: NUTS over every latent at once, the gold standard.
"""

# %%
# ## Empirical Bayes
#
# On a finite set of query-less tasks, `fit` with the evidence objective runs full-batch
# L-BFGS and reports whether the gradient test passed.

import os
import time

import matplotlib.pyplot as plt
import torch

import hierbayes
from hierbayes.inference.posteriors import hyper_laplace
from hierbayes.inference.references import nuts_full_bayes
from hierbayes.models import ContextualEffects
from hierbayes.tasks import radon_tasks

FAST = os.environ.get("HIERBAYES_DOCS_FAST", "1") != "0"
NUTS = dict(num_warmup=100, num_samples=100, num_chains=2) if FAST else {}
HYPER = {} if FAST else dict(quadrature="draws", importance=True, num_nodes=2000)
print(f"mode: {'fast' if FAST else 'full'} (NUTS {NUTS or 'defaults: 4 chains of 500 + 500'})")

torch.set_default_dtype(torch.float64)
tasks = radon_tasks()
start = time.perf_counter()
result = hierbayes.fit(ContextualEffects(), tasks, "llama", objective="evidence", progress=False)
eb_time = time.perf_counter() - start
c = result.convergence
print(f"converged: {c.converged} ({c.reason}), {c.steps} L-BFGS iterations")
print({name: value.numpy().round(3).tolist() for name, value in result.params.items()})
counties = result.adapt(tasks.batch())  # N(mode, H^-1) for each county

# %%
# ## Hyperparameter uncertainty, then full Bayes
#
# `hyper_laplace` takes seconds with its default cubature nodes; the full mode uses 2,000
# importance-weighted draws, the configuration BENCHMARKS.md §10 measured against NUTS.
# `nuts_full_bayes` samples every latent; its $\hat R$ is reported over every county and
# global (the fast mode's few draws are not enough for $\hat R < 1.01$: read the fast mode's
# NUTS row as a rough reference).

start = time.perf_counter()
hyper = hyper_laplace(result, tasks, **HYPER)
hyper_time = time.perf_counter() - start
start = time.perf_counter()
reference = nuts_full_bayes(result.model, tasks, **NUTS)
nuts_time = time.perf_counter() - start
print(f"hyper-Laplace converged: {hyper.converged}")
print(f"NUTS: R-hat max {reference.rhat_max:.3f}, bulk ESS min {reference.ess_bulk_min:.0f}")
print(f"wall time: EB {eb_time:.1f} s, hyper-Laplace {hyper_time:.1f} s, NUTS {nuts_time:.1f} s")

# %%
# ## The forest plot
#
# Twelve counties, from the smallest (one or two houses: the prior dominates, and the
# uncertainty in $\tau$ matters most) to the largest. Each line is a county intercept's mean
# $\pm$ 1.645 sd (a 90% interval for a Gaussian). Empirical Bayes is overconfident where the
# data are few, since it takes $\tau$ as known; integrating over the hyperparameters widens
# those intervals towards full Bayes.

methods = {
    "empirical Bayes": (counties.mean[:, 0], counties.sd[:, 0]),
    "hyper-Laplace": (hyper.task_posteriors.mean[:, 0], hyper.task_posteriors.sd[:, 0]),
    "NUTS (full Bayes)": (reference.mean[:, 0], reference.sd[:, 0]),
}
order = torch.argsort(tasks.group_sizes)
chosen = order[torch.linspace(0, len(order) - 1, 12).round().long()]
fig, ax = plt.subplots(figsize=(7, 6))
for k, (name, (mean, sd)) in enumerate(methods.items()):
    rows = torch.arange(len(chosen)) + 0.25 * (k - 1)
    m, s = mean[chosen], sd[chosen]
    ax.errorbar(m, rows, xerr=1.645 * s, fmt="o", markersize=4, capsize=2, label=name)
labels = [f"{tasks.group_names[j]} ({int(tasks.group_sizes[j])})" for j in chosen]
ax.set_yticks(range(len(chosen)), labels)
ax.set_xlabel("county intercept alpha_j (log radon)")
ax.set_title("Radon: county intercepts, mean ± 1.645 sd (houses in brackets)")
ax.legend(loc="lower right", fontsize=8)
fig.tight_layout()

# %%
# ## How close to full Bayes
#
# The average absolute difference of the county means from NUTS's, and the average ratio of
# the standard deviations. In the full mode BENCHMARKS.md §10 records hyper-Laplace with
# importance-weighted draws within 0.006 (means) and 1.5% on average (sds) of NUTS in 3% of its
# time; the fast mode's short NUTS chains make this comparison noisy.

ref_mean, ref_sd = methods["NUTS (full Bayes)"]
for name in ("empirical Bayes", "hyper-Laplace"):
    mean, sd = methods[name]
    print(
        f"{name:16s} mean |Δmean| {float((mean - ref_mean).abs().mean()):.4f}   "
        f"mean sd ratio {float((sd / ref_sd).mean()):.3f}"
    )
