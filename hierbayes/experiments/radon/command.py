"""``python -m hierbayes radon``: the three methods, ``metrics.json``, the forest plot, a report."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from hierbayes.experiments.linear.config import float64_default
from hierbayes.experiments.radon.config import HYPERPARAMETERS, WEIGHT_FEATURES, RadonConfig
from hierbayes.experiments.radon.figures import plot_forest
from hierbayes.experiments.radon.summaries import (
    draws_summary,
    finite_or_none,
    gaussian_summary,
    hyper_from_draws,
    hyper_point,
    mixture_summary,
)
from hierbayes.inference import FitResult, fit
from hierbayes.inference.posteriors import HyperLaplace, hyper_laplace
from hierbayes.inference.references import FullBayesPosterior, nuts_full_bayes
from hierbayes.models import ContextualEffects
from hierbayes.tasks import radon_tasks
from hierbayes.tasks.grouped import GroupedTasks

__all__ = ["METHODS", "add_parser", "fit_empirical_bayes", "format_report", "run", "run_radon"]

#: The methods, in the order they run and are reported.
METHODS = ("empirical_bayes", "hyper_laplace", "nuts")


def fit_empirical_bayes(tasks: GroupedTasks, config: RadonConfig) -> FitResult:
    """Type-II MAP of the contextual-effects model: ``fit(ContextualEffects(), tasks,
    method="llama", objective="evidence")`` (full-batch L-BFGS on the exact marginal
    likelihood), in float64."""
    return fit(
        ContextualEffects(),
        tasks,
        method="llama",
        objective="evidence",
        seed=config.seed,
        progress=config.progress,
        dtype=torch.float64,
    )


def _hyper_laplace(result: FitResult, tasks: GroupedTasks, config: RadonConfig) -> HyperLaplace:
    return hyper_laplace(
        result,
        tasks,
        quadrature="draws",
        importance=True,
        num_nodes=config.hyper_nodes,
        seed=config.seed,
    )


def _nuts(result: FitResult, tasks: GroupedTasks, config: RadonConfig) -> FullBayesPosterior:
    return nuts_full_bayes(
        result.model,
        tasks,
        num_warmup=config.num_warmup,
        num_samples=config.num_samples,
        num_chains=config.num_chains,
        seed=config.seed,
        target_accept_prob=config.target_accept_prob,
    )


def _against_nuts(summaries: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per method, the mean and largest |Δmean| over counties and the mean sd ratio to NUTS."""
    ref = summaries["nuts"]
    out = {}
    for method in METHODS[:2]:
        difference = (summaries[method]["mean"] - ref["mean"]).abs()
        out[method] = {
            "mean_abs_mean_difference": float(difference.mean()),
            "max_abs_mean_difference": float(difference.max()),
            "mean_sd_ratio": float((summaries[method]["sd"] / ref["sd"]).mean()),
        }
    return out


def _nuts_diagnostics(nuts: FullBayesPosterior, tasks: GroupedTasks) -> dict[str, Any]:
    per_site = {
        key: {
            "site": site,
            "rhat": nuts.global_diagnostics[site]["rhat"].tolist(),
            "ess_bulk": nuts.global_diagnostics[site]["ess_bulk"].tolist(),
        }
        for key, site in HYPERPARAMETERS.items()
    }
    return {
        "rhat_max": finite_or_none(nuts.rhat_max),  # over the counties and the hyperparameters
        "ess_bulk_min": finite_or_none(nuts.ess_bulk_min),  # the same
        "ess_bulk_min_counties": finite_or_none(float(nuts.ess_bulk_min_per_task.min())),
        "divergences": int(nuts.sampler_stats["diverging"][..., 0].sum()),
        "draws": nuts.num_chains * nuts.num_draws,
        "converged": nuts.converged,
        "flagged_counties": [int(tasks.group_ids[j]) for j in nuts.flagged],
        "flagged_hyperparameters": [
            key for key, site in HYPERPARAMETERS.items() if site in nuts.globals_flagged
        ],
        "hyperparameters": per_site,
        "rhat_threshold": nuts.rhat_threshold,
        "settings": dict(nuts.settings),
    }


def run_radon(config: RadonConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Run the three methods; return the metrics (also written to ``out/metrics.json``, beside
    ``out/forest.png``). See :mod:`hierbayes.experiments.radon` for what they hold."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with float64_default():
        tasks = radon_tasks(dtype=torch.float64)
        clock = time.perf_counter()
        result = fit_empirical_bayes(tasks, config)
        eb_posterior = result.adapt(tasks.batch())
        timings["empirical_bayes"] = time.perf_counter() - clock
        clock = time.perf_counter()
        hyper = _hyper_laplace(result, tasks, config)
        timings["hyper_laplace"] = time.perf_counter() - clock
        clock = time.perf_counter()
        nuts = _nuts(result, tasks, config)
        timings["nuts"] = time.perf_counter() - clock
        summaries = {
            "empirical_bayes": gaussian_summary(eb_posterior),
            "hyper_laplace": mixture_summary(hyper.task_posteriors),
            "nuts": draws_summary(nuts),
        }
    weights = hyper.task_posteriors.weights
    counties = [
        {
            "county": int(tasks.group_ids[j]),
            "houses": int(tasks.group_sizes[j]),
            **{
                method: {k: float(v[j]) for k, v in summaries[method].items()} for method in METHODS
            },
        }
        for j in range(tasks.num_tasks)
    ]
    metrics: dict[str, Any] = {
        "county_effect": "alpha_j, the county intercept (ContextualEffects' per-task site alpha)",
        "hyper": {
            "sites": dict(HYPERPARAMETERS),
            "weight_features": list(WEIGHT_FEATURES),
            "empirical_bayes": hyper_point(result.params),
            "hyper_laplace": hyper_from_draws(hyper.task_posteriors.node_params, weights),
            "nuts": hyper_from_draws(nuts.global_draws),
        },
        "counties": counties,
        "against_nuts": _against_nuts(summaries),
        "diagnostics": {
            "empirical_bayes": (None if result.convergence is None else asdict(result.convergence)),
            "hyper_laplace": {
                "converged": hyper.converged,
                "stop_reason": hyper.stop_reason,
                "newton_steps": hyper.newton_steps,
                "gradient_norm": hyper.gradient_norm,
                "nodes": int(weights.numel()),
                "importance_ess": float(1.0 / weights.square().sum()),
            },
            "nuts": _nuts_diagnostics(nuts, tasks),
        },
        "settings": {**asdict(config), "torch_threads": torch.get_num_threads()},
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        mu = metrics["hyper"]["empirical_bayes"]["county_effect_mean"]
        metrics["figures"] = {
            "forest": str(plot_forest(counties, folder / "forest.png", county_effect_mean=mu))
        }
    timings["total"] = time.perf_counter() - started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    if out is not None:
        text = json.dumps(metrics, indent=2, allow_nan=False)
        (Path(out) / "metrics.json").write_text(text)
    return metrics


def _hyper_rows(
    hyper: dict[str, Any],
) -> list[tuple[str, float, dict[str, float], dict[str, float]]]:
    rows = []
    for key, site in HYPERPARAMETERS.items():
        eb, hl, nuts = (hyper[m][key] for m in METHODS)
        if isinstance(eb, list):
            for i, feature in enumerate(WEIGHT_FEATURES):
                rows.append(
                    (
                        f"{key}[{i + 1}] ({site}[{i}], {feature})",
                        eb[i],
                        {k: v[i] for k, v in hl.items()},
                        {k: v[i] for k, v in nuts.items()},
                    )
                )
        else:
            rows.append((f"{key} ({site})", eb, hl, nuts))
    return rows


def format_report(metrics: dict[str, Any]) -> str:
    """A short text report of :func:`run_radon`'s metrics."""
    lines = [
        f"Minnesota radon, {len(metrics['counties'])} counties as tasks (ContextualEffects)",
        f"  {'hyperparameter (site)':<40s} {'EB (type-II MAP)':>16s} "
        f"{'hyper-Laplace mean ± sd':>24s} {'NUTS mean ± sd':>20s}",
    ]
    for label, eb, hl, nuts in _hyper_rows(metrics["hyper"]):
        lines.append(
            f"  {label:<40s} {eb:>16.4f} {hl['mean']:>15.4f} ± {hl['sd']:<6.4f} "
            f"{nuts['mean']:>11.4f} ± {nuts['sd']:<6.4f}"
        )
    lines += ["", "  county intercepts α_j against NUTS:  mean |Δmean|  max |Δmean|  mean sd ratio"]
    for method, row in metrics["against_nuts"].items():
        lines.append(
            f"  {method:<36s} {row['mean_abs_mean_difference']:>12.4f} "
            f"{row['max_abs_mean_difference']:>12.4f} {row['mean_sd_ratio']:>14.3f}"
        )
    eb = metrics["diagnostics"]["empirical_bayes"]
    hl = metrics["diagnostics"]["hyper_laplace"]
    nuts = metrics["diagnostics"]["nuts"]
    settings = nuts["settings"]
    rhat, ess = nuts["rhat_max"], nuts["ess_bulk_min"]
    eb_line = (
        "no convergence report"
        if eb is None
        else f"{'converged' if eb['converged'] else 'NOT converged'} ({eb['reason']}) in "
        f"{eb['steps']} {eb['optimizer']} iterations"
    )
    lines += [
        "",
        f"  empirical Bayes: {eb_line}",
        f"  hyper-Laplace: {hl['nodes']} importance-weighted draws of the globals, "
        f"ESS {hl['importance_ess']:.0f}",
        f"  NUTS: {settings['num_chains']} chains × {settings['num_samples']} draws after "
        f"{settings['num_warmup']} warm-up; R-hat max "
        f"{'nan' if rhat is None else f'{rhat:.3f}'}, bulk ESS min "
        f"{'nan' if ess is None else f'{ess:.0f}'}, {nuts['divergences']} divergences"
        + (
            ""
            if nuts["converged"]
            else f"\n  NUTS is flagged (R-hat above {nuts['rhat_threshold']}): not yet a reliable "
            "reference; rerun with more --num-warmup/--num-samples or --target-accept 0.95"
        ),
        "  seconds: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in metrics["timings"].items()),
    ]
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``radon`` subcommand to an ``argparse`` subparsers object."""
    defaults = RadonConfig()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "radon",
        help="Minnesota radon, counties as tasks: empirical Bayes, hyper-Laplace and NUTS",
        description=(
            "Fits the radon contextual-effects model by empirical Bayes, adds the uncertainty "
            "in the hyperparameters (hyper-Laplace), samples full Bayes by NUTS, and compares "
            "the 85 county intercepts (metrics.json, forest.png)."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/radon"), help="output folder")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--num-warmup",
        type=int,
        default=None,
        help=f"NUTS warm-up steps (default {defaults.num_warmup})",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"NUTS draws per chain (default {defaults.num_samples})",
    )
    p.add_argument(
        "--num-chains", type=int, default=None, help=f"NUTS chains (default {defaults.num_chains})"
    )
    p.add_argument(
        "--target-accept",
        type=float,
        default=None,
        help=f"NUTS' adaptation target (default {defaults.target_accept_prob}; 0.95 for fewer "
        "divergences in the funnel of small tau, at about twice the time)",
    )
    p.add_argument(
        "--hyper-nodes",
        type=int,
        default=None,
        help=f"hyper-Laplace's importance-weighted draws (default {defaults.hyper_nodes})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds-long sizes (NUTS 2 chains × (30 + 30), 200 hyper-Laplace draws)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``radon`` from parsed arguments; print a report and return the metrics."""
    overrides: dict[str, Any] = {"seed": args.seed, "progress": not args.no_progress}
    for name in ("num_warmup", "num_samples", "num_chains", "hyper_nodes"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.target_accept is not None:
        overrides["target_accept_prob"] = args.target_accept
    config = RadonConfig.quick(**overrides) if args.quick else replace(RadonConfig(), **overrides)
    metrics = run_radon(config, args.out)
    print(format_report(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'} and forest.png")
    return metrics
