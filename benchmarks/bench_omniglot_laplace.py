"""Does a Laplace task posterior calibrate Omniglot predictions? (BENCHMARKS §11)

For each saved run (a MAML or LLAMA ``model.pt`` folder), adapts to the 600 fixed held-out test
episodes (``--eval-inner-steps`` steps) and scores, on their queries, the point-mass predictive
and the sampled Laplace predictive N(φ̂, (F̂ + s⁻² I)⁻¹) (diagonal sampled Fisher of the
support set) for every prior scale s of ``--scales``: accuracy, NLL, ECE. Reading s off the
test episodes is an oracle (no run may choose it so); it bounds what the Laplace spread could
give, beside the runs' own choice of s on training episodes.

    python benchmarks/bench_omniglot_laplace.py runs/omniglot/v2-5way-maml-s0 ... \\
        --out benchmarks/results/omniglot/laplace_5way.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from hierbayes.experiments.omniglot import config_for, load_run, test_episodes
from hierbayes.experiments.omniglot.training import laplace_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--scales", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 0.1])
    p.add_argument("--eval-episodes", type=int, default=600)
    p.add_argument("--eval-inner-steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    report: dict[str, Any] = {"scales": args.scales, "runs": {}}
    for run in args.runs:
        t0 = time.perf_counter()
        result = load_run(run)
        ways = int(result.model.ways)
        cfg = config_for(
            "cpu",
            ways,
            1,
            result.method,
            eval_episodes=args.eval_episodes,
            eval_inner_steps=args.eval_inner_steps,
            predictive_samples=args.samples,
        )
        scores = laplace_scores(result, test_episodes(cfg), cfg, args.scales)
        row = {
            k: {"accuracy": v["accuracy"]["mean"], "nll": v["nll"]["mean"], "ece": v["ece"]}
            for k, v in scores.items()
        }
        report["runs"][str(run)] = {"ways": ways, "method": result.method, "scores": row}
        report["runs"][str(run)]["seconds"] = time.perf_counter() - t0
        print(run, json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
