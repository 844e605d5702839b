"""Meta-steps per second on the sinusoid workload: hierbayes beside two hand-written MAMLs.

Workload (Finn et al. 2017): 25 tasks a meta-batch, 10 support + 10 query points, the 1-40-40-1
ReLU network, one inner step, second order, Adam. Every implementation optimises the same
objective (query Gaussian NLL with a learned noise scale, inner step on the summed support log
likelihood) and draws its tasks from the same ``SinusoidTasks`` source every step.

* ``hierbayes_fit``: ``hierbayes.inference.training.fit`` (the guide's inner loop and the model's
  native log density; no Pyro handler active);
* ``hierbayes_svi``: ``pyro.infer.SVI(model, guide, Adam, loss=MAMLObjective())``, i.e. the
  guide traced as a Pyro program at every step;
* ``bare_batched``: batched torch written here by hand (``baddbmm``, one autograd call per step);
* ``per_task_loop``: a loop over tasks with ``torch.func.functional_call``, what learn2learn's
  ``clone()``/``adapt()`` does (learn2learn 0.2.0 does not build on Python 3.11).
* ``hierbayes_svi_unvalidated``: the same with ``pyro.enable_validation(False)``.

Rounds are interleaved (A B C D, A B C D, ...) so drifting machine load hits all alike; the
median over rounds is reported. Usage::

    python benchmarks/bench_meta_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from _machine import commit, cpu_name  # benchmarks/ is the script's own folder
from torch import Tensor, nn
from torch.func import functional_call

import hierbayes
from hierbayes.inference import MAMLObjective, TruncatedGradientGuide, fit
from hierbayes.models import NeuralRegression, sinusoid_network
from hierbayes.tasks import SinusoidTasks, TaskBatch

TASKS, SHOTS, QUERY, STEP = 25, 10, 10, 0.002
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_nll(f: Tensor, y: Tensor, log_sigma: Tensor) -> Tensor:
    return (0.5 * ((y - f) / log_sigma.exp()) ** 2 + log_sigma + HALF_LOG_2PI).sum()


def bare_batched(steps: int, source: SinusoidTasks, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = sinusoid_network()
    sizes = [p.numel() for p in net.parameters()]
    theta = torch.cat([p.detach().flatten() for p in net.parameters()]).requires_grad_(True)
    log_sigma = torch.zeros((), requires_grad=True)
    optim = torch.optim.Adam([theta, log_sigma], lr=1e-3)

    def forward(phi: Tensor, x: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3 = torch.split(phi, sizes, dim=-1)
        T = phi.shape[0]
        h = torch.baddbmm(b1.unsqueeze(1), x, w1.view(T, 40, 1).transpose(1, 2)).relu()
        h = torch.baddbmm(b2.unsqueeze(1), h, w2.view(T, 40, 40).transpose(1, 2)).relu()
        return torch.baddbmm(b3.unsqueeze(1), h, w3.view(T, 1, 40).transpose(1, 2))

    start = time.perf_counter()
    for _ in range(steps):
        b = source.sample(TASKS, generator=gen)
        phi = theta.expand(TASKS, -1)
        support_nll = gaussian_nll(forward(phi, b.support_x), b.support_y, log_sigma)
        (g,) = torch.autograd.grad(support_nll, phi, create_graph=True)
        phi = phi - STEP * g
        loss = gaussian_nll(forward(phi, b.query_x), b.query_y, log_sigma) / TASKS
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        float(loss.detach())
    return steps / (time.perf_counter() - start)


def per_task_loop(steps: int, source: SinusoidTasks, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = sinusoid_network()
    log_sigma = nn.Parameter(torch.zeros(()))
    optim = torch.optim.Adam([*net.parameters(), log_sigma], lr=1e-3)
    names = [n for n, _ in net.named_parameters()]
    start = time.perf_counter()
    for _ in range(steps):
        b = source.sample(TASKS, generator=gen)
        loss = torch.zeros(())
        for j in range(TASKS):
            params = dict(net.named_parameters())
            nll = gaussian_nll(
                functional_call(net, params, (b.support_x[j],)), b.support_y[j], log_sigma
            )
            grads = torch.autograd.grad(nll, list(params.values()), create_graph=True)
            fast = {n: params[n] - STEP * g for n, g in zip(names, grads, strict=True)}
            loss = loss + gaussian_nll(
                functional_call(net, fast, (b.query_x[j],)), b.query_y[j], log_sigma
            )
        loss = loss / TASKS
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        float(loss.detach())
    return steps / (time.perf_counter() - start)


def hierbayes_fit(steps: int, source: SinusoidTasks, seed: int) -> float:
    result = fit(
        NeuralRegression(),
        source,
        meta_steps=steps,
        meta_batch_size=TASKS,
        step_size=STEP,
        seed=seed,
        progress=False,
    )
    return steps / result.wall_time


def hierbayes_svi(steps: int, source: SinusoidTasks, seed: int, validate: bool = True) -> float:
    pyro.clear_param_store()
    pyro.enable_validation(validate)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = NeuralRegression()
    guide = TruncatedGradientGuide(model, source.sample(TASKS, generator=gen), step_size=STEP)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=MAMLObjective())
    start = time.perf_counter()
    for _ in range(steps):
        batch: TaskBatch = source.sample(TASKS, generator=gen)
        svi.step(batch)
    rate = steps / (time.perf_counter() - start)
    pyro.enable_validation(True)  # Pyro's default
    return rate


def hierbayes_svi_unvalidated(steps: int, source: SinusoidTasks, seed: int) -> float:
    """The same, with Pyro's distribution validation off (``pyro.enable_validation(False)``,
    what Pyro's documentation advises once a model is debugged)."""
    return hierbayes_svi(steps, source, seed, validate=False)


IMPLEMENTATIONS: dict[str, Callable[[int, SinusoidTasks, int], float]] = {
    "hierbayes_fit": hierbayes_fit,
    "bare_batched": bare_batched,
    "per_task_loop": per_task_loop,
    "hierbayes_svi": hierbayes_svi,
    "hierbayes_svi_unvalidated": hierbayes_svi_unvalidated,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="meta-steps per round")
    parser.add_argument(
        "--loop-steps", type=int, default=60, help="meta-steps per round of the slow per-task loop"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = SinusoidTasks(shots=SHOTS, query_shots=QUERY)
    rates: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS.values():  # warm-up
        impl(10, source, 0)
    for r in range(args.rounds):
        for name, impl in IMPLEMENTATIONS.items():
            steps = args.loop_steps if name == "per_task_loop" else args.steps
            rates[name].append(impl(steps, source, r))
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items())
        )
    median = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "benchmark": "sinusoid meta-step (25 tasks, 10+10 points, 1 inner step, second order)",
        "command": "python benchmarks/bench_meta_step.py "
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
        "meta_steps_per_second": {k: round(v, 1) for k, v in median.items()},
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratios": {
            "hierbayes_fit_over_per_task_loop": round(
                median["hierbayes_fit"] / median["per_task_loop"], 2
            ),
            "bare_batched_over_hierbayes_fit": round(
                median["bare_batched"] / median["hierbayes_fit"], 3
            ),
            "bare_batched_over_hierbayes_svi_unvalidated": round(
                median["bare_batched"] / median["hierbayes_svi_unvalidated"], 3
            ),
            "bare_batched_over_hierbayes_svi": round(
                median["bare_batched"] / median["hierbayes_svi"], 3
            ),
        },
        "targets": {
            "hierbayes_fit_over_per_task_loop": ">= 6",
            "bare_batched_over_hierbayes_fit": "<= 1.15",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "meta_step.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["meta_steps_per_second"], indent=2))
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
