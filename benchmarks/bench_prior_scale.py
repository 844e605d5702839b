"""Why does a learned prior scale collapse? The inner step's loss against the hyperprior (issue 14).

LLAMA's linearised-predictive objective with a learned prior scale s (p(phi | theta) =
N(theta, s^2 I)), 5-shot sinusoid tasks, in four configurations that cross the two differences
between the project and the issue-14 prototype:

* the inner step: on the summed support log likelihood with alpha = 2 * 0.01 / K (the project's
  default: its effective step on the MSE grows as the learned noise scale falls), or on the
  support MSE with 0.01 (the prototype's: independent of the noise scale);
* the learned s: with the LogNormal(log s0, 1) hyperprior (the project's default), or as a plain
  parameter with none (the prototype's).

Each run records s, the noise scale and the effective MSE step every ``--record-every`` steps.

Usage::

    python benchmarks/bench_prior_scale.py --meta-steps 10000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _machine import commit, cpu_name  # benchmarks/ is the script's own folder

from hierbayes.experiments.sinusoid import SinusoidConfig
from hierbayes.inference import FitResult, fit
from hierbayes.models import NeuralRegression
from hierbayes.tasks import SinusoidTasks

CONFIGS: dict[str, dict[str, Any]] = {
    "sum step, hyperprior": {"inner_loss": "sum", "prior_scale_hyperprior": 1.0},
    "sum step, no hyperprior": {"inner_loss": "sum", "prior_scale_hyperprior": None},
    "mse step, hyperprior": {"inner_loss": "mse", "prior_scale_hyperprior": 1.0},
    "mse step, no hyperprior": {"inner_loss": "mse", "prior_scale_hyperprior": None},
}


def run(name: str, steps: int, every: int, seed: int, shots: int) -> dict[str, Any]:
    options = CONFIGS[name]
    config = SinusoidConfig(shots=shots, inner_loss=options["inner_loss"])
    torch.manual_seed(seed)
    model = NeuralRegression(
        prior_scale=0.1,
        learn_prior_scale=True,
        prior_scale_hyperprior=options["prior_scale_hyperprior"],
    )
    trace: list[dict[str, float]] = []

    def record(step: int, loss: float, result: FitResult) -> None:
        if step % every != 0 and step != steps - 1:
            return
        with torch.no_grad():
            values = result.guide.global_values()
            s = float(torch.as_tensor(model.prior_scale_of(values)).reshape(-1)[0])
            sigma = float(values["noise_scale"])
        alpha = config.step_size
        mse_step = alpha if options["inner_loss"] == "mse" else alpha * shots / (2 * sigma**2)
        trace.append(
            {
                "step": step,
                "loss": loss,
                "prior_scale": s,
                "noise_scale": sigma,
                "mse_step": mse_step,
            }
        )

    started = time.perf_counter()
    fit(
        model,
        SinusoidTasks(shots=shots, query_shots=10),
        method="llama",
        objective="predictive",
        meta_steps=steps,
        step_size=config.step_size,
        inner_loss=options["inner_loss"],
        seed=seed,
        progress=False,
        callback=record,
    )
    return {"config": name, "seconds": time.perf_counter() - started, "trace": trace}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meta-steps", type=int, default=10000)
    parser.add_argument("--record-every", type=int, default=500)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run(n, args.meta_steps, args.record_every, args.seed, args.shots) for n in CONFIGS]
    report = {
        "benchmark": "learned prior scale under LLAMA's predictive objective (issue 14)",
        "command": "python benchmarks/bench_prior_scale.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": {"cpu": cpu_name(), "torch_threads": 1},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prior_scale.json").write_text(json.dumps(report, indent=1))
    for r in runs:
        last = r["trace"][-1]
        print(
            f"{r['config']:26s} s {r['trace'][0]['prior_scale']:.3g} -> {last['prior_scale']:.3g}  "
            f"sigma {last['noise_scale']:.3f}  MSE step {last['mse_step']:.4f}"
        )
    print(f"wrote {args.out / 'prior_scale.json'}")


if __name__ == "__main__":
    main()
