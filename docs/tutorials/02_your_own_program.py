r"""
# Your own Pyro program: hierarchical logistic regression

A hierbayes model is an ordinary Pyro program. Here each task $j$ is a small binary
classification problem with weights $w_j \sim \mathcal N(\mu, I)$ around a global mean
$\mu \sim \mathcal N(0, 3^2 I)$, and labels
$y_{jn} \sim \operatorname{Bernoulli}(\sigma(w_{j0} x_{jn} + w_{j1}))$: a likelihood that is
not Gaussian, so no step of the analysis is exact. MAML point-estimates each $w_j$ by a
gradient step from $\mu$; LLAMA meta-trains $\mu$ on each task's Laplace evidence, evaluated
at the task's mode, with the curvature read off the program's own `Bernoulli` site.
"""

# %%
# ## The program
#
# The contract (see [the model contract](../../guide/model-contract.md)): the global latent
# `mu` outside every plate; one real-valued per-task latent inside `pyro.plate("tasks")`; the
# observations in a nested data plate. `model_structure` reads the program once and says what
# it found, or what is wrong.

import os

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch

import hierbayes
from hierbayes.models import model_structure
from hierbayes.tasks import TaskBatch

FAST = os.environ.get("HIERBAYES_DOCS_FAST", "1") != "0"
META_STEPS = 300 if FAST else 2000
print(f"mode: {'fast' if FAST else 'full'} ({META_STEPS} meta-steps)")
torch.set_default_dtype(torch.float64)


def model(x, y=None):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        w = pyro.sample("w", dist.Normal(mu, 1.0).to_event(1))  # (T, 1, 2)
        logits = w[..., 0] * x[..., 0] + w[..., 1]  # (T, N)
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def draw_tasks(num, support=10, query=20, seed=0):
    """Tasks drawn from the model itself, with mu = (1.5, -0.5)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.5, -0.5]) + torch.randn(num, 2, generator=g)

    def points(n):
        x = 2 * torch.randn(num, n, 1, generator=g)
        return x, torch.bernoulli(torch.sigmoid(w[:, :1] * x[..., 0] + w[:, 1:]), generator=g)

    (xs, ys), (xq, yq) = points(support), points(query)
    return TaskBatch(xs, ys, xq, yq)


train, test = draw_tasks(200, seed=0), draw_tasks(100, seed=1)
structure = model_structure(model, train.support_x, train.support_y)
print("global sites:", [site.name for site in structure.global_sites])
print("task site:", structure.task_site, "of shape", tuple(structure.task_event_shape))
print("observed sites:", structure.observed_sites)

# %%
# ## MAML and LLAMA on the same program
#
# The same keyword arguments train both. LLAMA's `objective="evidence"` moves each task's
# truncated-gradient estimate to its mode by damped Newton steps (`mode_steps`) before the
# Laplace evidence is evaluated there; `result.mode_report` says how far each task's search
# got at the last meta-step.

options = dict(meta_steps=META_STEPS, meta_batch_size=25, lr=0.05, step_size=0.1, progress=False)
maml = hierbayes.fit(model, train, "maml", **options)
llama = hierbayes.fit(
    model, train, "llama", objective="evidence", curvature="ggn", mode_steps=10, **options
)
for name, result in (("MAML", maml), ("LLAMA", llama)):
    metrics = result.evaluate(test).summary()
    mu = result.params["mu"].numpy().round(2)
    print(
        f"{name:5s} mu {mu}  query NLL {metrics['nll']['mean']:.3f} ± {metrics['nll']['ci95']:.3f}"
        f"  accuracy {metrics['accuracy']['mean']:.3f}"
    )
report = llama.mode_report
print(
    f"LLAMA's last mode search: {report.steps} Newton steps; {int(report.converged.sum())} of "
    f"{report.converged.numel()} tasks converged; largest Newton decrement "
    f"{float(report.decrement.max()):.1e} nats"
)

# %%
# ## Predictions with uncertainty
#
# `adapt` gives each test task a Laplace posterior $\mathcal N(\hat w_j, \hat H_j^{-1})$
# centred at its mode; `predict` mixes the program's own `Bernoulli` site over draws of
# $w_j$, as `pyro.infer.Predictive` does. The figure shows $P(y = 1 \mid x)$ for three test
# tasks: MAML's point estimate against LLAMA's posterior predictive with a 90% band of the
# probability over posterior draws.

three = draw_tasks(3, seed=5)
grid = torch.linspace(-5.0, 5.0, 120).reshape(1, -1, 1).expand(3, -1, -1)
maml_p = maml.adapt(three).predict(grid).mean
posterior = llama.adapt(three)
llama_p = posterior.predict(grid).mean
draws = posterior.sample(200, generator=torch.Generator().manual_seed(0))  # (S, T, D)
curves = torch.sigmoid(draws[..., :1] * grid[..., 0] + draws[..., 1:])  # (S, T, N)
low, high = curves.quantile(0.05, dim=0), curves.quantile(0.95, dim=0)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
for j, ax in enumerate(axes):
    x = grid[j, :, 0]
    ax.plot(x, maml_p[j].reshape(-1), label="MAML (point estimate)")
    ax.plot(x, llama_p[j].reshape(-1), label="LLAMA (posterior predictive)")
    ax.fill_between(x, low[j], high[j], color="tab:orange", alpha=0.2)
    ax.scatter(three.support_x[j, :, 0], three.support_y[j], color="black", zorder=3, s=15)
    ax.set_title(f"task {j}")
    ax.set_xlabel("x")
axes[0].set_ylabel("P(y = 1)")
axes[0].legend(loc="upper left", fontsize=8)
fig.tight_layout()

# %%
# ## Another likelihood
#
# Nothing above is specific to the Bernoulli site. Replace it with
# `dist.StudentT(4.0, mean, scale)` for regression robust to outliers, or `dist.Poisson` for
# counts: the `"ggn"` and `"diag"` curvatures read each observed distribution's exact Fisher
# information where the family has one (Normal, StudentT, Bernoulli, Categorical, Poisson,
# Binomial and a dozen more), and a Monte Carlo Fisher otherwise. What a model lacks for an
# objective is reported by `fit` before any training.
