r"""Effective samples per second of Pyro's and NumPyro's NUTS on one sinusoid task's posterior.

The target is :math:`p(\phi \mid x^s, y^s, \hat\theta)` for one held-out 10-shot sinusoid task,
with :math:`\phi \in \mathbb R^{1761}` the weights of the 1-40-40-1 ReLU network and
:math:`\hat\theta` (and the noise scale) from a short MAML run (``--meta-steps``, default 500;
``0`` uses the network's initialisation). Both engines run the same NUTS (diagonal mass matrix
and step size adapted during ``--num-warmup`` steps, target acceptance 0.8, maximum tree depth
10), the same number of chains and draws, from the same starting points
(:func:`hierbayes.inference.references.nuts.initial_points`), in the same floating-point type.

Reported per engine: wall time (NumPyro's with and without its one-off JIT compilation),
minimum and median bulk ESS over the 1761 parameters (ArviZ, rank-normalised), the same per
second, the largest :math:`\hat R`, divergences, and gradient evaluations (Pyro: calls of the
potential; NumPyro: leapfrog steps, warm-up included) with their rate, the machine-bound part
of the comparison: with a few hundred draws of chains that have not converged (R-hat > 1.01 on
this posterior at these budgets) the ESS estimates themselves vary by a factor of two from run
to run. Writes
``<out>/nuts.json`` and prints a table. Figures depend on the machine and on threads: torch
runs with ``--torch-threads`` (default 1), XLA with its defaults unless ``XLA_FLAGS`` says
otherwise (recorded).

Usage::

    python benchmarks/bench_nuts.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from hierbayes.inference import fit
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.references.nuts import nuts_numpyro, nuts_pyro
from hierbayes.models import NeuralRegression
from hierbayes.tasks import SinusoidTasks

HELDOUT_SEED = 20180430


def engine_figures(posterior: SamplePosterior, *, compile_seconds: float = 0.0) -> dict[str, Any]:
    """Wall time, ESS, ESS per second and diagnostics of one run."""
    diag = posterior.diagnostics()
    ess = diag["ess_bulk"].flatten()
    wall = posterior.wall_time
    sampling = wall - compile_seconds
    out: dict[str, Any] = {
        "wall_seconds": round(wall, 3),
        "compile_seconds": round(compile_seconds, 3),
        "sampling_seconds": round(sampling, 3),
        "ess_bulk_min": float(ess.min()),
        "ess_bulk_median": float(ess.median()),
        "ess_tail_min": float(diag["ess_tail"].min()),
        "ess_bulk_min_per_second": float(ess.min()) / wall,
        "ess_bulk_median_per_second": float(ess.median()) / wall,
        "ess_bulk_min_per_sampling_second": float(ess.min()) / sampling,
        "ess_bulk_median_per_sampling_second": float(ess.median()) / sampling,
        "rhat_max": posterior.rhat_max,
        "divergences": int(posterior.sampler_stats["diverging"].sum()),
    }
    if "num_steps" in posterior.sampler_stats:
        steps = posterior.sampler_stats["num_steps"]
        out["mean_leapfrog_steps_per_draw"] = float(steps.double().mean())
    gradients = posterior.settings.get(
        "potential_evaluations", posterior.settings.get("leapfrog_steps")
    )
    if gradients is not None:
        out["gradient_evaluations"] = int(gradients)
        out["gradient_evaluations_per_sampling_second"] = int(gradients) / sampling
        out["ess_bulk_median_per_1000_gradients"] = 1000 * float(ess.median()) / int(gradients)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--meta-steps", type=int, default=500)
    parser.add_argument("--num-warmup", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument(
        "--engines", default="pyro,numpyro", help="comma-separated subset of pyro,numpyro"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.torch_threads)
    dtype = torch.float32 if args.float32 else torch.float64
    source = SinusoidTasks(shots=10, query_shots=10)
    torch.manual_seed(args.seed)  # the network's initialisation
    model = NeuralRegression()
    result = fit(
        model,
        source,
        meta_steps=args.meta_steps,
        meta_batch_size=25,
        inner_steps=1,
        step_size=0.002,
        lr=1e-3,
        seed=args.seed,
        dtype=dtype,
        progress=False,
    )
    task = source.sample(1, generator=torch.Generator().manual_seed(HELDOUT_SEED), dtype=dtype)
    common = dict(
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        seed=args.seed,
    )
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    runs: dict[str, SamplePosterior] = {}
    if "numpyro" in engines:
        runs["numpyro"] = nuts_numpyro(model, result.params, task, **common)  # type: ignore[arg-type]
    if "pyro" in engines:
        runs["pyro"] = nuts_pyro(result.guide.density, result.params, task, **common)  # type: ignore[arg-type]

    import jax
    import numpyro
    import pyro

    report: dict[str, Any] = {
        "target": "p(phi | 10 support points, theta_hat) of one sinusoid task; 1-40-40-1 ReLU, "
        f"D = {model.num_params}",
        "theta_hat": (
            f"MAML, {args.meta_steps} meta-steps (noise scale "
            f"{float(result.params['noise_scale']):.3f})"
            if args.meta_steps > 0
            else "the network's initialisation"
        ),
        "settings": {
            **common,
            "dtype": str(dtype),
            "max_tree_depth": 10,
            "target_accept_prob": 0.8,
        },
        **{
            name: engine_figures(
                run, compile_seconds=float(run.settings.get("compile_seconds", 0.0))
            )
            for name, run in runs.items()
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_backend": jax.default_backend(),
            "python": sys.version.split()[0],
            "versions": {
                "torch": torch.__version__,
                "pyro": pyro.__version__,
                "jax": jax.__version__,
                "numpyro": numpyro.__version__,
            },
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if "pyro" in report and "numpyro" in report:
        p, n = report["pyro"], report["numpyro"]
        report["speedup_ess_per_second_median"] = (
            n["ess_bulk_median_per_second"] / p["ess_bulk_median_per_second"]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "nuts.json" if len(runs) == 2 else f"nuts_{'_'.join(runs)}.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(report["target"])
    print(f"theta_hat: {report['theta_hat']}; {common}; {dtype}")
    header = (
        f"{'engine':8s} {'wall s':>8s} {'compile s':>9s} {'ESS min':>8s} {'ESS med':>8s} "
        f"{'min/s':>8s} {'med/s':>8s} {'R-hat':>7s} {'div':>4s} {'grad/s':>8s}"
    )
    print(header)
    print("-" * len(header))
    for engine in runs:
        r = report[engine]
        print(
            f"{engine:8s} {r['wall_seconds']:8.1f} {r['compile_seconds']:9.1f} "
            f"{r['ess_bulk_min']:8.1f} {r['ess_bulk_median']:8.1f} "
            f"{r['ess_bulk_min_per_second']:8.3f} {r['ess_bulk_median_per_second']:8.3f} "
            f"{r['rhat_max']:7.3f} {r['divergences']:4d} "
            f"{r.get('gradient_evaluations_per_sampling_second', float('nan')):8.0f}"
        )
    if "speedup_ess_per_second_median" in report:
        speedup = report["speedup_ess_per_second_median"]
        print(f"NumPyro / Pyro, median bulk ESS per second: {speedup:.1f}x")
    print(f"machine: {report['machine']}")
    print(f"wrote {args.out / name}")
    return report


if __name__ == "__main__":
    main()
