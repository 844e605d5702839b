"""The figure of test episodes: support images, query images, each method's probabilities."""

from __future__ import annotations

import os
from pathlib import Path

from hierbayes.experiments.omniglot.evaluation import classify, load_run
from hierbayes.inference import FitResult
from hierbayes.tasks import TaskBatch

__all__ = ["plot_episodes"]


def plot_episodes(
    results: dict[str, FitResult | str | os.PathLike[str]],
    batch: TaskBatch,
    path: str | os.PathLike[str],
    *,
    episodes: int = 3,
    queries: int = 3,
    inner_steps: int | None = None,
) -> Path:
    """A figure of ``episodes`` test episodes: the support images (one per class, labelled),
    then ``queries`` query images, each beside every method's predicted class probabilities
    (the true class in green). ``results`` maps a method's name to a run or a saved file."""
    from hierbayes.experiments.plots import agg_figure

    runs = {name: r if isinstance(r, FitResult) else load_run(r) for name, r in results.items()}
    qx, qy, _ = batch.require_query("the figure")
    sub = batch.select(list(range(episodes)))
    ways = int(batch.support_y.max()) + 1
    shown_support = min(ways, 5)
    probs = {
        name: classify(r, sub.support_x, sub.support_y, qx[:episodes], inner_steps=inner_steps)
        for name, r in runs.items()
    }
    # one query per class, the first `queries` classes
    per_class = qx.shape[1] // ways
    picks = [c * per_class for c in range(min(queries, ways))]
    cols = shown_support + queries * (1 + len(runs))
    fig = agg_figure(1.15 * cols, 1.35 * episodes + 0.4)
    grid = fig.add_gridspec(episodes, cols, wspace=0.35, hspace=0.45)
    shots = sub.support_x.shape[1] // ways
    for e in range(episodes):
        for c in range(shown_support):
            ax = fig.add_subplot(grid[e, c])
            ax.imshow(sub.support_x[e, c * shots, 0].cpu().numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"class {c}", fontsize=7)
        col = shown_support
        for q in picks:
            ax = fig.add_subplot(grid[e, col])
            ax.imshow(qx[e, q, 0].cpu().numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"query (class {int(qy[e, q])})", fontsize=7)
            col += 1
            for name in runs:
                ax = fig.add_subplot(grid[e, col])
                p = probs[name][e, q].numpy()
                colors = ["tab:green" if k == int(qy[e, q]) else "tab:gray" for k in range(ways)]
                ax.bar(range(ways), p, color=colors)
                ax.set_ylim(0, 1)
                ax.set_xticks(range(0, ways, max(1, ways // 5)))
                ax.tick_params(labelsize=6)
                ax.set_title(name, fontsize=7)
                col += 1
    fig.suptitle(
        f"Held-out Omniglot episodes ({ways}-way {shots}-shot): support images (first "
        f"{shown_support} classes), query images and predicted class probabilities",
        fontsize=8,
    )
    target = Path(path)
    fig.savefig(target, dpi=110, bbox_inches="tight")
    return target
