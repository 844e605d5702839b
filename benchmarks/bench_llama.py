"""Meta-step time and peak memory of every LLAMA objective and curvature, beside MAML's.

Workload: the sinusoid benchmark (25 tasks a meta-batch, 10 support + 10 query points, the
1-40-40-1 ReLU network, one inner step, second order), through ``hierbayes.inference.training.fit``.
Each configuration runs in a fresh worker process (so the resident-memory peak is its own),
rounds are interleaved across configurations, and the median over rounds is reported with
the ratio to MAML's meta-step time measured in the same round.

Usage::

    python benchmarks/bench_llama.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import commit, cpu_name  # benchmarks/ is the script's own folder

CONFIGS: dict[str, dict[str, str]] = {
    "maml": {},
    **{
        f"{objective}-{curvature}": {"objective": objective, "curvature": curvature}
        for objective in ("paper", "predictive", "evidence")
        for curvature in ("ggn", "diag", "kfac", "full")
    },
}


def worker(name: str, steps: int, threads: int, warmup: int = 3) -> None:
    """Run one configuration and print its figures as JSON (called in a subprocess).

    Time per step excludes the first ``warmup`` steps; the memory figure is the peak resident
    size of the process minus its size after imports and set-up, before the first step.
    """
    import torch

    from hierbayes.inference import fit
    from hierbayes.models import NeuralRegression
    from hierbayes.tasks import SinusoidTasks

    torch.set_num_threads(threads)
    options = CONFIGS[name]
    method = "maml" if not options else "llama"
    source = SinusoidTasks(shots=10, query_shots=10)
    model = NeuralRegression(prior_scale=0.1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    marks: dict[int, float] = {}

    def mark(step: int, loss: float, result: object) -> None:
        if step in (warmup - 1, warmup + steps - 1):
            marks[step] = time.perf_counter()

    fit(
        model,
        source,
        method=method,
        meta_steps=warmup + steps,
        step_size=0.002,
        progress=False,
        callback=mark,
        **options,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = marks[warmup + steps - 1] - marks[warmup - 1]
    print(
        json.dumps(
            {
                "ms_per_step": 1e3 * seconds / steps,
                "rss_before_mb": before / 1024,
                "rss_peak_mb": peak / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--full-steps",
        type=int,
        default=2,
        help="steps for the slow 'full' Hessian configurations (about 20-40 s each here)",
    )
    parser.add_argument(
        "--full-rounds", type=int, default=1, help="rounds that include the 'full' configurations"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help="comma-separated configurations")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.threads)
        return
    names = (
        list(CONFIGS)
        if args.only is None
        else ["maml", *[n for n in args.only.split(",") if n != "maml"]]
    )
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    failures: dict[str, list[str]] = {}
    started = time.perf_counter()
    for r in range(args.rounds):
        succeeded: set[str] = set()
        for name in names:
            if name.endswith("-full") and r >= args.full_rounds:
                continue
            steps = args.full_steps if name.endswith("-full") else args.steps
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--steps",
                    str(steps),
                    "--threads",
                    str(args.threads),
                ],
                check=False,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:  # record the failure, keep measuring the others
                last = (out.stderr.strip().splitlines() or ["?"])[-1]
                failures.setdefault(name, []).append(f"round {r + 1}: {last}")
                print(f"  {name} failed: {last}", flush=True)
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            succeeded.add(name)
        if "maml" not in succeeded:
            continue
        maml_ms = runs["maml"][-1]["ms_per_step"]
        done = [n for n in names if n in succeeded]
        for name in done:
            ratios[name].append(runs[name][-1]["ms_per_step"] / maml_ms)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {runs[n][-1]['ms_per_step']:.2f}ms" for n in done),
            flush=True,
        )
    table = {
        name: {
            "ms_per_step": round(statistics.median(x["ms_per_step"] for x in runs[name]), 3),
            "ratio_to_maml": round(statistics.median(ratios[name]), 2),
            "peak_rss_mb": round(max(x["rss_peak_mb"] for x in runs[name]), 1),
            "rss_increase_mb": round(
                statistics.median(x["rss_peak_mb"] - x["rss_before_mb"] for x in runs[name]), 1
            ),
        }
        for name in names
        if runs[name]
    }
    report = {
        "benchmark": "LLAMA meta-step time and memory vs MAML (sinusoid: 25 tasks, 10+10 points, 1 inner step, second order)",
        "command": "python benchmarks/bench_llama.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": {
            "cpu": cpu_name(),
            "platform": platform.platform(),
            "torch_threads": args.threads,
        },
        "results": table,
        "targets": {
            "paper-ggn, paper-diag, paper-kfac": "<= 1.6x MAML",
            "predictive-*": "<= 2.5x MAML",
        },
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "llama.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        f"{'configuration':18s} {'ms/step':>9s} {'x MAML':>7s} {'peak RSS MB':>12s} {'+RSS MB':>8s}"
    )
    for name, row in table.items():
        print(
            f"{name:18s} {row['ms_per_step']:9.2f} {row['ratio_to_maml']:7.2f} {row['peak_rss_mb']:12.1f} {row['rss_increase_mb']:8.1f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
