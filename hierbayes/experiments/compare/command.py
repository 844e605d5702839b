"""``python -m hierbayes compare``: both problems, ``metrics.json``, figures and tables."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hierbayes.experiments.compare.problems import run_linear, run_sinusoid
from hierbayes.experiments.compare.settings import CompareSettings

__all__ = ["add_parser", "run", "run_compare"]


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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand (with all its options) to ``subparsers``."""
    p = subparsers.add_parser(
        "compare",
        help="every posterior approximation beside NUTS references (Pyro, NumPyro), in ArviZ",
        description="Every posterior approximation beside NUTS, in ArviZ: a linear-Gaussian and "
        "a sinusoid problem, each meta-trained with MAML, then held-out tasks adapted by every "
        "method with the same globals.",
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
    if args.device != "cpu":
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
