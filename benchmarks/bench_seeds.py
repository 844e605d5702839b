"""Method comparison over training seeds on K-shot sinusoid tasks (issue 14).

A comparison of methods from one training seed is not a result: this script meta-trains every
configuration on several training seeds, evaluates each run on the same 600 held-out tasks
(``hierbayes.experiments.sinusoid.evaluation_tasks``: fixed, independent of the training seed),
and reports, per configuration, the mean ± sd over seeds of the query NLL per point, MSE,
coverage of the central 50% and 90% predictive intervals, 90% coverage by amplitude tercile,
and the learned noise and prior scales; and, per seed, the paired per-task NLL difference
against the reference configuration (MAML with a learned noise scale), so that a difference
can be judged against both the task-to-task and the seed-to-seed spread.

Every run is its own process (one thread each), ``--jobs`` at a time.

Usage::

    python benchmarks/bench_seeds.py --shots 5 --meta-steps 20000 --seeds 0 1 2 --jobs 2 \\
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _machine import commit, cpu_name  # benchmarks/ is the script's own folder

#: name -> (method, fit and model options). ``inner_loss="mse"`` with ``inner_lr`` 0.01 is the
#: prototype's MAML step; the default ("sum") steps on the summed log likelihood with
#: 2 * 0.01 / K, the same step at the initial noise scale 1.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "maml": ("maml", {"learn_noise": False}),
    "maml+noise": ("maml", {}),
    "maml+noise+mse": ("maml", {"inner_loss": "mse"}),
    "metasgd+noise": ("maml", {"learn_step_size": "per_parameter"}),
    "llama-predictive": ("llama", {"objective": "predictive"}),
    "llama-evidence": ("llama", {"objective": "evidence"}),
    "llama-paper": ("llama", {"objective": "paper"}),
    "llama-predictive+metasgd": (
        "llama",
        {"objective": "predictive", "learn_step_size": "per_parameter"},
    ),
    "llama-predictive+mse+learned_s": (
        "llama",
        {
            "objective": "predictive",
            "inner_loss": "mse",
            "learn_prior_scale": True,
            "prior_scale_hyperprior": None,
        },
    ),
}
REFERENCE = "maml+noise"
#: Also compared with: MAML with a learned noise scale and the same (MSE) inner step.
SECOND_REFERENCE = "maml+noise+mse"


def run_one(name: str, shots: int, steps: int, seed: int, eval_tasks: int) -> dict[str, Any]:
    """Train and evaluate one configuration (in this process)."""
    import torch

    from hierbayes.experiments.sinusoid import (
        SinusoidConfig,
        coverage_by_amplitude,
        evaluation_tasks,
    )
    from hierbayes.inference import fit
    from hierbayes.models import NeuralRegression
    from hierbayes.tasks import SinusoidTasks

    torch.set_num_threads(1)
    method, options = CONFIGS[name]
    options = dict(options)
    model_options = {
        k: options.pop(k)
        for k in ("learn_noise", "learn_prior_scale", "prior_scale_hyperprior")
        if k in options
    }
    inner_loss = options.pop("inner_loss", "sum")
    learn_step_size = options.pop("learn_step_size", "fixed")
    config = SinusoidConfig(
        shots=shots, meta_steps=steps, eval_tasks=eval_tasks, inner_loss=inner_loss
    )
    torch.manual_seed(seed)
    model = NeuralRegression(prior_scale=config.prior_scale, **model_options)
    started = time.perf_counter()
    result = fit(
        model,
        SinusoidTasks(shots=shots, query_shots=config.query_shots),
        method=method,
        meta_steps=steps,
        meta_batch_size=config.meta_batch_size,
        step_size=config.step_size,
        inner_loss=inner_loss,
        learn_step_size=learn_step_size,
        lr=config.lr,
        seed=seed,
        progress=False,
        **options,
    )
    seconds = time.perf_counter() - started
    test = evaluation_tasks(config)
    metrics = result.evaluate(test)
    summary = metrics.summary()
    params = result.params
    with torch.no_grad():
        prior_scale = model.prior_scale_of(result.guide.global_values())
    return {
        "config": name,
        "shots": shots,
        "seed": seed,
        "meta_steps": steps,
        "train_seconds": seconds,
        "nll": float(metrics.nll.mean()),
        "mse": float(metrics.mse.mean()),
        "coverage": {f"{k:g}": float(v.mean()) for k, v in metrics.coverage.items()},
        "coverage_by_task": coverage_by_amplitude(metrics, test.info["amplitude"]),
        "per_task_nll": [float(v) for v in metrics.nll],
        "noise_scale": float(params["noise_scale"]) if "noise_scale" in params else None,
        "prior_scale": float(torch.as_tensor(prior_scale).reshape(-1)[0]),
        "summary": {k: v for k, v in summary.items() if k in ("nll", "mse")},
    }


def _worker(args: argparse.Namespace) -> None:
    out = run_one(args.worker, args.shots, args.meta_steps, args.seed, args.eval_tasks)
    Path(args.worker_out).write_text(json.dumps(out))


def _spawn(
    name: str, shots: int, steps: int, seed: int, eval_tasks: int, tmp: Path
) -> dict[str, Any]:
    target = tmp / f"{name}-{shots}-{seed}.json"
    if target.is_file():  # a run of the same command finished it already: reuse it
        saved: dict[str, Any] = json.loads(target.read_text())
        if saved.get("meta_steps") == steps:
            return saved
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--shots",
        str(shots),
        "--meta-steps",
        str(steps),
        "--seed",
        str(seed),
        "--eval-tasks",
        str(eval_tasks),
        "--worker-out",
        str(target),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"config": name, "shots": shots, "seed": seed, "error": done.stderr[-2000:]}
    result: dict[str, Any] = json.loads(target.read_text())
    return result


def _mean_sd(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": mean, "sd": sd}


def _paired(
    rows: list[dict[str, Any]], ok: list[dict[str, Any]], ref_name: str, name: str, shots: int
) -> list[dict[str, float]]:
    """Per seed: the mean paired per-task NLL difference to ``ref_name`` and its 95% interval."""
    if name == ref_name:
        return []
    reference = {r["seed"]: r for r in ok if r["config"] == ref_name and r["shots"] == shots}
    paired = []
    for r in rows:
        ref = reference.get(r["seed"])
        if ref is None:
            continue
        diffs = [a - b for a, b in zip(r["per_task_nll"], ref["per_task_nll"], strict=True)]
        half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5
        paired.append({"seed": r["seed"], "mean": statistics.fmean(diffs), "ci95": half})
    return paired


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds per configuration and shots, and paired differences to MAML+noise."""
    table: dict[str, Any] = {}
    ok = [r for r in runs if "error" not in r]
    for shots in sorted({r["shots"] for r in ok}):
        for name in CONFIGS:
            rows = [r for r in ok if r["config"] == name and r["shots"] == shots]
            if not rows:
                continue
            entry: dict[str, Any] = {
                "seeds": [r["seed"] for r in rows],
                "nll": _mean_sd([r["nll"] for r in rows]),
                "mse": _mean_sd([r["mse"] for r in rows]),
                "coverage_50": _mean_sd([r["coverage"]["0.5"] for r in rows]),
                "coverage_90": _mean_sd([r["coverage"]["0.9"] for r in rows]),
                "coverage_90_by_tercile": {
                    t: _mean_sd([r["coverage_by_task"][t]["0.9"] for r in rows])
                    for t in ("low", "mid", "high")
                },
                "noise_scale": [r["noise_scale"] for r in rows],
                "prior_scale": [r["prior_scale"] for r in rows],
                "train_seconds": _mean_sd([r["train_seconds"] for r in rows]),
            }
            for key, ref_name in (
                ("paired_nll_vs_reference", REFERENCE),
                ("paired_nll_vs_second_reference", SECOND_REFERENCE),
            ):
                paired = _paired(rows, ok, ref_name, name, shots)
                if paired:
                    means = [p["mean"] for p in paired]
                    entry[key] = {
                        "reference": ref_name,
                        "per_seed": paired,
                        "over_seeds": _mean_sd(means),
                        "all_seeds_better": all(p["mean"] + p["ci95"] < 0 for p in paired),
                        "all_seeds_worse": all(p["mean"] - p["ci95"] > 0 for p in paired),
                    }
            table[f"{name} ({shots}-shot)"] = entry
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shots", type=int, nargs="+", default=[5])
    parser.add_argument("--meta-steps", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        args.shots = args.shots[0]
        _worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "seeds_runs"
    tmp.mkdir(exist_ok=True)
    jobs = [(c, k, s) for k in args.shots for s in args.seeds for c in args.configs]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(
            pool.map(
                lambda job: _spawn(job[0], job[1], args.meta_steps, job[2], args.eval_tasks, tmp),
                jobs,
            )
        )
    report = {
        "benchmark": "sinusoid method comparison over training seeds",
        "command": "python benchmarks/bench_seeds.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": {"cpu": cpu_name(), "jobs": args.jobs, "torch_threads": 1},
        "seconds": time.perf_counter() - started,
        "reference": REFERENCE,
        "summary": summarise(runs),
        "errors": [r for r in runs if "error" in r],
        "runs": [{k: v for k, v in r.items() if k != "per_task_nll"} for r in runs],
    }
    name = "seeds_" + "_".join(f"{k}shot" for k in args.shots) + ".json"
    (args.out / name).write_text(json.dumps(report, indent=1))
    for key, entry in report["summary"].items():
        paired = entry.get("paired_nll_vs_reference", {}).get("over_seeds")
        print(
            f"{key:42s} NLL {entry['nll']['mean']:.3f} ± {entry['nll']['sd']:.3f}  "
            f"MSE {entry['mse']['mean']:.3f} ± {entry['mse']['sd']:.3f}  "
            f"cov50 {entry['coverage_50']['mean']:.3f} cov90 {entry['coverage_90']['mean']:.3f}"
            + (f"  ΔNLL {paired['mean']:+.3f} ± {paired['sd']:.3f}" if paired else "")
        )
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
