"""Command line: ``python -m hierbayes {demo,sinusoid,...} --out DIR``.

Every command writes ``DIR/metrics.json`` (and figures) and prints a short report.

The commands run with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set (idle
OpenMP threads sleep instead of spinning; BENCHMARKS.md was measured so). OpenMP reads the
variable once, when torch loads its runtime, and ``python -m hierbayes`` imports the
``hierbayes`` package, and with it torch, before this module runs. So when the variable is
unset the command sets it and, on POSIX systems, restarts the interpreter once with the same
arguments; on other systems set it in the environment before starting Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

__all__ = ["console_main", "main"]


def _use_passive_openmp_wait_policy() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set, restarting if torch is already loaded.

    Runs only when this module is the program (``python -m hierbayes`` or the ``hierbayes``
    script), never on import or from :func:`main`. The restart replaces the process
    (:func:`os.execv`) with the same interpreter, interpreter options and arguments
    (:data:`sys.orig_argv`); the variable is set by then, so it happens at most once.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules and os.name == "posix" and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


if __name__ == "__main__":
    _use_passive_openmp_wait_policy()


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _add_common(p: argparse.ArgumentParser, *, out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small-op meta-learning runs fastest on one)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _sinusoid_parser(sub: Any) -> None:
    p = sub.add_parser("sinusoid", help="K-shot sinusoid regression (Finn et al. 2017)")
    p.add_argument("--method", default="maml", help="a registered method (maml, llama)")
    p.add_argument("--shots", type=int, default=10, help="support points per task (K)")
    p.add_argument("--query-shots", type=int, default=10)
    p.add_argument("--meta-steps", type=int, default=30000)
    p.add_argument("--meta-batch-size", type=int, default=25)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument(
        "--inner-lr",
        type=float,
        default=0.01,
        help="MAML's inner learning rate on the support MSE (default 0.01); the guide's step on "
        "the summed log likelihood is 2*inner_lr/K",
    )
    p.add_argument(
        "--learn-step-size",
        default="fixed",
        choices=["fixed", "scalar", "per_parameter"],
        help="fixed (MAML), scalar, or per_parameter (Meta-SGD: a learned diagonal preconditioner)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's meta learning rate")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="steps of the pretrain baseline (default: --meta-steps)",
    )
    p.add_argument("--plot-tasks", type=int, default=4)
    llama = p.add_argument_group("LLAMA (--method llama)")
    llama.add_argument(
        "--objective",
        default="predictive",
        choices=["predictive", "evidence", "paper"],
        help="linearised Laplace predictive NLL (default, calibrated), full Laplace evidence, or "
        "the paper's query NLL + eta * log det H",
    )
    llama.add_argument("--curvature", default="ggn", help="ggn (default), kfac, diag or full")
    llama.add_argument(
        "--eta", type=float, default=1e-6, help="weight of log det H in the paper's loss"
    )
    llama.add_argument("--curvature-data", default=None, choices=["support", "query", "both"])
    llama.add_argument(
        "--no-compare-maml", action="store_true", help="skip the MAML run of the same budget"
    )
    llama.add_argument(
        "--predictive-samples",
        type=int,
        default=100,
        help="draws for the sampled predictive (0: skip)",
    )
    p.add_argument(
        "--prior-scale",
        type=float,
        default=0.1,
        help="s in p(phi | theta) = N(theta, s^2 I) (LLAMA's prior precision is 1/s^2)",
    )
    p.add_argument(
        "--fixed-prior-scale",
        action="store_true",
        help="keep s fixed (by default LLAMA's predictive and evidence objectives learn it)",
    )
    p.add_argument(
        "--prior-scale-hyperprior",
        default="none",
        help="scale of the LogNormal hyperprior on a learned prior scale, or 'none' for none",
    )
    p.add_argument(
        "--inner-loss",
        default="mse",
        choices=["sum", "mean", "mse"],
        help="the inner step's loss: MAML's support MSE with --inner-lr as the step (default; "
        "independent of the learned noise), the summed log likelihood, or its per-point mean",
    )
    p.add_argument(
        "--per-task-noise",
        action="store_true",
        help="give each task its own noise scale, adapted with the network (a calibration remedy)",
    )
    _add_common(p, out="runs/sinusoid")


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the embedded demo: MAML and LLAMA on 10-shot sinusoid tasks, with baselines"
    )
    p.add_argument("--meta-steps", type=int, default=30000)
    p.add_argument("--eval-tasks", type=int, default=600)
    _add_common(p, out="runs/demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hierbayes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _sinusoid_parser(sub)
    from hierbayes.experiments import compare, linear, omniglot, radon

    linear.add_parser(sub)
    compare.add_parser(sub)
    omniglot.add_parser(sub)
    radon.add_parser(sub)
    return parser


def _run_sinusoid(args: argparse.Namespace) -> dict[str, Any]:
    from hierbayes.experiments.sinusoid import SinusoidConfig, format_report, run_sinusoid

    options: dict[str, Any] = {}
    if args.method == "llama":
        options = dict(objective=args.objective, curvature=args.curvature)
        if args.objective == "paper":
            options["eta"] = args.eta
        if args.curvature_data is not None:
            options["curvature_data"] = args.curvature_data
    config = SinusoidConfig(
        method=args.method,
        shots=args.shots,
        query_shots=args.query_shots,
        meta_steps=args.meta_steps,
        meta_batch_size=args.meta_batch_size,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        lr=args.lr,
        eval_tasks=args.eval_tasks,
        pretrain_steps=args.pretrain_steps,
        seed=args.seed,
        device=args.device,
        plot_tasks=args.plot_tasks,
        progress=not args.no_progress,
        per_task_noise=args.per_task_noise,
        prior_scale=args.prior_scale,
        learn_prior_scale=not args.fixed_prior_scale,
        prior_scale_hyperprior=(
            None
            if args.prior_scale_hyperprior.lower() == "none"
            else float(args.prior_scale_hyperprior)
        ),
        inner_loss=args.inner_loss,
        method_options=options,
        learn_step_size=args.learn_step_size,
        compare_maml=not args.no_compare_maml,
        predictive_samples=args.predictive_samples,
    )
    report = run_sinusoid(config, args.out)
    print(format_report([report]))
    figures = ", ".join(report.get("figures", []))
    print(f"\nwrote {args.out / 'metrics.json'}" + (f" and {figures}" if figures else ""))
    return report


def _run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from hierbayes.experiments.sinusoid import SinusoidConfig, format_report, run_sinusoid

    common = dict(
        meta_steps=args.meta_steps,
        eval_tasks=args.eval_tasks,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    maml_config = SinusoidConfig(method="maml", **common)
    print(
        f"== MAML: meta-training {maml_config.meta_steps} steps on {maml_config.shots}-shot sinusoid tasks"
    )
    maml = run_sinusoid(maml_config, args.out / "maml")
    llama_config = SinusoidConfig(
        method="llama", method_options=dict(objective="predictive", curvature="ggn"), **common
    )
    print(
        f"== LLAMA (linearised Laplace predictive, GGN): meta-training {llama_config.meta_steps} steps"
    )
    llama = run_sinusoid(
        llama_config,
        args.out / "llama",
        maml_result=maml["_results"]["maml"],
        pretrained_result=maml["_results"]["pretrained"],
    )
    reports = [maml, llama]
    print()
    print(format_report(reports))
    summary = {r["method"]: {k: v for k, v in r.items() if not k.startswith("_")} for r in reports}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {args.out / 'metrics.json'} and a figure per method under {args.out}/")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(args.threads)
    from hierbayes.experiments import compare, linear, omniglot, radon

    handlers = {
        "demo": _run_demo,
        "sinusoid": _run_sinusoid,
        "linear": linear.run,
        "compare": compare.run,
        "omniglot": omniglot.run,
        "radon": radon.run,
    }
    with _outputs_on_rank_zero(args):
        handlers[args.command](args)
    return 0


@contextmanager
def _outputs_on_rank_zero(args: argparse.Namespace) -> Iterator[None]:
    """Under ``torchrun`` every rank runs the command (``fit`` shares each meta-batch among
    them) and rank 0 alone writes: the others write ``--out`` into a temporary folder that is
    removed afterwards, print nothing and show no progress bars."""
    from hierbayes.inference.training.launch import is_main_process

    if is_main_process():
        yield
        return
    with (
        tempfile.TemporaryDirectory(prefix="hierbayes-rank-") as scratch,
        open(os.devnull, "w") as silent,
        redirect_stdout(silent),
    ):
        if hasattr(args, "out"):
            args.out = Path(scratch) / "out"
        if hasattr(args, "no_progress"):
            args.no_progress = True
        yield


def console_main() -> int:
    """The ``hierbayes`` console script: :func:`main` with ``OMP_WAIT_POLICY=PASSIVE`` (above)."""
    _use_passive_openmp_wait_policy()
    return main()


if __name__ == "__main__":
    sys.exit(main())
