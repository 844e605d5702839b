"""Empirical Bayes on groups as tasks: the MAP-II parametrisations and the optimisers (issue 11).

For radon (the contextual-effects model, 85 counties) and eight schools, fits
``fit(model, tasks, method="llama", objective="evidence")`` with

* full-batch L-BFGS (the default for query-less tasks), the hyperprior scored in the
  constrained space (as Pyro's ``AutoDelta``) and in the unconstrained space with the
  log-Jacobian (``hyperprior_space="unconstrained"``);
* for contrast, the stochastic loop with ``fit``'s Adam defaults (``full_batch=False``,
  lr 1e-3, 25 groups a step, ``--adam-steps`` steps), constrained;

and records the fit time, iterations, function evaluations, final loss, convergence and the
hyperparameters (mu, tau, and w, sigma for radon), with any warning the fit raised. Full-Bayes
(NUTS) references are measured separately (issue 11, items 3-4).

Usage::

    python benchmarks/bench_empirical_bayes.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _machine import commit, cpu_name  # benchmarks/ is the script's own folder

from hierbayes.inference import fit
from hierbayes.models import ContextualEffects, EightSchools
from hierbayes.tasks import eight_schools_tasks, radon_tasks


def _run(name: str, model: Any, tasks: Any, **options: Any) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        result = fit(model, tasks, method="llama", objective="evidence", progress=False, **options)
        seconds = time.perf_counter() - started
    c = result.convergence
    row = {
        "data": name,
        "optimizer": c.optimizer if c else None,
        "hyperprior_space": options.get("hyperprior_space", "constrained"),
        "seconds": round(seconds, 3),
        "iterations": c.steps if c else len(result.history),
        "function_evaluations": c.function_evaluations if c else None,
        "loss": c.loss if c else result.history[-1],
        "converged": c.converged if c else None,
        "reason": c.reason if c else None,
        "grad_norm": c.grad_norm if c else None,
        "hyper": {k: v.tolist() for k, v in result.params.items()},
        "warnings": sorted({str(w.message)[:160] for w in caught}),
    }
    print(
        f"{name:13s} {row['optimizer']:6s} {row['hyperprior_space']:13s} "
        f"{row['seconds']:7.2f}s {row['iterations']:5d} it  loss {row['loss']:.6f}  "
        f"mu {row['hyper']['mu']:.4f}  tau {row['hyper']['tau']:.4f}  converged {row['converged']}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--adam-steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    rows = []
    for space in ("constrained", "unconstrained"):
        rows.append(_run("radon", ContextualEffects(), radon_tasks(), hyperprior_space=space))
        rows.append(
            _run(
                "eight_schools",
                EightSchools(),
                eight_schools_tasks(),
                hyperprior_space=space,
                meta_batch_size=8,
            )
        )
    rows.append(
        _run(
            "radon",
            ContextualEffects(),
            radon_tasks(),
            full_batch=False,
            meta_steps=args.adam_steps,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "empirical_bayes.json"
    record = {
        "commit": commit(),
        "cpu": cpu_name(),
        "threads": 1,
        "dtype": "float64",
        "runs": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
