"""Hierarchical logistic regression as a plain Pyro program: MAML and LLAMA, then predictions.

Each task j has weights w_j ~ N(mu, 1) around a global mean mu ~ N(0, 3^2); its labels are
Bernoulli(sigmoid(w_j0 * x + w_j1)). MAML point-estimates each task's w_j by one gradient step
from mu; LLAMA meta-trains mu on the Laplace evidence of each task, evaluated at its mode, with
the GGN curvature read off the Bernoulli site. Both adapt to new tasks and predict their labels.

Run: ``.venv/bin/python examples/logistic_regression.py`` (about half a minute).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.inference import fit
from hierbayes.tasks import TaskBatch

torch.set_default_dtype(torch.float64)


def model(x: Tensor, y: Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        w = pyro.sample("w", dist.Normal(mu, 1.0).to_event(1))  # (T, 1, 2)
        logits = w[..., 0] * x[..., 0] + w[..., 1]  # (T, N)
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def tasks(num: int, support: int = 10, query: int = 20, seed: int = 0) -> TaskBatch:
    """Tasks drawn from the model with mu = (1.5, -0.5)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.5, -0.5]) + torch.randn(num, 2, generator=g)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = 2 * torch.randn(num, n, 1, generator=g)
        p = torch.sigmoid(w[:, :1] * x[..., 0] + w[:, 1:])
        return x, torch.bernoulli(p, generator=g)

    (xs, ys), (xq, yq) = draw(support), draw(query)
    return TaskBatch(xs, ys, xq, yq)


if __name__ == "__main__":
    train, test = tasks(200, seed=0), tasks(100, seed=1)
    options = dict(meta_steps=300, meta_batch_size=25, lr=0.05, step_size=0.1, progress=False)
    maml = fit(model, train, method="maml", **options)
    llama = fit(
        model,
        train,
        method="llama",
        objective="evidence",
        curvature="ggn",
        mode_steps=10,
        **options,
    )
    for name, result in (("maml", maml), ("llama", llama)):
        metrics = result.evaluate(test).summary()
        mu = result.params["mu"].numpy().round(2)
        print(
            f"{name:6s} mu {mu}  query NLL {metrics['nll']['mean']:.3f} ± {metrics['nll']['ci95']:.3f}"
            f"  accuracy {metrics['accuracy']['mean']:.3f}"
        )
    posterior = llama.adapt(test)  # a Laplace posterior centred at each task's mode
    prediction = posterior.predict(test.query_x)  # the Bernoulli site mixed over draws of w
    print("P(y = 1) for task 0's first query points:", prediction.mean[0, :5].numpy().round(2))
