r"""``python -m hierbayes compare``: every posterior approximation beside NUTS, in ArviZ.

Two problems, each meta-trained with MAML (:func:`~hierbayes.inference.training.fit`), then a few held-out
tasks adapted by every method with the same :math:`\hat\theta` (and noise scale):

* **linear**: Bayesian linear regression (:class:`~hierbayes.models.BayesianLinearRegression`,
  ``D = 4``), where the exact posterior :math:`\mathcal N(H^{-1}(X^\top y/\sigma^2 +
  \hat\theta/s^2),\, H^{-1})`, :math:`H = X^\top X/\sigma^2 + I/s^2`, joins as the row ``exact``;
* **sinusoid**: the 1-40-40-1 ReLU network of Finn et al. (2017) (``D = 1761``) on 10-shot
  sinusoid tasks, after a short MAML run.

Rows: ``maml`` (the point mass), ``laplace_<curvature>`` (see :func:`laplace_approximations`),
``meanfield_vi``, ``nuts_pyro``, ``nuts_numpyro`` (the reference) and, for the linear problem,
``exact``. :func:`~hierbayes.inference.evaluation.compare.compare_approximations` scores them; ``DIR``
receives ``metrics.json``::

    {"linear":   {"approximations": {"maml": {...}, ...}, "reference": ..., ...},
     "sinusoid": {"approximations": {...}, ...},
     "settings": {...}}

with, per approximation, the table's columns, per-task values and the paths of its figures
(``<problem>_forest.png`` shared by all rows, ``<problem>_posterior_<name>.png``).

The sinusoid posterior is hard for NUTS (trees of 1023 leapfrog steps at every draw); on this
project's 2-core machine Pyro's sampler costs about 0.36 ms per gradient against about 45 µs
for NumPyro's (``benchmarks/bench_nuts.py``), so its row there is a shorter run
(``sinusoid_pyro_samples`` = 25 warm-up steps and draws, 2 chains, against NumPyro's 150 and 4
chains). Expect :math:`\hat R > 1.01` at these budgets: the output flags it
(``reference_flagged``, a warning), it is not hidden. On the linear problem both engines get
the same budget.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hierbayes.inference import FitResult, TaskPosterior, fit, linear_gaussian
from hierbayes.inference.evaluation.compare import ComparisonResult, compare_approximations
from hierbayes.inference.posteriors.samples import GaussianPosterior
from hierbayes.inference.reference.meanfield import meanfield_vi
from hierbayes.inference.reference.nuts import nuts_numpyro, nuts_pyro
from hierbayes.models import BayesianLinearRegression, GaussianLikelihood, NeuralRegression
from hierbayes.tasks import SinusoidTasks, TaskBatch

__all__ = [
    "CompareSettings",
    "add_parser",
    "exact_linear_posterior",
    "laplace_approximations",
    "linear_tasks",
    "run",
    "run_compare",
]

#: Seed of the held-out tasks (the same for every run of the command).
HELDOUT_SEED = 20180430


@dataclass
class CompareSettings:
    """Sizes of one ``compare`` run (defaults: a few minutes on two CPU cores)."""

    seed: int = 0
    tasks: int = 3
    num_samples: int = 300
    num_chains: int = 4
    draws_per_chain: int = 200
    meanfield_steps: int = 2000
    # linear problem (both NUTS engines: num_samples warm-up steps and draws, num_chains chains)
    linear_input_dim: int = 3
    linear_shots: int = 5
    linear_query: int = 20
    linear_train_tasks: int = 200
    linear_meta_steps: int = 300
    linear_noise: float = 0.5
    # sinusoid problem (NumPyro: sinusoid_num_samples; Pyro: a shorter run, module docstring)
    sinusoid_shots: int = 10
    sinusoid_query: int = 20
    sinusoid_meta_steps: int = 2000
    sinusoid_tasks: int | None = 2
    sinusoid_num_samples: int = 150
    sinusoid_pyro_samples: int = 25
    sinusoid_pyro_chains: int = 2
    sinusoid_max_tree_depth: int = 10
    progress: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> CompareSettings:
        """Seconds-long sizes for tests."""
        base = cls(
            tasks=2,
            num_samples=60,
            num_chains=2,
            draws_per_chain=30,
            meanfield_steps=100,
            linear_train_tasks=50,
            linear_meta_steps=20,
            sinusoid_meta_steps=10,
            sinusoid_tasks=1,
            sinusoid_query=10,
            sinusoid_num_samples=30,
            sinusoid_pyro_samples=10,
            sinusoid_max_tree_depth=4,
        )
        return replace(base, **overrides)


# -- data and closed forms -------------------------------------------------------------------


def linear_tasks(
    num_tasks: int,
    *,
    shots: int,
    query: int,
    input_dim: int,
    noise_scale: float,
    generator: torch.Generator,
    task_scale: float = 0.7,
) -> TaskBatch:
    r"""Linear-Gaussian tasks :math:`y = x^\top w_j + b_j + \sigma\epsilon`, with
    :math:`(w_j, b_j) \sim \mathcal N(\theta^*, 0.7^2 I)` around a fixed
    :math:`\theta^* = (1, -0.5, 0.25, \ldots, 0.5)` and :math:`x \sim \mathcal N(0, I)`."""
    D = input_dim + 1
    center = torch.tensor([(-0.5) ** i for i in range(input_dim)] + [0.5])
    phi = center + task_scale * torch.randn(num_tasks, D, generator=generator)
    x = torch.randn(num_tasks, shots + query, input_dim, generator=generator)
    f = (x * phi[:, None, :input_dim]).sum(-1, keepdim=True) + phi[:, None, input_dim:]
    y = f + noise_scale * torch.randn(f.shape, generator=generator)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def exact_linear_posterior(
    model: BayesianLinearRegression,
    params: Mapping[str, torch.Tensor],
    tasks: TaskBatch,
    *,
    density: Any = None,
) -> GaussianPosterior:
    r"""The exact posterior of each task of :class:`~hierbayes.models.BayesianLinearRegression`
    given its support set and the globals (MATH.md §3):

    .. math::

        H = \tilde X^\top \tilde X/\sigma^2 + I/s^2, \qquad
        \Sigma = H^{-1}, \qquad \mu = \Sigma(\tilde X^\top y/\sigma^2 + \hat\theta/s^2),

    with :math:`\tilde X = [X, 1]` when the model has a bias (the layout of ``nn.Linear``:
    weights, then bias), from :func:`hierbayes.inference.linear_gaussian.posterior`. Its
    ``predict`` is linearised, which is exact here.
    """
    x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask
    features = linear_gaussian.design_matrix(x, bias=model.bias)
    if mask is not None:  # a padded point contributes a zero row
        features = features * mask[..., None].to(features)
        y = y * mask[..., None].to(y)
    likelihood = model.likelihood
    if not isinstance(likelihood, GaussianLikelihood) or getattr(likelihood, "per_task", False):
        raise TypeError(
            f"the exact posterior needs a Gaussian likelihood with a global noise scale; got "
            f"{likelihood!r}"
        )
    scale = model.prior_scale_of(params)
    D = features.shape[-1]
    exact = linear_gaussian.posterior(
        model.theta_of(params),
        features,
        y,
        noise_scale=likelihood.scale(params),
        prior_precision=torch.eye(D, dtype=features.dtype, device=features.device) / scale**2,
    )
    mean, covariance = exact.mean, exact.covariance
    if density is None:
        from hierbayes.models.contract import model_structure

        density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    return GaussianPosterior(density, params, mean, covariance, predict_method="linearized")


# -- the Laplace hook --------------------------------------------------------------------------


def laplace_approximations(result: FitResult, tasks: TaskBatch) -> dict[str, Any]:
    r"""LAPLACE HOOK: ``{"laplace_<curvature>": posterior}`` for the held-out ``tasks``.

    The single place where the Laplace rows (issue #4) join the comparison. Return a
    :class:`~hierbayes.inference.TaskPosterior` per curvature (``LaplacePosterior`` with
    ``.covariance()``), or ``(posterior, seconds)`` to report its wall time; a posterior's own
    ``wall_time`` attribute is used otherwise. Rows are compared with their default
    ``predict`` (linearised for Laplace). Returning ``{}`` leaves the rows out.

    Each Laplace row is the classical approximation: centred at the task's posterior mode
    (three Newton steps with the row's own curvature, from MAML's adapted point; one step is
    exact for the linear model), with that curvature's covariance. ``full`` joins where
    ``D <= 200`` (the linear problem).
    """
    import warnings

    from hierbayes.inference.posteriors.laplace import laplace_posterior

    density = result.guide.density
    curvatures = ["ggn", "kfac", "diag"]
    if density.structure.num_params <= 200:
        curvatures.append("full")
    start = result.adapt(tasks).mean
    rows: dict[str, Any] = {}
    for curvature in curvatures:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an indefinite Hessian is repaired
            posterior = laplace_posterior(
                density,
                result.params,
                start,
                tasks.support_x,
                tasks.support_y,
                tasks.support_mask,
                curvature=curvature,
                refine_steps=3,
            )
        rows[f"laplace_{curvature}"] = (posterior, time.perf_counter() - started)
    return rows


# -- one problem -------------------------------------------------------------------------------


def _timed(make: Callable[[], TaskPosterior]) -> tuple[TaskPosterior, float]:
    started = time.perf_counter()
    posterior = make()
    return posterior, time.perf_counter() - started


def _approximations(
    result: FitResult,
    heldout: TaskBatch,
    settings: CompareSettings,
    *,
    numpyro_samples: int,
    pyro_samples: int,
    pyro_chains: int,
    max_tree_depth: int = 10,
) -> tuple[dict[str, TaskPosterior], dict[str, float]]:
    """The rows every problem shares: maml, the Laplace hook, mean-field VI and both NUTS."""
    density, params, seed = result.guide.density, result.params, settings.seed
    posteriors: dict[str, TaskPosterior] = {}
    times: dict[str, float] = {}
    posteriors["maml"], times["maml"] = _timed(lambda: result.adapt(heldout))
    started = time.perf_counter()
    extra = laplace_approximations(result, heldout)
    hook_seconds = time.perf_counter() - started
    for name, value in extra.items():
        if isinstance(value, tuple):
            posteriors[name], times[name] = value[0], float(value[1])
        else:
            posteriors[name] = value
            own = getattr(value, "wall_time", None)
            times[name] = float(own) if own is not None else hook_seconds / max(1, len(extra))
    posteriors["meanfield_vi"] = meanfield_vi(
        density, params, heldout, num_steps=settings.meanfield_steps, seed=seed
    )
    posteriors["nuts_pyro"] = nuts_pyro(
        density,
        params,
        heldout,
        num_warmup=pyro_samples,
        num_samples=pyro_samples,
        num_chains=pyro_chains,
        seed=seed,
        max_tree_depth=max_tree_depth,
    )
    posteriors["nuts_numpyro"] = nuts_numpyro(
        result.model,
        params,
        heldout,
        num_warmup=numpyro_samples,
        num_samples=numpyro_samples,
        num_chains=settings.num_chains,
        seed=seed,
        max_tree_depth=max_tree_depth,
    )
    return posteriors, times


def _problem_report(
    comparison: ComparisonResult, result: FitResult, extra: Mapping[str, Any]
) -> dict[str, Any]:
    report = comparison.to_dict()
    report["meta_training"] = {
        "meta_steps": len(result.history),
        "final_loss": float(sum(result.history[-20:]) / max(1, len(result.history[-20:]))),
        "seconds": round(result.wall_time, 2),
        "globals": {
            name: (
                value.tolist() if value.numel() <= 8 else f"tensor of shape {tuple(value.shape)}"
            )
            for name, value in result.params.items()
        },
    }
    report.update(extra)
    return report


def run_linear(settings: CompareSettings, out: Path) -> tuple[dict[str, Any], ComparisonResult]:
    """The linear-Gaussian problem; returns its report and comparison."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(settings.seed)

    def tasks_of(num_tasks: int, generator: torch.Generator) -> TaskBatch:
        return linear_tasks(
            num_tasks,
            shots=settings.linear_shots,
            query=settings.linear_query,
            input_dim=settings.linear_input_dim,
            noise_scale=settings.linear_noise,
            generator=generator,
        ).to(dtype=dtype)

    train = tasks_of(settings.linear_train_tasks, g)
    heldout = tasks_of(settings.tasks, torch.Generator().manual_seed(HELDOUT_SEED))
    model = BayesianLinearRegression(
        settings.linear_input_dim, bias=True, noise_scale=settings.linear_noise
    )
    result = fit(
        model,
        train,
        meta_steps=settings.linear_meta_steps,
        meta_batch_size=25,
        inner_steps=1,
        step_size=0.01,
        lr=0.02,
        seed=settings.seed,
        dtype=dtype,
        progress=settings.progress,
    )
    posteriors, times = _approximations(
        result,
        heldout,
        settings,
        numpyro_samples=settings.num_samples,
        pyro_samples=settings.num_samples,
        pyro_chains=settings.num_chains,
    )
    exact, times["exact"] = _timed(
        lambda: exact_linear_posterior(model, result.params, heldout, density=result.guide.density)
    )
    posteriors["exact"] = exact
    problem = (
        f"Bayesian linear regression, D = {settings.linear_input_dim + 1}, "
        f"{settings.linear_shots}-shot, {settings.tasks} held-out tasks"
    )
    return _compare(posteriors, times, heldout, result, settings, out, "linear", problem)


def _compare(
    posteriors: dict[str, TaskPosterior],
    times: dict[str, float],
    heldout: TaskBatch,
    result: FitResult,
    settings: CompareSettings,
    out: Path,
    name: str,
    problem: str,
) -> tuple[dict[str, Any], ComparisonResult]:
    """Score one problem's approximations against NumPyro's NUTS, save figures, report."""
    comparison = compare_approximations(
        posteriors,
        heldout,
        reference="nuts_numpyro",
        num_draws=settings.draws_per_chain,
        num_chains=settings.num_chains,
        seed=settings.seed,
        wall_times=times,
    )
    comparison.save_figures(out, prefix=f"{name}_")
    return _problem_report(comparison, result, {"problem": problem}), comparison


def run_sinusoid(settings: CompareSettings, out: Path) -> tuple[dict[str, Any], ComparisonResult]:
    """The sinusoid problem; returns its report and comparison."""
    dtype = torch.float64
    num_tasks = settings.sinusoid_tasks or settings.tasks
    source = SinusoidTasks(shots=settings.sinusoid_shots, query_shots=settings.sinusoid_query)
    heldout = source.sample(
        num_tasks, generator=torch.Generator().manual_seed(HELDOUT_SEED), dtype=dtype
    )
    torch.manual_seed(settings.seed)  # the network's initialisation, theta_0
    # prior scale 0.1 (prior precision 100), the LLAMA default: with s = 1 the 1761-dimensional
    # posterior is so broad that every Gaussian and sampled predictive is poor
    model = NeuralRegression(prior_scale=0.1)
    result = fit(
        model,
        source,
        meta_steps=settings.sinusoid_meta_steps,
        meta_batch_size=25,
        inner_steps=1,
        step_size=2 * 0.01 / settings.sinusoid_shots,
        lr=1e-3,
        seed=settings.seed,
        dtype=dtype,
        progress=settings.progress,
    )
    posteriors, times = _approximations(
        result,
        heldout,
        settings,
        numpyro_samples=settings.sinusoid_num_samples,
        pyro_samples=settings.sinusoid_pyro_samples,
        pyro_chains=settings.sinusoid_pyro_chains,
        max_tree_depth=settings.sinusoid_max_tree_depth,
    )
    problem = (
        f"sinusoid, 1-40-40-1 ReLU (D = {model.num_params}), "
        f"{settings.sinusoid_shots}-shot, {num_tasks} held-out tasks"
    )
    return _compare(posteriors, times, heldout, result, settings, out, "sinusoid", problem)


def run_compare(
    settings: CompareSettings,
    out: str | Path,
    *,
    problems: tuple[str, ...] = ("linear", "sinusoid"),
) -> dict[str, Any]:
    """Run the comparison; write ``out/metrics.json`` and the figures; return the report."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    tables: dict[str, str] = {}
    runners = {"linear": run_linear, "sinusoid": run_sinusoid}
    for problem in problems:
        report[problem], comparison = runners[problem](settings, folder)
        tables[problem] = comparison.format()
    report["settings"] = asdict(settings)
    (folder / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    report["_tables"] = tables
    return report


# -- command line ------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand (with all its options) to ``subparsers``."""
    p = subparsers.add_parser(
        "compare",
        help="every posterior approximation beside NUTS references (Pyro, NumPyro), in ArviZ",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=int, default=None, help="held-out tasks (default 3; 2 quick)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="NUTS draws (and as many warm-up steps) per chain on the linear problem (default "
        "300); the sinusoid gets half of them for NumPyro (150) and a twelfth for Pyro (25)",
    )
    p.add_argument("--quick", action="store_true", help="seconds-long sizes (used by the tests)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", default="cpu", help="only 'cpu' is supported by this command")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``compare`` from parsed arguments; print the tables; return the report."""
    if getattr(args, "device", "cpu") != "cpu":
        raise ValueError("python -m hierbayes compare runs on the CPU only (--device cpu)")
    overrides: dict[str, Any] = {"seed": args.seed, "progress": not args.no_progress}
    if args.tasks is not None:
        overrides["tasks"] = args.tasks
        overrides["sinusoid_tasks"] = args.tasks
    if args.num_samples is not None:
        overrides["num_samples"] = args.num_samples
        overrides["sinusoid_num_samples"] = max(10, args.num_samples // 2)
        overrides["sinusoid_pyro_samples"] = max(10, args.num_samples // 12)
    settings = (
        CompareSettings.quick(**overrides)
        if args.quick
        else replace(CompareSettings(), **overrides)
    )
    report = run_compare(settings, args.out)
    for problem, table in report.pop("_tables").items():
        print(f"== {problem}: {report[problem]['problem']}")
        print(table)
        print()
    print(f"wrote {Path(args.out) / 'metrics.json'} and figures in {args.out}/")
    return report
