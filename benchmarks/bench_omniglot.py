"""Meta-steps per second on Omniglot: the batched grouped-convolution path against a task loop.

Workload (Finn et al. 2017): 1-shot episodes of ``images_background_small1`` with rotations,
one query image per class, the 4-block conv network of
:class:`hierbayes.models.ConvClassifier` (64 filters, stride 2, batch norm with each task's own
statistics), one inner step of 0.4 on the mean support cross-entropy, Adam on theta; 5-way with
32 tasks a meta-batch and 20-way with 16 tasks, first and second order. Both implementations
optimise the same objective on the same episodes:

* ``batched``: hierbayes' own functions (``adapt_tasks`` and the model's native log density,
  what ``fit`` runs): every task at once, each convolution one grouped ``conv2d`` call;
* ``task_loop``: a Python loop over tasks with ``torch.func.functional_call`` on the same
  module (what learn2learn's ``clone()``/``adapt()`` amounts to).

Rounds are interleaved (every configuration once a round) so drifting machine load hits all
alike; the median over rounds is reported. Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_omniglot.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from _machine import commit, cpu_name  # benchmarks/ is the script's own folder
from torch.func import functional_call

import hierbayes
from hierbayes.inference.core.inner_loop import adapt_tasks
from hierbayes.models import ConvClassifier, model_structure
from hierbayes.tasks import EpisodicSampler, load_omniglot

STEP = 0.4
SETTINGS = {5: 32, 20: 16}  # ways: tasks a meta-batch


def batched(steps: int, sampler: EpisodicSampler, tasks: int, second: bool, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ConvClassifier(sampler.ways)
    first = sampler.sample(tasks, generator=gen)
    density = model.task_density(model_structure(model, first.support_x, first.support_y))
    theta = model.theta_init.clone().requires_grad_(True)
    optim = torch.optim.Adam([theta], lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        b = sampler.sample(tasks, generator=gen)
        params = {"theta": theta}
        phi = adapt_tasks(
            density,
            params,
            b.support_x,
            b.support_y,
            steps=1,
            step_size=STEP,
            first_order=not second,
            loss="mean",
        )
        assert b.query_x is not None and b.query_y is not None
        loss = -density.log_likelihood(params, phi, b.query_x, b.query_y).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        float(loss.detach())
    return steps / (time.perf_counter() - start)


def task_loop(steps: int, sampler: EpisodicSampler, tasks: int, second: bool, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ConvClassifier(sampler.ways)
    net = model.net.module
    names = [n for n, _ in net.named_parameters()]
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        b = sampler.sample(tasks, generator=gen)
        assert b.query_x is not None and b.query_y is not None
        loss = torch.zeros(())
        for j in range(tasks):
            params = dict(net.named_parameters())
            support = F.cross_entropy(
                functional_call(net, params, (b.support_x[j],)), b.support_y[j]
            )
            grads = torch.autograd.grad(support, list(params.values()), create_graph=second)
            fast = {n: params[n] - STEP * g for n, g in zip(names, grads, strict=True)}
            loss = loss + F.cross_entropy(
                functional_call(net, fast, (b.query_x[j],)), b.query_y[j], reduction="sum"
            )
        loss = loss / tasks
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        float(loss.detach())
    return steps / (time.perf_counter() - start)


IMPLEMENTATIONS: dict[str, Callable[[int, EpisodicSampler, int, bool, int], float]] = {
    "batched": batched,
    "task_loop": task_loop,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="meta-steps per round and case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_omniglot("images_background_small1", rotations=True)
    samplers = {w: data.episodes(ways=w, shots=1, query_shots=1) for w in SETTINGS}
    cases = [
        (f"{w}-way/{'second' if second else 'first'}-order/{name}", w, second, impl)
        for w in SETTINGS
        for second in (False, True)
        for name, impl in IMPLEMENTATIONS.items()
    ]
    rates: dict[str, list[float]] = {key: [] for key, *_ in cases}
    for _, w, second, impl in cases:  # warm-up
        impl(1, samplers[w], SETTINGS[w], second, 0)
    for r in range(args.rounds):
        for key, w, second, impl in cases:
            rates[key].append(impl(args.steps, samplers[w], SETTINGS[w], second, r))
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in rates.items()),
            flush=True,
        )
    median = {k: statistics.median(v) for k, v in rates.items()}
    speedup = {
        f"{w}-way/{order}-order": round(
            median[f"{w}-way/{order}-order/batched"] / median[f"{w}-way/{order}-order/task_loop"],
            2,
        )
        for w in SETTINGS
        for order in ("first", "second")
    }
    report = {
        "benchmark": "Omniglot meta-step, conv4 (64 filters, BN), 1-shot, 1 query per class, "
        "1 inner step; 5-way x 32 tasks, 20-way x 16 tasks",
        "command": "OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_omniglot.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "commit": commit(),
        "machine": {
            "cpu": cpu_name(),
            "platform": platform.platform(),
            "torch_threads": args.threads,
        },
        "versions": {
            "hierbayes": hierbayes.__version__,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
        },
        "meta_steps_per_second": {k: round(v, 3) for k, v in median.items()},
        "batched_over_loop": speedup,
        "rounds": {k: [round(x, 3) for x in v] for k, v in rates.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "omniglot_speed.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["meta_steps_per_second"], indent=2))
    print(json.dumps(speedup, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
