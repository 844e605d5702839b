r"""Hyperparameter uncertainty at Laplace cost against full-Bayes NUTS, on Minnesota radon.

The model is the contextual-effects model of issue 11, written as a plain Pyro program (counties
as tasks, every house in the support set, no query set):

.. math::

    \text{log\_radon}_i \sim \mathcal N(\alpha_{c(i)} + w_1 u_i + w_2\,\text{floor}_i
        + w_3\,\overline{\text{floor}}_{c(i)}, \sigma), \quad \alpha_c \sim \mathcal N(\mu, \tau),

with :math:`\mu, w \sim \mathcal N(0, 1)` and :math:`\tau, \sigma \sim` half-normal(0, 1).

Measured (one torch thread):

* **full Bayes**: :func:`hierbayes.inference.references.full_bayes.nuts_full_bayes`, Pyro's NUTS
  over the 6 globals and 85 county intercepts (``--chains`` × ``--draws`` after ``--warmup``):
  each county's posterior mean and sd, their Monte Carlo standard errors (sd/√ESS for the mean,
  sd/√(2·ESS) for the sd, the Gaussian approximation), R-hat, ESS, time; the posterior mean and
  median of :math:`\tau` and :math:`\mu`;
* **hyper-Laplace**: :func:`hierbayes.inference.posteriors.hyper_laplace` (cubature nodes; and importance-
  weighted draws), its time, and the largest county differences from NUTS: means (absolute) and
  sds (relative);
* **empirical Bayes**: the same Laplace posteriors at the single mode :math:`\hat u` (no
  hyperparameter uncertainty), and the coverage of NUTS' 90% intervals by its 90% intervals;
* **eight schools** (non-centred, :math:`\mu \sim \mathcal N(0, 5)`, :math:`\tau \sim`
  half-Cauchy(0, 5), posteriordb's ``eight_schools_noncentered``): full-Bayes posterior mean and
  median of :math:`\tau` and :math:`\mu`, for the MAP-II parametrisation comparison.

Usage::

    python benchmarks/bench_radon.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import commit, cpu_name

from hierbayes.inference.posteriors.hyper_laplace import hyper_laplace
from hierbayes.inference.references.full_bayes import nuts_full_bayes
from hierbayes.tasks import TaskBatch

ROOT = Path(__file__).resolve().parent.parent
DATA = [
    ROOT / "hierbayes" / "data" / "posteriordb",
    ROOT.parent / "shared" / "data" / "posteriordb",
]


def data_file(name: str) -> Path:
    for folder in DATA:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{name} not found in {[str(d) for d in DATA]}")


def radon_model(x: Tensor, y: Tensor | None = None) -> None:
    """Contextual effects: x holds (log uranium, floor, county mean floor) per house."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(x.new_ones(())))
    w = pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(alpha + x @ w, sigma), obs=y)


def radon_tasks() -> TaskBatch:
    """Counties as tasks, houses padded and masked, in the data file's county order."""
    d = json.loads(data_file("radon_mn_contextual_derived.json").read_text())
    county = torch.tensor(d["county_idx"]) - 1
    J = int(d["J"])
    counts = torch.bincount(county, minlength=J)
    N = int(counts.max())
    x = torch.zeros(J, N, 3, dtype=torch.float64)
    y = torch.zeros(J, N, dtype=torch.float64)
    mask = torch.zeros(J, N, dtype=torch.bool)
    filled = [0] * J
    for i in range(int(d["N"])):
        j = int(county[i])
        k = filled[j]
        filled[j] += 1
        x[j, k] = torch.tensor([d["log_uranium"][i], d["floor"][i], d["floor_by_county"][j]])
        y[j, k] = d["log_radon"][i]
        mask[j, k] = True
    return TaskBatch(x, y, support_mask=mask)


def eight_schools_model(x: Tensor, y: Tensor | None = None) -> None:
    """Non-centred eight schools: x holds each school's standard error."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0 * x.new_ones(())))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        eta = pyro.sample("eta", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mu + tau * eta, x[..., 0]), obs=y)


def eight_schools_tasks() -> TaskBatch:
    d = json.loads(data_file("eight_schools.json").read_text())
    sigma = torch.tensor(d["sigma"], dtype=torch.float64)
    y = torch.tensor(d["y"], dtype=torch.float64)
    return TaskBatch(sigma.reshape(-1, 1, 1), y.reshape(-1, 1))


def scalar_summary(draws: Tensor) -> dict[str, float]:
    flat = draws.double().flatten()
    return {
        "mean": float(flat.mean()),
        "median": float(flat.median()),
        "sd": float(flat.std()),
        "q05": float(flat.quantile(0.05)),
        "q95": float(flat.quantile(0.95)),
    }


def county_table(mean: Tensor, sd: Tensor) -> dict[str, list[float]]:
    return {"mean": [float(v) for v in mean], "sd": [float(v) for v in sd]}


def compare_to(
    name: str,
    mean: Tensor,
    sd: Tensor,
    ref_mean: Tensor,
    ref_sd: Tensor,
    ref_q: tuple[Tensor, Tensor] | None,
    mcse: Tensor | None = None,
) -> dict[str, Any]:
    """Largest county differences from NUTS, in the mean also in units of NUTS's Monte Carlo
    standard error where it is known, and the share of counties whose 90% interval contains
    NUTS's 90% interval."""
    z = 1.6448536269514722
    lower, upper = mean - z * sd, mean + z * sd
    covered = (
        None
        if ref_q is None
        else float(((lower <= ref_q[0]) & (upper >= ref_q[1])).double().mean())
    )
    rel = (sd / ref_sd - 1).abs()
    extra = {}
    if mcse is not None:
        extra["max_mean_difference_in_mcse"] = float(((mean - ref_mean).abs() / mcse).max())
    return {
        "approximation": name,
        "max_abs_mean_difference": float((mean - ref_mean).abs().max()),
        "mean_abs_mean_difference": float((mean - ref_mean).abs().mean()),
        "max_rel_sd_difference": float(rel.max()),
        "mean_rel_sd_difference": float(rel.mean()),
        "mean_sd_ratio": float((sd / ref_sd).mean()),
        "contains_nuts_90_interval": covered,
        **extra,
    }


def run_nuts(args: argparse.Namespace, tasks: TaskBatch) -> dict[str, Any]:
    """Full-Bayes NUTS on radon: the globals' summaries and each county's mean, sd, 90% interval
    and Monte Carlo standard error of the mean (sd / sqrt(bulk ESS))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nuts = nuts_full_bayes(
            radon_model,
            tasks,
            num_warmup=args.warmup,
            num_samples=args.draws,
            num_chains=args.chains,
            seed=args.seed,
        )
    draws = nuts.draws[..., 0].double()  # (C, S, T)
    flat = draws.reshape(-1, draws.shape[-1])
    ref_mean, ref_sd = flat.mean(0), flat.std(0)
    ess = nuts.diagnostics()["ess_bulk"][:, 0].double()
    mcse_mean = ref_sd / ess.sqrt()
    mcse_sd_rel = 1 / (2 * ess).sqrt()
    summary = nuts.summary()
    counties = county_table(ref_mean, ref_sd)
    counties["q05"] = flat.quantile(0.05, dim=0).tolist()
    counties["q95"] = flat.quantile(0.95, dim=0).tolist()
    counties["mcse_mean"] = mcse_mean.tolist()
    return {
        "wall_time": nuts.wall_time,
        "nuts": {
            "globals": nuts.global_summary(),
            "tau": scalar_summary(nuts.global_draws["tau"]),
            "mu": scalar_summary(nuts.global_draws["mu"]),
            "rhat_max": summary["rhat_max"],
            "ess_bulk_min": summary["ess_bulk_min"],
            "divergences": summary["divergences_total"],
            "globals_flagged": nuts.globals_flagged,
            "mcse_mean_max": float(mcse_mean.max()),
            "mcse_mean_median": float(mcse_mean.median()),
            "mcse_sd_relative_max": float(mcse_sd_rel.max()),
            "counties": counties,
        },
    }


def reuse_nuts(earlier: dict[str, Any]) -> dict[str, Any]:
    """The NUTS section of an earlier ``radon.json``."""
    return {"nuts": earlier["radon"]["nuts"]}


def run_eight_schools(args: argparse.Namespace) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        schools = nuts_full_bayes(
            eight_schools_model,
            eight_schools_tasks(),
            num_warmup=args.warmup,
            num_samples=args.draws,
            num_chains=args.chains,
            seed=args.seed,
            target_accept_prob=0.95,
        )
    ssum = schools.summary()
    return {
        "model": "non-centred; mu ~ N(0, 5), tau ~ HalfCauchy(5)",
        "tau": scalar_summary(schools.global_draws["tau"]),
        "mu": scalar_summary(schools.global_draws["mu"]),
        "globals": schools.global_summary(),
        "divergences": ssum["divergences_total"],
        "rhat_max": ssum["rhat_max"],
        "wall_seconds": schools.wall_time,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--importance-draws",
        type=int,
        default=2000,
        help="draws of the globals for the importance-weighted hyper-Laplace row",
    )
    parser.add_argument(
        "--nuts-from",
        default=None,
        help="reuse the NUTS references (radon and eight schools) of an earlier radon.json "
        "instead of sampling again (about 15 minutes); the approximations are re-measured",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(False)

    tasks = radon_tasks()
    report: dict[str, Any] = {
        "benchmark": "bench_radon",
        "commit": commit(),
        "machine": {
            "cpu": cpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "torch_threads": 1,
        },
        "settings": vars(args),
        "model": "radon contextual effects (issue 11), plain Pyro program, counties as tasks",
    }

    timings: dict[str, float] = {}
    started = time.perf_counter()
    hl = hyper_laplace(radon_model, tasks, quadrature="cubature")
    timings["hyper_laplace_cubature"] = time.perf_counter() - started
    started = time.perf_counter()
    hl_is = hyper_laplace(
        radon_model, tasks, quadrature="draws", num_nodes=args.importance_draws, importance=True
    )
    timings["hyper_laplace_draws_importance"] = time.perf_counter() - started
    print(f"hyper-Laplace: {timings}", flush=True)

    if args.nuts_from is not None:
        earlier = json.loads(Path(args.nuts_from).read_text())
        reference = reuse_nuts(earlier)
        timings["nuts_full_bayes"] = earlier["radon"]["timings_seconds"]["nuts_full_bayes"]
        report["nuts_from"] = {"path": args.nuts_from, "commit": earlier["commit"]}
    else:
        reference = run_nuts(args, tasks)
        timings["nuts_full_bayes"] = reference["wall_time"]
    print(f"NUTS: {timings['nuts_full_bayes']:.1f} s", flush=True)
    counties = reference["nuts"]["counties"]
    ref_mean = torch.tensor(counties["mean"])
    ref_sd = torch.tensor(counties["sd"])
    ref_q = (
        (torch.tensor(counties["q05"]), torch.tensor(counties["q95"]))
        if "q05" in counties
        else None
    )
    mcse = torch.tensor(counties["mcse_mean"]) if "mcse_mean" in counties else None

    posteriors = {
        "hyper_laplace_cubature": hl.task_posteriors,
        "hyper_laplace_draws_importance": hl_is.task_posteriors,
        "empirical_bayes_mode": hl.empirical_bayes,
    }
    comparison = [
        compare_to(name, p.mean[:, 0], p.sd[:, 0], ref_mean, ref_sd, ref_q, mcse)
        for name, p in posteriors.items()
    ]
    report["radon"] = {
        "timings_seconds": timings,
        "time_over_nuts": {
            name: timings[name] / timings["nuts_full_bayes"]
            for name in ("hyper_laplace_cubature", "hyper_laplace_draws_importance")
        },
        "importance_draws": args.importance_draws,
        "nuts": reference["nuts"],
        "hyper_laplace": {
            "u_labels": hl.labels,
            "u_mean": hl.mean.tolist(),
            "u_sd": hl.sd.tolist(),
            "globals_at_mode": {k: v.tolist() for k, v in hl.params.items()},
            "newton_steps": hl.newton_steps,
            "counties": county_table(hl.task_posteriors.mean[:, 0], hl.task_posteriors.sd[:, 0]),
        },
        "empirical_bayes": {
            "counties": county_table(hl.empirical_bayes.mean[:, 0], hl.empirical_bayes.sd[:, 0]),
        },
        "comparison_to_nuts": comparison,
    }
    for row in comparison:
        print(row, flush=True)

    report["eight_schools"] = (
        earlier["eight_schools"] if args.nuts_from is not None else run_eight_schools(args)
    )
    print(report["eight_schools"]["tau"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "radon.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'radon.json'}")
    return report


if __name__ == "__main__":
    main()
