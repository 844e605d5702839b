"""``python -m hierbayes omniglot``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hierbayes.experiments.omniglot.config import config_for, test_episodes
from hierbayes.experiments.omniglot.evaluation import load_run
from hierbayes.experiments.omniglot.figures import plot_episodes
from hierbayes.experiments.omniglot.training import format_report, run_omniglot
from hierbayes.inference import FitResult

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """``python -m hierbayes omniglot``."""
    p = sub.add_parser(
        "omniglot", help="N-way K-shot Omniglot: MAML or LLAMA with the 4-block conv network"
    )
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--method", default="maml", choices=["maml", "llama"])
    p.add_argument(
        "--config",
        default="cpu",
        choices=["cpu", "gpu"],
        help="cpu: <= 30 minutes on 2 cores (default); gpu: the MAML paper's settings on cuda",
    )
    p.add_argument("--meta-steps", type=int, default=None)
    p.add_argument("--meta-batch-size", type=int, default=None)
    p.add_argument("--query-shots", type=int, default=None, help="query images per class")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--eval-inner-steps", type=int, default=None)
    p.add_argument("--step-size", type=float, default=None, help="inner step on the mean NLL")
    p.add_argument(
        "--learn-step-size",
        default=None,
        choices=["fixed", "scalar", "per_parameter"],
        help="learn the inner step sizes (cpu default: per_parameter, Meta-SGD's preconditioner)",
    )
    p.add_argument(
        "--init",
        default=None,
        choices=["pretrained", "random"],
        help="where theta starts: the whole-class pretrained network (cpu default) or at random",
    )
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--max-shift", type=int, default=None, help="augmentation shift in pixels")
    p.add_argument("--second-order", action="store_true", help="second-order meta-gradients")
    p.add_argument("--eval-episodes", type=int, default=None)
    p.add_argument("--eval-query-shots", type=int, default=None)
    p.add_argument("--eval-chunk", type=int, default=None, help="test episodes per batch")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--objective", default=None, help="LLAMA's objective (default: paper)")
    p.add_argument("--curvature", default=None, help="LLAMA's curvature (default: fisher_diag)")
    p.add_argument("--predictive-samples", type=int, default=None)
    p.add_argument(
        "--llama-steps", type=int, default=None, help="LLAMA: final steps on the paper's loss"
    )
    p.add_argument("--llama-batch-size", type=int, default=None)
    p.add_argument(
        "--prior-scale",
        type=float,
        default=None,
        help="LLAMA: s of p(phi | theta) (default: chosen on training episodes)",
    )
    p.add_argument(
        "--warm-start",
        default=None,
        help="LLAMA: a MAML run's folder or model.pt to continue with --llama-steps of LLAMA",
    )
    p.add_argument(
        "--figure-with",
        type=Path,
        default=None,
        help="another run's folder (or model.pt): draw this run's test episodes beside it",
    )
    p.add_argument("--out", type=Path, default=Path("runs/omniglot"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="'cpu' or 'cuda' (default: the config's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: Any) -> dict[str, Any]:
    """Run ``python -m hierbayes omniglot`` from parsed arguments; print the report."""
    cfg = config_for(
        args.config,
        args.ways,
        args.shots,
        args.method,
        meta_steps=args.meta_steps,
        meta_batch_size=args.meta_batch_size,
        query_shots=args.query_shots,
        inner_steps=args.inner_steps,
        eval_inner_steps=args.eval_inner_steps,
        step_size=args.step_size,
        learn_step_size=args.learn_step_size,
        init=args.init,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_shift=args.max_shift,
        first_order=False if args.second_order else None,
        eval_episodes=args.eval_episodes,
        eval_query_shots=args.eval_query_shots,
        eval_chunk=args.eval_chunk,
        pretrain_steps=args.pretrain_steps,
        objective=args.objective,
        curvature=args.curvature,
        predictive_samples=args.predictive_samples,
        llama_steps=args.llama_steps,
        llama_batch_size=args.llama_batch_size,
        warm_start=args.warm_start,
        prior_scale=args.prior_scale,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    metrics, result = run_omniglot(cfg, args.out)
    print(format_report(metrics))
    figure = args.out / "episodes.png"
    runs: dict[str, FitResult | str | os.PathLike[str]] = {}
    if args.figure_with is not None:
        other = load_run(args.figure_with)
        runs[other.method] = other
    runs[cfg.method if cfg.method not in runs else f"{cfg.method} (this run)"] = result
    plot_episodes(
        runs,
        test_episodes(cfg),
        figure,
        episodes=min(cfg.plot_episodes, cfg.eval_episodes),
        inner_steps=cfg.eval_inner_steps,
    )
    print(f"\nwrote {args.out / 'metrics.json'}, {args.out / 'model.pt'} and {figure}")
    return metrics
