"""Figures of the sinusoid experiment, and the canvas every experiment draws on.

Every figure is a :class:`matplotlib.figure.Figure` on its own Agg canvas (:func:`agg_figure`),
written as PNG: no pyplot, no display, and the user's matplotlib backend is never changed, on
import or when drawing. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hierbayes.inference import FitResult
from hierbayes.inference.posteriors import GaussianPrediction, LaplacePosterior
from hierbayes.models.density import NetworkDensity
from hierbayes.tasks import SinusoidTasks, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["agg_figure", "plot_ambiguous_tasks", "plot_sinusoid_tasks"]


def agg_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas, outside pyplot.

    Nothing global changes (no backend selection, no pyplot figure registry, nothing to close);
    ``fig.savefig`` renders with Agg whatever backend the user has selected.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_sinusoid_tasks(
    result: FitResult,
    tasks: TaskBatch,
    path: str | Path,
    *,
    num_tasks: int = 4,
    level: float = 0.9,
    title: str | None = None,
) -> Path:
    """True curve, support points, and the prediction before and after adaptation.

    Where the adapted predictive is Gaussian its central ``level`` interval is shaded.
    """
    sub = tasks.select(slice(0, num_tasks))
    grid = torch.linspace(-5, 5, 200, dtype=sub.support_x.dtype)
    x = grid.reshape(1, -1, 1).expand(sub.num_tasks, -1, -1)
    truth = SinusoidTasks.function(x, sub.info["amplitude"], sub.info["phase"])
    before = result.adapt(sub, inner_steps=0).predict(x.to(result.device))
    after = result.adapt(sub).predict(x.to(result.device))
    cols = min(num_tasks, 4)
    rows = (num_tasks + cols - 1) // cols
    fig = agg_figure(4 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= sub.num_tasks:
            ax.axis("off")
            continue
        ax.plot(grid, truth[i, :, 0], color="black", lw=1.5, label="true function")
        ax.plot(
            grid,
            before.mean[i, :, 0].cpu(),
            color="tab:gray",
            ls="--",
            lw=1.2,
            label="before adaptation (θ̂)",
        )
        ax.plot(
            grid,
            after.mean[i, :, 0].cpu(),
            color="tab:red",
            lw=1.5,
            label=f"after {result.guide.inner_steps} step(s)",
        )
        if isinstance(after, GaussianPrediction):
            lo, hi = after.interval(level)
            ax.fill_between(
                grid,
                lo[i, :, 0].cpu(),
                hi[i, :, 0].cpu(),
                color="tab:red",
                alpha=0.15,
                label=f"{level:.0%} predictive interval",
            )
        ax.scatter(
            sub.support_x[i, :, 0],
            sub.support_y[i, :, 0],
            color="tab:blue",
            zorder=5,
            s=18,
            label="support points",
        )
        amp = float(sub.info["amplitude"][i])
        ax.set_title(f"task {i}: amplitude {amp:.2f}", fontsize=10)
        ax.set_ylim(-6, 6)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        title or f"{result.method}: {sub.support_x.shape[1]}-shot sinusoid, held-out tasks"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def plot_ambiguous_tasks(
    result: FitResult,
    maml: FitResult | None,
    path: str | Path,
    *,
    shots: tuple[int, ...] = (2, 3, 4, 5),
    num_samples: int = 12,
    level: float = 0.9,
    seed: int = 0,
) -> Path:
    """Held-out tasks with only 2 to 5 support points: the Laplace predictive band and sampled
    functions around the true curve, next to MAML's single adapted curve (Grant et al. 2018,
    Figure 2 in spirit).

    Functions sampled from the posterior are drawn where it is a
    :class:`~hierbayes.inference.posteriors.LaplacePosterior` over a network
    (:class:`~hierbayes.models.density.NetworkDensity`).
    """
    generator = torch.Generator().manual_seed(20180430 + seed)
    fig = agg_figure(4 * len(shots), 3.4)
    axes = fig.subplots(1, len(shots), squeeze=False)
    grid = torch.linspace(-5, 5, 200, dtype=torch.get_default_dtype())
    for ax, k in zip(axes.flat, shots, strict=True):
        task = SinusoidTasks(shots=k, query_shots=1).sample(1, generator=generator)
        x = grid.reshape(1, -1, 1)
        truth = SinusoidTasks.function(x, task.info["amplitude"], task.info["phase"])
        posterior = result.adapt(task)
        prediction = posterior.predict(x.to(result.device))
        ax.plot(grid, truth[0, :, 0], color="black", lw=1.5, label="true function")
        if isinstance(prediction, GaussianPrediction):
            lo, hi = prediction.interval(level)
            ax.fill_between(
                grid,
                lo[0, :, 0].cpu(),
                hi[0, :, 0].cpu(),
                color="tab:red",
                alpha=0.15,
                label=f"{result.method} {level:.0%} predictive",
            )
        ax.plot(
            grid,
            prediction.mean[0, :, 0].cpu(),
            color="tab:red",
            lw=1.5,
            label=f"{result.method} mean",
        )
        if isinstance(posterior, LaplacePosterior) and isinstance(
            posterior.density, NetworkDensity
        ):
            draws = posterior.sample(num_samples, generator=torch.Generator().manual_seed(seed + k))
            with torch.no_grad():
                f = posterior.density.outputs(
                    posterior.params, draws[:, 0], x.expand(num_samples, -1, -1).to(result.device)
                )
            for s in range(num_samples):
                ax.plot(
                    grid,
                    f[s, :, 0].cpu(),
                    color="tab:red",
                    lw=0.6,
                    alpha=0.35,
                    label="posterior samples" if s == 0 else None,
                )
        if maml is not None:
            maml_pred = maml.adapt(task).predict(x.to(maml.device))
            ax.plot(
                grid,
                maml_pred.mean[0, :, 0].cpu(),
                color="tab:blue",
                lw=1.5,
                ls="--",
                label="MAML (one curve)",
            )
        ax.scatter(
            task.support_x[0, :, 0],
            task.support_y[0, :, 0],
            color="black",
            zorder=5,
            s=22,
            label="support points",
        )
        ax.set_title(
            f"{k} support points, amplitude {float(task.info['amplitude'][0]):.2f}", fontsize=10
        )
        ax.set_ylim(-7, 7)
        if k == shots[0]:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("ambiguous tasks: Laplace posterior predictive vs MAML's point estimate")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
