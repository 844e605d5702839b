r"""The sinusoid few-shot regression benchmark (Finn et al. 2017; MATH.md §5).

Meta-trains a method on :math:`K`-shot sinusoid tasks, evaluates it on held-out tasks (the same
tasks for every method and seed, so methods can be compared task by task), and compares it
with two baselines:

* **no adaptation**: predictions at the meta-learned :math:`\hat\theta` itself;
* **pretrain + fine-tune**: a network trained on the pooled tasks (``fit`` with zero inner
  steps), then fine-tuned on each support set with the same inner steps.

Writes ``metrics.json`` and a figure of a few held-out tasks into the output folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hierbayes.inference import TaskMetrics, fit, mean_ci95
from hierbayes.models import NeuralRegression
from hierbayes.tasks import SinusoidTasks, TaskBatch

__all__ = [
    "EVAL_SEED",
    "SinusoidConfig",
    "coverage_by_amplitude",
    "evaluation_tasks",
    "format_report",
    "paired_difference",
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
    lr: float = 1e-3
    eval_tasks: int = 600
    pretrain_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    plot_tasks: int = 4
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def step_size(self) -> float:
        r"""The guide's step on the summed log likelihood equivalent to MAML's ``inner_lr`` on
        the support MSE, at the initial noise scale :math:`\sigma_0 = 1`:
        :math:`\alpha = 2\sigma_0^2\,\alpha_{\mathrm{MSE}} / K`."""
        return 2.0 * self.inner_lr / self.shots


def _model() -> NeuralRegression:
    return NeuralRegression()


def evaluation_tasks(config: SinusoidConfig, num_tasks: int | None = None, shots: int | None = None) -> TaskBatch:
    """The fixed held-out tasks of the benchmark (independent of the training seed)."""
    source = SinusoidTasks(shots=shots or config.shots, query_shots=config.query_shots)
    return source.sample(num_tasks or config.eval_tasks, generator=torch.Generator().manual_seed(EVAL_SEED))


def coverage_by_amplitude(metrics: TaskMetrics, amplitude: torch.Tensor) -> dict[str, Any]:
    """Interval coverage within amplitude terciles of the held-out tasks."""
    if not metrics.coverage:
        return {}
    edges = torch.quantile(amplitude.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    groups = torch.bucketize(amplitude.double(), edges)
    out: dict[str, Any] = {}
    names = ["low", "mid", "high"]
    bounds = [float(amplitude.min()), float(edges[0]), float(edges[1]), float(amplitude.max())]
    for g, name in enumerate(names):
        sel = groups == g
        out[name] = {
            "amplitude_range": [round(bounds[g], 3), round(bounds[g + 1], 3)],
            "tasks": int(sel.sum()),
            **{f"{lvl:g}": float(c[sel].mean()) for lvl, c in metrics.coverage.items()},
            "nll": float(metrics.nll[sel].mean()),
        }
    return out


def _summary(metrics: TaskMetrics) -> dict[str, Any]:
    return metrics.summary()


def run_sinusoid(config: SinusoidConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Run the benchmark; return the metrics (also written to ``out/metrics.json``)."""
    source = SinusoidTasks(shots=config.shots, query_shots=config.query_shots)
    started = time.perf_counter()
    result = fit(
        _model(), source, method=config.method, meta_steps=config.meta_steps,
        meta_batch_size=config.meta_batch_size, inner_steps=config.inner_steps,
        step_size=config.step_size, lr=config.lr, seed=config.seed, device=config.device,
        progress=config.progress, **config.method_options,
    )
    train_seconds = time.perf_counter() - started
    test = evaluation_tasks(config)
    metrics = result.evaluate(test)
    no_adapt = result.evaluate(test, inner_steps=0)

    pretrain_steps = config.pretrain_steps if config.pretrain_steps is not None else config.meta_steps
    pretrained = fit(
        _model(), source, method="maml", meta_steps=pretrain_steps,
        meta_batch_size=config.meta_batch_size, inner_steps=0, step_size=config.step_size,
        lr=config.lr, seed=config.seed + 1, device=config.device, progress=config.progress,
    )
    finetuned = pretrained.evaluate(test, inner_steps=config.inner_steps)

    summary = _summary(metrics)
    report: dict[str, Any] = {
        "method": config.method,
        "shots": config.shots,
        "query_shots": config.query_shots,
        "meta_steps": config.meta_steps,
        "eval_tasks": config.eval_tasks,
        "seed": config.seed,
        "mse": summary["mse"],
        "nll": summary["nll"],
        "coverage": summary.get("coverage", {}),
        "coverage_by_task": coverage_by_amplitude(metrics, test.info["amplitude"]),
        "baselines": {
            "no_adaptation": _summary(no_adapt),
            "pretrain_finetune": {**_summary(finetuned), "pretrain_steps": pretrain_steps},
        },
        "learned": {
            name: (value.tolist() if value.numel() == 1 else f"tensor of shape {tuple(value.shape)}")
            for name, value in result.params.items()
        },
        "final_loss": float(sum(result.history[-100:]) / max(1, len(result.history[-100:]))),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_meta_step": result.wall_time / max(1, config.meta_steps),
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "evaluation_seed": EVAL_SEED,
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if config.plot_tasks > 0:
            from hierbayes.experiments.plots import plot_sinusoid_tasks

            report["figure"] = str(
                plot_sinusoid_tasks(result, test, folder / "sinusoid_tasks.png", num_tasks=config.plot_tasks)
            )
        (folder / "metrics.json").write_text(json.dumps(report, indent=2, default=_json_default))
    report["_result"] = result
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def format_report(reports: list[dict[str, Any]]) -> str:
    """A side-by-side table of query MSE (with 95% intervals), NLL and coverage."""

    def cell(m: dict[str, Any]) -> str:
        return f"{m['mean']:.3f} ± {m['ci95']:.3f}"

    lines = []
    first = reports[0]
    lines.append(
        f"sinusoid, {first['shots']}-shot, {first['eval_tasks']} held-out tasks "
        f"(mean over tasks ± 95% interval)"
    )
    header = f"{'':28s} {'query MSE':>18s} {'NLL / point':>18s} {'cover 50%':>10s} {'cover 90%':>10s}"
    lines.append(header)
    lines.append("-" * len(header))

    def row(name: str, m: dict[str, Any]) -> str:
        cov = m.get("coverage", {})
        return (
            f"{name:28s} {cell(m['mse']):>18s} {cell(m['nll']):>18s} "
            f"{cov.get('0.5', float('nan')):>10.3f} {cov.get('0.9', float('nan')):>10.3f}"
        )

    for r in reports:
        lines.append(row(f"{r['method']} ({r['meta_steps']} steps)", r))
    lines.append(row("no adaptation (θ̂ of " + first["method"] + ")", first["baselines"]["no_adaptation"]))
    lines.append(row("pretrain + fine-tune", first["baselines"]["pretrain_finetune"]))
    return "\n".join(lines)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean and 95% interval of the per-task difference ``a - b``."""
    return mean_ci95(a - b)

