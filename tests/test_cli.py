"""The command line writes the promised metrics.json and figures."""

from __future__ import annotations

import json
from pathlib import Path

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
