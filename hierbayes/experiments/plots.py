"""Figures of the experiments (matplotlib, written as PNG; no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hierbayes.inference import FitResult, GaussianPrediction  # noqa: E402
from hierbayes.tasks import SinusoidTasks, TaskBatch  # noqa: E402

__all__ = ["plot_sinusoid_tasks"]


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
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= sub.num_tasks:
            ax.axis("off")
            continue
        ax.plot(grid, truth[i, :, 0], color="black", lw=1.5, label="true function")
        ax.plot(grid, before.mean[i, :, 0].cpu(), color="tab:gray", ls="--", lw=1.2, label="before adaptation (θ̂)")
        ax.plot(grid, after.mean[i, :, 0].cpu(), color="tab:red", lw=1.5, label=f"after {result.guide.inner_steps} step(s)")
        if isinstance(after, GaussianPrediction):
            lo, hi = after.interval(level)
            ax.fill_between(grid, lo[i, :, 0].cpu(), hi[i, :, 0].cpu(), color="tab:red", alpha=0.15, label=f"{level:.0%} predictive interval")
        ax.scatter(sub.support_x[i, :, 0], sub.support_y[i, :, 0], color="tab:blue", zorder=5, s=18, label="support points")
        amp = float(sub.info["amplitude"][i])
        ax.set_title(f"task {i}: amplitude {amp:.2f}", fontsize=10)
        ax.set_ylim(-6, 6)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title or f"{result.method}: {sub.support_x.shape[1]}-shot sinusoid, held-out tasks")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
