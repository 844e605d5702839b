"""Meta-training and evaluating one Omniglot run."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from hierbayes.experiments.omniglot.config import (
    OmniglotConfig,
    ShiftedEpisodes,
    test_episodes,
)
from hierbayes.experiments.omniglot.evaluation import (
    evaluate_probs,
    load_run,
    pixel_nearest_neighbour,
    predict_all,
    pretrain_finetune,
)
from hierbayes.experiments.omniglot.pretrain import pretrain_network, pretrained_theta
from hierbayes.inference import FitResult, fit
from hierbayes.inference.curvature.fisher import sampled_fisher_diagonal
from hierbayes.models import ConvClassifier
from hierbayes.tasks import ImageDataset, TaskBatch, load_omniglot

__all__ = ["choose_prior_scale", "format_report", "laplace_scores", "run_omniglot"]


def choose_prior_scale(
    start: FitResult, train: ImageDataset, cfg: OmniglotConfig
) -> tuple[float, dict[str, float]]:
    r"""The prior scale :math:`s` of :math:`\phi_j\sim\mathcal N(\theta, s^2I)` (the Laplace
    posterior's prior precision :math:`1/s^2`) with the lowest query NLL of the sampled Laplace
    predictive on ``prior_scale_episodes`` episodes of the *training* classes, at ``start``'s
    :math:`\theta` (a type-II choice on training tasks; test episodes are never seen). The
    inner loop steps on the likelihood, so :math:`s` changes only the posterior's spread."""
    sampler = train.episodes(ways=cfg.ways, shots=cfg.shots, query_shots=cfg.eval_query_shots)
    batch = sampler.sample(cfg.prior_scale_episodes, generator=torch.Generator().manual_seed(1))
    scored = laplace_scores(start, batch, cfg, cfg.prior_scale_grid)
    scores = {k: v["nll"]["mean"] for k, v in scored.items()}  # "point": the point mass's NLL
    best = min((k for k in scores if k != "point"), key=lambda k: scores[k])
    return float(best), scores


def laplace_scores(
    start: FitResult, batch: TaskBatch, cfg: OmniglotConfig, scales: Sequence[float]
) -> dict[str, dict[str, Any]]:
    r"""Accuracy, NLL and ECE (:func:`evaluate_probs`) of the sampled Laplace predictive
    :math:`\mathcal N(\hat\phi_j, (\hat F_j + s^{-2} I)^{-1})` on ``batch``'s queries for each
    prior scale :math:`s` in ``scales`` (``cfg.predictive_samples`` draws; :math:`\hat F_j` the
    sampled diagonal Fisher of the support set at ``start``'s :math:`\hat\phi_j` after
    ``cfg.eval_inner_steps`` steps), keyed by ``f"{s:g}"``; ``"point"`` is the point mass."""
    from hierbayes.inference.posteriors.laplace import laplace_posterior

    qx, qy, _ = batch.require_query("the Laplace predictive")
    model = start.model
    original = model.prior_scale_init
    dtype = start.config.get("dtype") or torch.float32
    phis = []
    for a in range(0, batch.num_tasks, cfg.eval_chunk):
        sub = TaskBatch(
            batch.support_x[a : a + cfg.eval_chunk], batch.support_y[a : a + cfg.eval_chunk]
        )
        phis.append(start.adapt(sub, inner_steps=cfg.eval_inner_steps).mean.detach())
    phi = torch.cat(phis)
    scores: dict[str, dict[str, Any]] = {}
    try:
        for s in (None, *scales):
            model.prior_scale_init = float(s) if s is not None else original
            probs = []
            for a in range(0, batch.num_tasks, cfg.eval_chunk):
                b = slice(a, a + cfg.eval_chunk)
                xq = qx[b].to(dtype)
                if s is None:
                    out = start.guide.density.predictive(start.params, phi[b], xq)
                    probs.append(cast(Categorical, out).probs.detach().double())
                    continue
                post = laplace_posterior(
                    start.guide.density,
                    start.params,
                    phi[b],
                    batch.support_x[b].to(dtype),
                    batch.support_y[b],
                    curvature=sampled_fisher_diagonal,
                )
                g = torch.Generator().manual_seed(a)
                pred = post.predict(
                    xq, method="sampled", num_samples=cfg.predictive_samples, generator=g
                )
                probs.append(pred.mean.detach().double())
            key = "point" if s is None else f"{s:g}"
            scores[key] = evaluate_probs(torch.cat(probs), qy.long())
    finally:
        model.prior_scale_init = original
    return scores


def _fit(
    cfg: OmniglotConfig, train: ImageDataset, pretrained: nn.Sequential | None = None
) -> tuple[FitResult, dict[str, Any]]:
    r"""Meta-train, from the convolution weights of ``pretrained`` when given
    (``init="pretrained"``). MAML: ``meta_steps`` steps of MAML's loss. LLAMA: the first
    ``meta_steps - llama_steps`` steps with MAML's loss (the paper's loss without its
    :math:`\eta\log\det\hat H` term, :math:`\eta = 10^{-6}`), then ``llama_steps`` of the
    paper's loss from there (``llama_batch_size`` tasks a step; its curvature costs ~8 x a MAML
    step on this network), so the final run is a LLAMA run whose ``adapt`` gives the Laplace
    task posterior. ``llama_steps >= meta_steps`` trains with the paper's loss throughout."""
    sampler = train.episodes(ways=cfg.ways, shots=cfg.shots, query_shots=cfg.query_shots)
    source = ShiftedEpisodes(sampler, cfg.max_shift)
    wd = cfg.weight_decay
    common: dict[str, Any] = dict(
        inner_steps=cfg.inner_steps,
        learn_step_size=cfg.learn_step_size,
        inner_loss="mean",
        first_order=cfg.first_order,
        lr=cfg.lr,
        optimizer=(lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=wd)) if wd else None,
        device=cfg.device,
        dtype=torch.float32,
        progress=cfg.progress,
    )

    def new_model(prior_scale: float = 1.0) -> ConvClassifier:
        model = ConvClassifier(cfg.ways, prior_scale=prior_scale)
        if pretrained is not None:
            with torch.no_grad():
                model.theta_init.copy_(pretrained_theta(model, pretrained))
        return model

    model = new_model()
    if cfg.method != "llama":
        result = fit(
            model,
            source,
            method=cfg.method,
            step_size=cfg.step_size,
            meta_steps=cfg.meta_steps,
            meta_batch_size=cfg.meta_batch_size,
            seed=cfg.seed,
            check_every=max(cfg.meta_steps, 1),
            **common,
        )
        return result, {}
    warm = max(cfg.meta_steps - cfg.llama_steps, 0)
    llama_steps = cfg.meta_steps - warm
    start: FitResult | None = None
    if cfg.warm_start is not None:
        start = load_run(cfg.warm_start)
        warm, llama_steps = int(start.config.get("meta_steps", 0)), cfg.llama_steps
    elif warm > 0:
        start = fit(
            model,
            source,
            method="maml",
            step_size=cfg.step_size,
            meta_steps=warm,
            meta_batch_size=cfg.meta_batch_size,
            seed=cfg.seed,
            check_every=warm,
            **common,
        )
    scale: float | None = cfg.prior_scale
    scores: dict[str, float] = {}
    if scale is None:
        scale, scores = choose_prior_scale(start, train, cfg) if start else (1.0, {})
    model = new_model(scale)
    step_size: float | Tensor = cfg.step_size
    if start is not None:  # continue from the MAML run: its theta and its step sizes
        with torch.no_grad():
            model.theta_init.copy_(start.theta.to(model.theta_init))
        step_size = start.guide.step_size.detach().clone()
    options: dict[str, Any] = dict(
        objective=cfg.objective,
        curvature=cfg.curvature,
        curvature_data=cfg.curvature_data,
    )
    result = fit(
        model,
        source,
        method="llama",
        step_size=step_size,
        meta_steps=llama_steps,
        meta_batch_size=cfg.llama_batch_size if warm > 0 else cfg.meta_batch_size,
        seed=cfg.seed + 1,
        check_every=max(llama_steps, 1),
        **common,
        **options,
    )
    used = {**options, "maml_loss_steps": warm, "llama_loss_steps": llama_steps}
    used["prior_scale"] = scale
    if scores:
        used["prior_scale_search_nll_on_training_episodes"] = scores
    if cfg.warm_start is not None:
        used["warm_start"] = str(cfg.warm_start)
    return result, used


def run_omniglot(
    cfg: OmniglotConfig, out: str | os.PathLike[str]
) -> tuple[dict[str, Any], FitResult]:
    """Train, evaluate and save one run into ``out`` (``model.pt``, ``metrics.json``,
    ``test_predictions.pt``); returns the metrics and the trained run."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    train = load_omniglot(cfg.train_source, rotations=True)
    test_data = load_omniglot(cfg.test_source, alphabets=cfg.test_alphabets)
    batch = test_episodes(cfg, test_data)
    if cfg.init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random'; got {cfg.init!r}")
    if cfg.init == "pretrained" and cfg.pretrain_steps < 1:
        raise ValueError("init='pretrained' needs pretrain_steps >= 1 (or use init='random')")
    t0 = time.perf_counter()
    pretrained = pretrain_network(train, cfg) if cfg.pretrain_steps > 0 else None
    pretrain_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    start_from = pretrained if cfg.init == "pretrained" and cfg.warm_start is None else None
    result, objective = _fit(cfg, train, start_from)
    train_seconds = time.perf_counter() - t0
    trained_steps = cfg.meta_steps
    steps_here = cfg.meta_steps
    if objective:
        trained_steps = objective["maml_loss_steps"] + objective["llama_loss_steps"]
        steps_here = objective["llama_loss_steps"] if cfg.warm_start else trained_steps
    result.save(out_dir / "model.pt")
    t0 = time.perf_counter()
    probs = predict_all(result, batch, cfg)
    labels = cast_labels(batch)
    metrics: dict[str, Any] = {
        "method": cfg.method,
        **({"llama": objective} if objective else {}),
        "ways": cfg.ways,
        "shots": cfg.shots,
        **evaluate_probs(probs, labels),
        "eval_episodes": cfg.eval_episodes,
        "eval_query_per_class": cfg.eval_query_shots,
        "meta_steps": trained_steps,
        "meta_steps_per_s": steps_here / train_seconds,
        "train_seconds": train_seconds,
        "pretrain_seconds": pretrain_seconds,
        "init": cfg.init if cfg.warm_start is None else f"warm start: {cfg.warm_start}",
        "eval_seconds": time.perf_counter() - t0,
        "final_loss": float(sum(result.history[-100:]) / max(len(result.history[-100:]), 1)),
        "train_classes": train.num_classes,
        "test_classes": test_data.num_classes,
    }
    baselines: dict[str, Any] = {
        # one-hot guesses: accuracy only (their NLL is infinite)
        "pixel_nearest_neighbour": {
            "accuracy": evaluate_probs(pixel_nearest_neighbour(batch), labels)["accuracy"]
        }
    }
    if pretrained is not None:
        baselines["pretrain_finetune"] = evaluate_probs(
            pretrain_finetune(train, batch, cfg, pretrained), labels
        )
    metrics["baselines"] = baselines
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["threads"] = torch.get_num_threads()
    metrics["config"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    torch.save({"probs": probs.float(), "labels": labels}, out_dir / "test_predictions.pt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics, result


def cast_labels(batch: TaskBatch) -> Tensor:
    """The test episodes' query labels ``(T, M)``."""
    _, y, _ = batch.require_query("evaluation")
    return y.long()


def format_report(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal."""

    def line(name: str, m: dict[str, Any]) -> str:
        a, n = m["accuracy"], m["nll"]
        return (
            f"  {name:<26} accuracy {100 * a['mean']:.2f} ± {100 * a['ci95']:.2f} %   "
            f"NLL {n['mean']:.3f} ± {n['ci95']:.3f}   ECE {m['ece']:.3f}"
        )

    head = (
        f"Omniglot {metrics['ways']}-way {metrics['shots']}-shot, {metrics['method']}, "
        f"{metrics['eval_episodes']} held-out episodes ({metrics['meta_steps']} meta-steps, "
        f"{metrics['meta_steps_per_s']:.2f}/s, {metrics['wall_seconds'] / 60:.1f} min)"
    )
    rows = [head, line(metrics["method"], metrics)]
    for name, m in metrics["baselines"].items():
        if "nll" in m:
            rows.append(line(name, m))
        else:
            a = m["accuracy"]
            rows.append(f"  {name:<26} accuracy {100 * a['mean']:.2f} ± {100 * a['ci95']:.2f} %")
    return "\n".join(rows)
