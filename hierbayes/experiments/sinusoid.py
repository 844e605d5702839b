r"""The sinusoid few-shot regression benchmark (Finn et al. 2017; MATH.md §5).

Meta-trains a method on :math:`K`-shot sinusoid tasks, evaluates it on held-out tasks (the same
tasks for every method and seed, so methods can be compared task by task), and compares it
with two baselines:

* **no adaptation**: predictions at the meta-learned :math:`\hat\theta` itself;
* **pretrain + fine-tune**: a network trained on the pooled tasks (``fit`` with zero inner
  steps), then fine-tuned on each support set with the same inner steps.

A LLAMA run also meta-trains MAML with the same budget and reports the paired, per-task
differences; every run reports the predictive NLL and interval coverage, overall and by
amplitude tercile (where miscalibration hides). Writes ``metrics.json`` and figures into the
output folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hierbayes.inference import FitResult, fit
from hierbayes.inference.core.inner_loop import InnerLoss
from hierbayes.inference.diagnostics import TaskMetrics, mean_ci95
from hierbayes.inference.guide import StepSizeMode
from hierbayes.models import NeuralRegression
from hierbayes.tasks import SinusoidTasks, TaskBatch

__all__ = [
    "EVAL_SEED",
    "SinusoidConfig",
    "coverage_by_amplitude",
    "evaluation_tasks",
    "format_report",
    "run_sinusoid",
]

#: Seed of the held-out evaluation tasks: fixed, so every method and run sees the same tasks.
EVAL_SEED = 20180430


@dataclass
class SinusoidConfig:
    """Settings of one sinusoid run (the defaults are the embedded demo configuration)."""

    method: str = "maml"
    shots: int = 10
    query_shots: int = 10
    meta_steps: int = 30000
    meta_batch_size: int = 25
    inner_steps: int = 1
    inner_lr: float = 0.01
    #: "fixed" (MAML), "scalar" or "per_parameter" (Meta-SGD's learned diagonal preconditioner).
    learn_step_size: StepSizeMode = "fixed"
    lr: float = 1e-3
    eval_tasks: int = 600
    pretrain_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    plot_tasks: int = 4
    progress: bool = True
    per_task_noise: bool = False
    #: Initial prior scale s of p(phi | theta) = N(theta, s^2 I) (prior precision 1/s^2).
    prior_scale: float = 0.1
    #: Learn s (LLAMA's predictive and evidence objectives only; the paper's loss would collapse
    #: it). On by default with MAML's MSE inner step, under which s stays put and carries the
    #: weight uncertainty; with the summed-log-likelihood step a learned s collapses
    #: (BENCHMARKS.md §3: why, and the comparison over seeds that chose these defaults).
    learn_prior_scale: bool = True
    #: LLAMA's options: ``objective``, ``curvature``, ``eta``, ``curvature_data``, ``damping``.
    method_options: dict[str, Any] = field(default_factory=dict)
    #: For methods other than MAML: also meta-train MAML and report paired differences.
    compare_maml: bool = True
    #: Predictive samples for the sampled Laplace predictive (0 skips it).
    predictive_samples: int = 100
    #: What the inner step climbs: "sum" (the summed log likelihood, with the step below),
    #: "mean" (per support point) or "mse" (MAML's support MSE with ``inner_lr`` itself: the
    #: step then depends on neither the learned noise nor K, as in the issue-14 prototype).
    inner_loss: InnerLoss = "mse"
    #: Scale of the LogNormal hyperprior on a learned prior scale; None (default) learns it with
    #: none (for these endless task families the hyperprior has no weight anyway).
    prior_scale_hyperprior: float | None = None

    @property
    def step_size(self) -> float:
        r"""The guide's step for ``inner_loss``: ``inner_lr`` itself on the support MSE, or
        the step equivalent to it at the initial noise scale :math:`\sigma_0 = 1`:
        :math:`2\sigma_0^2\,\alpha_{\mathrm{MSE}}` per point (``"mean"``) and
        :math:`2\sigma_0^2\,\alpha_{\mathrm{MSE}} / K` on the sum (``"sum"``)."""
        if self.inner_loss == "mse":
            return self.inner_lr
        if self.inner_loss == "mean":
            return 2.0 * self.inner_lr
        return 2.0 * self.inner_lr / self.shots


def _model(config: SinusoidConfig, method: str) -> NeuralRegression:
    learn = (
        config.learn_prior_scale
        and method == "llama"
        and config.method_options.get("objective", "predictive") != "paper"
    )
    return NeuralRegression(
        per_task_noise=config.per_task_noise,
        prior_scale=config.prior_scale,
        learn_prior_scale=learn,
        prior_scale_hyperprior=config.prior_scale_hyperprior,
    )


def evaluation_tasks(
    config: SinusoidConfig, num_tasks: int | None = None, shots: int | None = None
) -> TaskBatch:
    """The fixed held-out tasks of the benchmark (independent of the training seed)."""
    source = SinusoidTasks(shots=shots or config.shots, query_shots=config.query_shots)
    return source.sample(
        num_tasks or config.eval_tasks, generator=torch.Generator().manual_seed(EVAL_SEED)
    )


def coverage_by_amplitude(metrics: TaskMetrics, amplitude: torch.Tensor) -> dict[str, Any]:
    """Interval coverage and NLL within amplitude terciles of the held-out tasks."""
    if not metrics.coverage:
        return {}
    edges = torch.quantile(amplitude.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    groups = torch.bucketize(amplitude.double(), edges)
    out: dict[str, Any] = {}
    bounds = [float(amplitude.min()), float(edges[0]), float(edges[1]), float(amplitude.max())]
    for g, name in enumerate(["low", "mid", "high"]):
        sel = groups == g
        out[name] = {
            "amplitude_range": [round(bounds[g], 3), round(bounds[g + 1], 3)],
            "tasks": int(sel.sum()),
            **{f"{lvl:g}": float(c[sel].mean()) for lvl, c in metrics.coverage.items()},
            "nll": float(metrics.nll[sel].mean()),
        }
    return out


def _fit(
    config: SinusoidConfig, method: str, *, inner_steps: int, steps: int, seed: int, **options: Any
) -> FitResult:
    torch.manual_seed(seed)  # the network's initialisation (theta_0) is part of the run's seed
    return fit(
        _model(config, method),
        SinusoidTasks(shots=config.shots, query_shots=config.query_shots),
        method=method,
        meta_steps=steps,
        meta_batch_size=config.meta_batch_size,
        inner_steps=inner_steps,
        step_size=config.step_size,
        lr=config.lr,
        seed=seed,
        learn_step_size=config.learn_step_size if inner_steps > 0 else "fixed",
        inner_loss=config.inner_loss,
        device=config.device,
        progress=config.progress,
        **options,
    )


def _noise_scale(result: FitResult) -> float:
    r"""A fit's learned noise scale: the global one, or the mean of per-task ones
    (:math:`\exp` of the last entry of :math:`\hat\theta`)."""
    params = result.params
    if "noise_scale" in params:
        return float(params["noise_scale"])
    return float(result.theta[-1].exp())


def _effective_mse_step(step_size: float, result: FitResult, shots: int) -> float:
    r"""The step on the support MSE that the trained inner step amounts to:
    :math:`\alpha_{\mathrm{MSE}} = \alpha K / (2\hat\sigma^2)` for a step :math:`\alpha` on the
    summed log likelihood (with the learned :math:`\hat\sigma`), :math:`\alpha/(2\hat\sigma^2)`
    per point, and :math:`\alpha` itself for ``inner_loss="mse"``."""
    loss = result.config.get("inner_loss", "sum")
    if loss == "mse":
        return step_size
    per_point = step_size if loss == "mean" else step_size * shots
    return per_point / (2 * _noise_scale(result) ** 2)


def _report(metrics: TaskMetrics, test: TaskBatch) -> dict[str, Any]:
    summary = metrics.summary()
    summary["coverage_by_task"] = coverage_by_amplitude(metrics, test.info["amplitude"])
    return summary


def run_sinusoid(
    config: SinusoidConfig,
    out: str | Path | None = None,
    *,
    maml_result: FitResult | None = None,
    pretrained_result: FitResult | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return the metrics (also written to ``out/metrics.json``).

    ``maml_result`` and ``pretrained_result``: an already meta-trained MAML and pooled
    pretraining of the same settings, reused instead of trained again. The returned dict also
    holds the fitted results under ``"_results"`` (not serialised).
    """
    started = time.perf_counter()
    result = _fit(
        config,
        config.method,
        inner_steps=config.inner_steps,
        steps=config.meta_steps,
        seed=config.seed,
        **config.method_options,
    )
    train_seconds = time.perf_counter() - started
    test = evaluation_tasks(config)
    metrics = result.evaluate(test)
    no_adapt = result.evaluate(test, inner_steps=0)

    pretrain_steps = (
        config.pretrain_steps if config.pretrain_steps is not None else config.meta_steps
    )
    pretrained = pretrained_result or _fit(
        config, "maml", inner_steps=0, steps=pretrain_steps, seed=config.seed + 1
    )
    # The inner step multiplies the summed log likelihood, whose gradient scales with 1/sigma^2:
    # fine-tune with the step that moves the pooled network as far, in squared-error terms, as
    # the meta-trained method's step moves its own (the same effective step on the MSE).
    finetune_step = (
        config.step_size  # MAML's MSE step does not depend on the noise scale
        if config.inner_loss == "mse"
        else config.step_size * (_noise_scale(pretrained) / _noise_scale(result)) ** 2
    )
    finetuned = pretrained.evaluate(test, inner_steps=config.inner_steps, step_size=finetune_step)

    summary = _report(metrics, test)
    report: dict[str, Any] = {
        "method": config.method,
        **(
            {
                "objective": config.method_options.get("objective", "predictive"),
                "curvature": config.method_options.get("curvature", "ggn"),
            }
            if config.method == "llama"
            else {}
        ),
        "shots": config.shots,
        "query_shots": config.query_shots,
        "meta_steps": config.meta_steps,
        "eval_tasks": config.eval_tasks,
        "seed": config.seed,
        "per_task_noise": config.per_task_noise,
        "effective_mse_step": _effective_mse_step(config.step_size, result, config.shots),
        "learn_step_size": config.learn_step_size,
        "mse": summary["mse"],
        "nll": summary["nll"],
        "coverage": summary.get("coverage", {}),
        "coverage_by_task": summary["coverage_by_task"],
        "baselines": {
            "no_adaptation": _report(no_adapt, test),
            "pretrain_finetune": {
                **_report(finetuned, test),
                "pretrain_steps": pretrain_steps,
                "finetune_step_size": finetune_step,
                "effective_mse_step": _effective_mse_step(finetune_step, pretrained, config.shots),
            },
        },
    }
    results: dict[str, FitResult] = {config.method: result, "pretrained": pretrained}
    if config.method == "llama" and config.predictive_samples > 0:
        sampled = result.evaluate(
            test,
            method="sampled",
            num_samples=config.predictive_samples,
            generator=torch.Generator().manual_seed(config.seed),
        )
        report["sampled_predictive"] = {
            **_report(sampled, test),
            "num_samples": config.predictive_samples,
        }
    if config.method != "maml" and config.compare_maml:
        maml = maml_result or _fit(
            config,
            "maml",
            inner_steps=config.inner_steps,
            steps=config.meta_steps,
            seed=config.seed,
        )
        results["maml"] = maml
        maml_metrics = maml.evaluate(test)
        report["baselines"]["maml"] = _report(maml_metrics, test)
        assert metrics.mse is not None and maml_metrics.mse is not None
        report["paired_vs_maml"] = {
            "nll": mean_ci95(metrics.nll - maml_metrics.nll),
            "mse": mean_ci95(metrics.mse - maml_metrics.mse),
            "note": f"per-task differences {config.method} minus MAML on the same {config.eval_tasks} tasks",
        }
    report["learned"] = {
        name: (value.tolist() if value.numel() == 1 else f"tensor of shape {tuple(value.shape)}")
        for name, value in result.params.items()
    }
    report["final_loss"] = float(sum(result.history[-100:]) / max(1, len(result.history[-100:])))
    report["train_seconds"] = round(train_seconds, 2)
    report["seconds_per_meta_step"] = result.wall_time / max(1, config.meta_steps)
    report["config"] = {k: v for k, v in asdict(config).items() if k != "progress"}
    report["evaluation_seed"] = EVAL_SEED
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if config.plot_tasks > 0:
            from hierbayes.experiments.plots import plot_ambiguous_tasks, plot_sinusoid_tasks

            report["figures"] = [
                str(
                    plot_sinusoid_tasks(
                        result, test, folder / "sinusoid_tasks.png", num_tasks=config.plot_tasks
                    )
                )
            ]
            if config.method != "maml":
                report["figures"].append(
                    str(
                        plot_ambiguous_tasks(
                            result,
                            results.get("maml"),
                            folder / "ambiguous_tasks.png",
                            seed=config.seed,
                        )
                    )
                )
        (folder / "metrics.json").write_text(json.dumps(report, indent=2, default=_json_default))
    report["_results"] = results
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def format_report(reports: list[dict[str, Any]]) -> str:
    """A side-by-side table of query MSE and NLL (with 95% intervals) and coverage."""

    def cell(m: dict[str, Any]) -> str:
        return f"{m['mean']:.3f} ± {m['ci95']:.3f}"

    first = reports[0]
    lines = [
        f"sinusoid, {first['shots']}-shot, {first['eval_tasks']} held-out tasks "
        "(mean over tasks ± 95% interval; coverage of central predictive intervals)"
    ]
    header = f"{'':34s} {'query MSE':>16s} {'NLL / point':>16s} {'cover 50%':>9s} {'cover 90%':>9s} {'90% low/mid/high amplitude':>28s}"
    lines += [header, "-" * len(header)]

    def row(name: str, m: dict[str, Any]) -> str:
        cov = m.get("coverage", {})
        by_task = m.get("coverage_by_task", {})
        terciles = (
            "/".join(f"{by_task[t]['0.9']:.2f}" for t in ("low", "mid", "high")) if by_task else ""
        )
        return (
            f"{name:34s} {cell(m['mse']):>16s} {cell(m['nll']):>16s} "
            f"{cov.get('0.5', float('nan')):>9.3f} {cov.get('0.9', float('nan')):>9.3f} {terciles:>28s}"
        )

    seen_maml = any(r["method"] == "maml" for r in reports)
    for r in reports:
        label = (
            r["method"]
            if r["method"] != "llama"
            else f"llama ({r.get('objective')}, {r.get('curvature')})"
        )
        lines.append(row(f"{label}", r))
        if "sampled_predictive" in r:
            lines.append(row("  sampled predictive", r["sampled_predictive"]))
        if "maml" in r["baselines"] and not seen_maml:
            lines.append(row("maml (same budget)", r["baselines"]["maml"]))
    lines.append(
        row(f"no adaptation (θ̂ of {first['method']})", first["baselines"]["no_adaptation"])
    )
    lines.append(row("pretrain + fine-tune", first["baselines"]["pretrain_finetune"]))
    for r in reports:
        if "paired_vs_maml" in r:
            p = r["paired_vs_maml"]
            lines.append(
                f"paired {r['method']} − maml per task: NLL {p['nll']['mean']:+.3f} ± {p['nll']['ci95']:.3f}, "
                f"MSE {p['mse']['mean']:+.3f} ± {p['mse']['ci95']:.3f}"
            )
    return "\n".join(lines)
