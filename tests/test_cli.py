"""The command line writes the promised metrics.json and figures, runs with a passive OpenMP
wait policy, and never changes the user's matplotlib backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hierbayes.__main__ import main


def test_sinusoid_command_writes_metrics_and_figure(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    out = tmp_path / "run"
    main(
        [
            "sinusoid",
            "--method",
            "maml",
            "--shots",
            "5",
            "--meta-steps",
            "30",
            "--eval-tasks",
            "40",
            "--pretrain-steps",
            "10",
            "--seed",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "maml" and metrics["shots"] == 5
    assert metrics["meta_steps"] == 30 and metrics["eval_tasks"] == 40
    assert set(metrics["mse"]) >= {"mean", "ci95"} and metrics["mse"]["n"] == 40
    for baseline in ("no_adaptation", "pretrain_finetune"):
        assert set(metrics["baselines"][baseline]["mse"]) >= {"mean", "ci95"}
    assert set(metrics["coverage"]) == {"0.5", "0.9"}
    assert set(metrics["coverage_by_task"]) == {"low", "mid", "high"}
    assert (out / "sinusoid_tasks.png").stat().st_size > 10_000


def _openmp_spin_counts(**env: str) -> list[str]:
    """``GOMP_SPINCOUNT`` as each GNU OpenMP runtime loaded by ``python -m hierbayes --help``
    reported it (``OMP_DISPLAY_ENV=VERBOSE``: libgomp prints its settings when it loads)."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environment.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    out = subprocess.run(
        [sys.executable, "-m", "hierbayes", "--help"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "usage: python -m hierbayes" in out.stdout
    counts = [
        line.split("=", 1)[1].strip()
        for line in out.stderr.splitlines()
        if "GOMP_SPINCOUNT" in line
    ]
    if not counts:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp, which reports GOMP_SPINCOUNT")
    return counts


def test_command_runs_with_passive_openmp_wait_policy() -> None:
    """The OpenMP runtime that runs the command saw OMP_WAIT_POLICY=PASSIVE (spin count 0).

    libgomp reads the variable when torch loads it, which ``import hierbayes`` does before
    ``hierbayes/__main__.py`` runs: a first runtime (libgomp's default spin count) belongs to the
    process that sets the variable and restarts, the last one to the command itself.
    """
    counts = _openmp_spin_counts()
    assert counts[-1] == "'0'" and len(counts) <= 2, counts


def test_command_keeps_the_users_openmp_wait_policy() -> None:
    """A wait policy set by the user is kept (ACTIVE spins), and the command does not restart."""
    counts = _openmp_spin_counts(OMP_WAIT_POLICY="ACTIVE")
    assert len(counts) == 1 and counts[0] != "'0'", counts


def test_drawing_figures_keeps_the_users_matplotlib_backend(tmp_path: Path) -> None:
    """Importing the plotting modules and drawing a figure leave the user's backend selected."""
    code = (
        "import sys\n"
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import hierbayes.experiments.plots\n"
        "from hierbayes.experiments.linear import plot_gd_paths\n"
        "imported = matplotlib.get_backend()\n"
        "plot_gd_paths(sys.argv[1])\n"
        "print(imported, matplotlib.get_backend())\n"
    )
    figure = tmp_path / "gd_paths.png"
    out = subprocess.run(
        [sys.executable, "-c", code, str(figure)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.split() == ["svg", "svg"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sinusoid_run_is_deterministic_on_cpu() -> None:
    """The demo's numbers are a function of the commit and the seed: two runs agree exactly
    (so BENCHMARKS.md's demo table, regenerated from a run, is what a fresh clone prints)."""
    from hierbayes.experiments.sinusoid import SinusoidConfig, run_sinusoid

    config = SinusoidConfig(
        method="llama",
        method_options={"objective": "predictive", "curvature": "ggn"},
        meta_steps=15,
        pretrain_steps=5,
        eval_tasks=12,
        plot_tasks=0,
        progress=False,
        predictive_samples=0,
    )
    first = {k: v for k, v in run_sinusoid(config).items() if not k.startswith("_")}
    second = {k: v for k, v in run_sinusoid(config).items() if not k.startswith("_")}
    for report in (first, second):  # wall-clock times are the only things allowed to differ
        for key in [k for k in report if "seconds" in k or "time" in k]:
            report.pop(key)
    assert first.keys() == second.keys()
    assert first == second
