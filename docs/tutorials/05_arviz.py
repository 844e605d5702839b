r"""
# Comparing posteriors in ArviZ

Every task posterior hierbayes returns (MAML's point mass, a Laplace Gaussian, NUTS draws, a
mixture over hyperparameters) becomes an `arviz.InferenceData`, so ArviZ's summaries, plots and
model comparison apply. Here: a linear regression per task, as a plain Pyro program, where the
Laplace posterior at the task's mode is exact, against Pyro's NUTS at the same fitted globals.
"""

# %%
# ## A model and its tasks
#
# Each task draws its weights $\phi_j \sim \mathcal N(\theta, I)$ and observes
# $y = \phi_{j0} x + \phi_{j1} + \varepsilon$, $\varepsilon \sim \mathcal N(0, 0.5^2)$.

import os

import arviz as az
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch

import hierbayes
from hierbayes.inference import OptimConfig
from hierbayes.inference.diagnostics import compare_approximations, to_inference_data
from hierbayes.inference.references import nuts_pyro
from hierbayes.tasks import TaskBatch

FAST = os.environ.get("HIERBAYES_DOCS_FAST", "1") != "0"
NUTS = dict(num_warmup=200, num_samples=200, num_chains=2) if FAST else {}
print(f"mode: {'fast' if FAST else 'full'} (NUTS {NUTS or 'defaults: 4 chains of 500 + 500'})")
torch.set_default_dtype(torch.float64)


def model(x, y=None):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def linear_tasks(num, support=5, query=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.tensor([1.0, -2.0]) + torch.randn(num, 2, generator=g)

    def points(n):
        x = torch.randn(num, n, 1, generator=g)
        y = x * phi[:, None, :1] + phi[:, None, 1:] + 0.5 * torch.randn(num, n, 1, generator=g)
        return x, y

    (xs, ys), (xq, yq) = points(support), points(query)
    return TaskBatch(xs, ys, xq, yq)


train, heldout = linear_tasks(100, seed=0), linear_tasks(4, seed=1)

# %%
# ## Three approximations of the held-out tasks' posteriors
#
# MAML's adapted weights (a point mass), LLAMA's Laplace posterior at each task's mode, and
# NUTS at the same fitted globals, the reference.

maml = hierbayes.fit(model, train, "maml", meta_steps=500, lr=0.05, step_size=0.05, progress=False)
llama = hierbayes.fit(  # the evidence of the support sets, maximised by full-batch L-BFGS
    model,
    train,
    "llama",
    objective="evidence",
    optim=OptimConfig(algorithm="lbfgs"),
    progress=False,
)
print("LLAMA:", llama.convergence.reason, "; theta", llama.params["theta"].numpy().round(3))
reference = nuts_pyro(model, llama.params, heldout, **NUTS)
approximations = {
    "maml": maml.adapt(heldout),
    "laplace": llama.adapt(heldout),
    "nuts_pyro": reference,
}
table = compare_approximations(approximations, heldout, reference="nuts_pyro")
print(table.format())

# %%
# The table scores each approximation on the held-out query points (log predictive density
# per point, ArviZ's ELPD comparison, interval coverage) and against the reference (mean error
# in posterior sds, the 2-Wasserstein distance). A reference whose $\hat R$ exceeds 1.01 is
# flagged, never used silently: in the fast mode NUTS's short chains often are.

# %%
# ## InferenceData
#
# `to_inference_data` names the variables after the model's sites: the posterior group holds
# `phi`, the observed data `y`, and the held-out pointwise log likelihood is kept in its own
# group (out of `log_likelihood`, where `az.loo` would take it for in-sample points).

idatas = {name: to_inference_data(post, heldout) for name, post in approximations.items()}
print(idatas["laplace"])
print(az.summary(idatas["nuts_pyro"], var_names=["phi"], kind="stats").head(4))

# %%
# ## A forest plot of the three
#
# ArviZ's own forest plot, one row per task and weight. The Laplace intervals lie on NUTS's
# (the posterior is Gaussian here); MAML's point mass has no width and, with one gradient step
# from $\theta$, sits between the prior mean and the task's mode.

axes = az.plot_forest(
    list(idatas.values()),
    model_names=list(idatas),
    var_names=["phi"],
    combined=True,
    hdi_prob=0.9,
    figsize=(7, 6),
)
axes[0].set_title("phi of four held-out tasks: 90% HDI")
plt.tight_layout()
