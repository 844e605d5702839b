"""Data-parallel meta-training throughput: meta-steps/s and tasks/s with 1 and 2 ranks.

Workload (Omniglot, Finn et al. 2017): ``ConvClassifier(5)``, the 4-block convolutional
network (64 filters, batch norm, stride-2 downsampling) on 28x28 images; 5-way 1-shot
episodes with 2 query images per class, a meta-batch of 32 episodes; one first-order inner
step of 0.4 on the mean support NLL; Adam (the training settings of ``python -m hierbayes
omniglot --config cpu`` with the MAML paper's meta-batch of 32). The images are random: the
compute does not depend on pixel values, and the timing then needs no dataset.

Each configuration runs under ``torchrun`` (``--nproc_per_node`` = ranks), so the launch
path users take is the one measured; ``fit(..., distributed=None)`` turns data-parallel
training on by itself when ``WORLD_SIZE > 1``. Rank 0 times every meta-step with ``fit``'s
callback; the first ``--warmup`` steps are dropped and the median step time of the rest
reported. Configurations run in interleaved rounds (drifting machine load hits all alike).
Usage::

    python benchmarks/bench_distributed.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from _machine import commit, cpu_name  # benchmarks/ is the script's own folder

import hierbayes
from hierbayes.inference import FitResult, fit
from hierbayes.models import ConvClassifier
from hierbayes.tasks import EpisodicSampler

WAYS, SHOTS, QUERY, META_BATCH = 5, 1, 2, 32
#: (ranks, torch threads per rank)
CONFIGS = ((1, 1), (1, 2), (2, 1))


def worker(steps: int, warmup: int, out: Path, device: str) -> None:
    """One rank of a timed run (started by torchrun)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(100 * 20, 1, 28, 28, generator=gen)
    labels = torch.arange(100).repeat_interleave(20)
    tasks = EpisodicSampler(images, labels, ways=WAYS, shots=SHOTS, query_shots=QUERY)
    stamps: list[float] = []

    def tick(step: int, loss: float, result: FitResult) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    torch.manual_seed(0)
    start = time.perf_counter()
    result = fit(
        ConvClassifier(WAYS),
        tasks,
        method="maml",
        meta_steps=warmup + steps,
        meta_batch_size=META_BATCH,
        inner_steps=1,
        step_size=0.4,
        inner_loss="mean",
        first_order=True,
        lr=1e-3,
        device=device,
        dtype=torch.float32,
        progress=False,
        check_every=0,
        callback=tick,
    )
    gaps = [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(
            json.dumps(
                {
                    "seconds_per_step": gaps,
                    "final_loss": result.history[-1],
                    "wall_seconds": time.perf_counter() - start,
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    "threads": torch.get_num_threads(),
                }
            )
        )


def launch(ranks: int, threads: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Run :func:`worker` under ``torchrun --nproc_per_node=ranks``; rank 0's timings."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "timing.json"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
        command = [
            str(torchrun),
            f"--nproc_per_node={ranks}",
            "--standalone",
            __file__,
            "--worker",
            f"--steps={steps}",
            f"--warmup={warmup}",
            f"--threads={threads}",
            f"--device={device}",
            f"--timing={out}",
        ]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        timing: dict[str, Any] = json.loads(out.read_text())
        return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed meta-steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-steps first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for distributed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--timing", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        worker(args.steps, args.warmup, args.timing, args.device)
        return

    rounds: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for ranks, threads in CONFIGS:
            name = f"{ranks}_rank{'s' if ranks > 1 else ''}_x_{threads}_thread{'s' if threads > 1 else ''}"
            timing = launch(ranks, threads, args.steps, args.warmup, args.device)
            median = statistics.median(timing["seconds_per_step"])
            rounds.setdefault(name, []).append(median)
            losses[name] = timing["final_loss"]
            print(f"round {r}: {name}: {1 / median:.3f} meta-steps/s ({median:.3f} s a step)")
    summary = {
        name: {
            "meta_steps_per_second": round(1 / statistics.median(times), 3),
            "tasks_per_second": round(META_BATCH / statistics.median(times), 2),
            "seconds_per_meta_step": round(statistics.median(times), 4),
            "rounds_seconds_per_meta_step": [round(t, 4) for t in times],
            "final_loss": losses[name],
        }
        for name, times in rounds.items()
    }
    base = summary["1_rank_x_1_thread"]["meta_steps_per_second"]
    for entry in summary.values():
        entry["speedup_vs_1_rank_x_1_thread"] = round(entry["meta_steps_per_second"] / base, 3)
    report = {
        "benchmark": (
            f"Omniglot meta-step, data-parallel over ranks ({WAYS}-way {SHOTS}-shot, {QUERY} query "
            f"per class, meta-batch {META_BATCH}, ConvClassifier(5): 4 conv blocks, 64 filters, "
            "batch norm, 28x28; 1 first-order inner step; Adam)"
        ),
        "data": "random 28x28 images in an EpisodicSampler (100 classes x 20): compute does not "
        "depend on pixel values",
        "launcher": "torchrun --nproc_per_node=ranks; gloo on CPU; OMP_NUM_THREADS = threads",
        "command": "python benchmarks/bench_distributed.py "
        f"--steps {args.steps} --warmup {args.warmup} --rounds {args.rounds} --device {args.device}",
        "commit": commit(),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "device": args.device,
            # other processes on the machine: the 1-minute load average at the start and end
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "versions": {
            "hierbayes": hierbayes.__version__,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
        },
        "results": summary,
    }
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out / 'distributed.json'}")


if __name__ == "__main__":
    main()
