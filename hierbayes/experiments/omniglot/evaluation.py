"""Predictions, metrics (accuracy, NLL, expected calibration error) and the baselines."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hierbayes.experiments.omniglot.config import OmniglotConfig
from hierbayes.inference import FitResult
from hierbayes.inference.diagnostics import mean_ci95
from hierbayes.inference.posteriors.laplace import LaplacePosterior
from hierbayes.tasks import ImageDataset, TaskBatch

__all__ = [
    "classify",
    "evaluate_probs",
    "expected_calibration_error",
    "load_run",
    "pixel_nearest_neighbour",
    "pretrain_finetune",
]


def classify(
    result: FitResult | str | os.PathLike[str],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    *,
    inner_steps: int | None = None,
    samples: int = 30,
    seed: int = 0,
) -> Tensor:
    r"""Class probabilities of new episodes' query images from a trained (or saved) run.

    Parameters
    ----------
    result:
        A :class:`~hierbayes.inference.FitResult`, or the path of a saved run
        (``DIR/model.pt``), read with :func:`hierbayes.load`.
    support_x, support_y, query_x:
        ``(T, N, 1, 28, 28)`` support images in ``[0, 1]`` (ink 1, as
        :func:`~hierbayes.tasks.load_omniglot` gives them), ``(T, N)`` labels ``0..ways-1``,
        and ``(T, M, 1, 28, 28)`` query images.
    inner_steps:
        Inner steps of adaptation (default: the run's own).
    samples, seed:
        Draws of the Laplace predictive for a LLAMA run (ignored for MAML's point mass).

    Returns
    -------
    Tensor
        ``(T, M, ways)`` predicted class probabilities.
    """
    if not isinstance(result, FitResult):
        from hierbayes import load

        result = load(result)
    dtype = result.config.get("dtype") or torch.get_default_dtype()
    batch = TaskBatch(support_x.to(dtype), support_y.long())
    posterior = result.adapt(batch, inner_steps=inner_steps)
    xq = query_x.to(device=result.device, dtype=dtype)
    if isinstance(posterior, LaplacePosterior):
        generator = torch.Generator(device=result.device).manual_seed(seed)
        prediction = posterior.predict(
            xq, method="sampled", num_samples=samples, generator=generator
        )
    else:
        prediction = posterior.predict(xq)
    return prediction.mean.detach().to("cpu", torch.float64)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    r"""ECE :math:`\sum_b \frac{|B_b|}{n}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|` over
    ``bins`` equal-width bins of the top-class probability (Guo et al. 2017).
    ``probs`` ``(..., C)``, ``labels`` ``(...)``."""
    p = probs.reshape(-1, probs.shape[-1]).double()
    conf, pred = p.max(-1)
    correct = (pred == labels.reshape(-1)).double()
    which = torch.clamp((conf * bins).long(), max=bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct - conf)
    return float(gap.abs().sum() / p.shape[0])


def evaluate_probs(probs: Tensor, labels: Tensor) -> dict[str, Any]:
    """Accuracy and NLL per point (mean and 95% interval over episodes) and ECE, from
    ``probs`` ``(T, M, C)`` and ``labels`` ``(T, M)``."""
    p = probs.double()
    acc = (p.argmax(-1) == labels).double().mean(-1)
    nll = -torch.log(p.gather(-1, labels.unsqueeze(-1)).squeeze(-1).clamp_min(1e-300)).mean(-1)
    return {
        "accuracy": mean_ci95(acc),
        "nll": mean_ci95(nll),
        "ece": expected_calibration_error(p, labels),
    }


def predict_all(result: FitResult, batch: TaskBatch, cfg: OmniglotConfig) -> Tensor:
    qx, _, _ = batch.require_query("evaluation")
    parts = []
    for start in range(0, batch.num_tasks, cfg.eval_chunk):
        end = min(start + cfg.eval_chunk, batch.num_tasks)
        parts.append(
            classify(
                result,
                batch.support_x[start:end],
                batch.support_y[start:end],
                qx[start:end],
                inner_steps=cfg.eval_inner_steps,
                samples=cfg.predictive_samples,
                seed=start,
            )
        )
    return torch.cat(parts)


def pixel_nearest_neighbour(batch: TaskBatch) -> Tensor:
    """One-hot predictions of each query's nearest support image in pixels, ``(T, M, ways)``."""
    qx, _, _ = batch.require_query("the nearest-neighbour baseline")
    s = batch.support_x.flatten(2).double()
    q = qx.flatten(2).double()
    nearest = torch.cdist(q, s).argmin(-1)  # (T, M)
    labels = batch.support_y.gather(1, nearest)
    ways = int(batch.support_y.max()) + 1
    return F.one_hot(labels, ways).double()


def pretrain_finetune(
    train: ImageDataset, batch: TaskBatch, cfg: OmniglotConfig, net: nn.Sequential | None = None
) -> Tensor:
    r"""The pretrain + fine-tune baseline's probabilities ``(T, M, ways)``: the same network
    with a head over all training classes, trained by minibatch cross-entropy
    (:func:`~hierbayes.experiments.omniglot.pretrain.pretrain_network`; pass ``net`` to reuse
    one), then per episode a new linear head fitted on the support features
    (:func:`~hierbayes.experiments.omniglot.pretrain.finetune_head`)."""
    from hierbayes.experiments.omniglot.pretrain import finetune_head, pretrain_network

    return finetune_head(pretrain_network(train, cfg) if net is None else net, batch, cfg)


def load_run(path: str | os.PathLike[str]) -> FitResult:
    """A saved run from its file or its output folder (``DIR/model.pt``)."""
    from hierbayes import load

    p = Path(path)
    return load(p / "model.pt" if p.is_dir() else p)
