"""A real Ctrl-C at any moment, then a resume, takes exactly the steps of a straight run (issue
19, break 3): the interrupted run is saved at a step boundary, with the random generators, the
optimiser and the history as they were there.

The workload draws from torch's global generator at every step (LLAMA's sampled predictive on a
plain Bernoulli program) and from the task sampler's, so a state saved mid-step would show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hierbayes.inference import FitResult, MetaTrainingInterrupted, fit
from tests.programs import family_program, family_tasks

N = 8
OPTIONS: dict[str, Any] = dict(
    method="llama",
    objective="predictive",
    num_samples=4,
    meta_steps=N,
    meta_batch_size=3,
    step_size=0.1,
    check_every=2,
    progress=False,
)


def _run(**options: Any) -> FitResult:
    return fit(
        family_program("bernoulli"), family_tasks("bernoulli", T=6), **{**OPTIONS, **options}
    )


def _same(a: FitResult, b: FitResult) -> None:
    assert a.history == b.history
    for name, value in a.params.items():
        assert torch.equal(value, b.params[name]), name


def _interrupt_then_resume(tmp_path: Path, resume: dict[str, Any], **options: Any) -> FitResult:
    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted) as info:
        _run(checkpoint=path, **options)
    assert 0 < len(info.value.result.history) < N
    return _run(resume=path, **resume)


class _SignalInStep:
    """An optimiser that raises SIGINT in the middle of its own update (after some parameters
    moved) at its ``at``-th step, as a real Ctrl-C may land."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, parameters: list[torch.Tensor]) -> torch.optim.Optimizer:
        at = self.at

        class Interrupted(torch.optim.Adam):
            steps = 0

            def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
                out = super().step(closure)
                Interrupted.steps += 1
                if Interrupted.steps == at:
                    signal.raise_signal(signal.SIGINT)
                return out

        return Interrupted(parameters, lr=1e-3)


def test_a_sigint_inside_the_optimisers_update_waits_for_the_step(tmp_path: Path) -> None:
    straight = _run(optimizer=_SignalInStep(10**9))
    resumed = _interrupt_then_resume(
        tmp_path, {"optimizer": _SignalInStep(10**9)}, optimizer=_SignalInStep(3)
    )
    _same(resumed, _run(optimizer=_SignalInStep(10**9)))
    _same(resumed, straight)


def test_a_sigint_inside_the_loss_rolls_the_step_back(tmp_path: Path) -> None:
    """SIGINT while the loss of step 3 is computed: the task sampler and torch's generator have
    drawn for that step already; the saved run is the state after step 2."""
    calls = [0]
    program = family_program("bernoulli")

    def interrupting(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        calls[0] += 1
        if calls[0] == 40:
            signal.raise_signal(signal.SIGINT)
        program(x, y)

    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted) as info:
        fit(interrupting, family_tasks("bernoulli", T=6), checkpoint=path, **OPTIONS)
    assert 0 < len(info.value.result.history) < N
    resumed = fit(program, family_tasks("bernoulli", T=6), resume=path, **OPTIONS)
    _same(resumed, _run())


def test_a_sigint_inside_the_schedule_waits_for_the_step(tmp_path: Path) -> None:
    def schedule(optimizer: torch.optim.Optimizer) -> Any:
        class Interrupted(torch.optim.lr_scheduler.StepLR):
            def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
                super().step(epoch)
                if self.last_epoch == 4:
                    signal.raise_signal(signal.SIGINT)

        return Interrupted(optimizer, step_size=3, gamma=0.5)

    def plain(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    resumed = _interrupt_then_resume(tmp_path, {"lr_scheduler": plain}, lr_scheduler=schedule)
    _same(resumed, _run(lr_scheduler=plain))


_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from hierbayes.inference import MetaTrainingInterrupted, fit
    from tests.programs import family_program, family_tasks
    options = dict(method="llama", objective="predictive", num_samples=4, meta_steps={steps},
                   meta_batch_size=3, step_size=0.1, check_every=2, progress=False)
    path, mode = sys.argv[1], sys.argv[2]
    def started(step, loss, result):
        if step == 0:
            print("started", flush=True)
    try:
        if mode == "resume":
            result = fit(family_program("bernoulli"), family_tasks("bernoulli", T=6),
                         resume=path, **options)
        else:
            result = fit(family_program("bernoulli"), family_tasks("bernoulli", T=6),
                         checkpoint=path if mode == "checkpoint" else None, callback=started,
                         **options)
        torch.save({{"history": result.history, "params": result.params}}, path + ".out")
        print("done", len(result.history), flush=True)
    except MetaTrainingInterrupted as err:
        print("interrupted", len(err.result.history), flush=True)
    """
)


def _child(tmp_path: Path, steps: int) -> Path:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(Path(__file__).resolve().parents[1]), steps=steps))
    return script


def _python(script: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def test_real_ctrl_c_at_random_moments_then_resume_equals_a_straight_run(tmp_path: Path) -> None:
    """A separate process trains with a checkpoint and gets a real SIGINT (os.kill) at a
    different moment each round; each is resumed to the end in a new process and compared with
    a straight run bit for bit."""
    steps = 150
    script = _child(tmp_path, steps)
    straight = tmp_path / "straight.pt"
    _finish(_python(script, str(straight), "plain"))
    reference = torch.load(str(straight) + ".out", weights_only=True)
    interrupted = 0
    for round_, delay in enumerate((0.0, 0.05, 0.13, 0.31)):
        path = tmp_path / f"run{round_}.pt"
        child = _python(script, str(path), "checkpoint")
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGINT)
        out = _finish(child)
        if out.startswith("done"):  # finished before the signal: nothing to resume
            continue
        assert out.startswith("interrupted"), out
        interrupted += 1
        _finish(_python(script, str(path), "resume"))
        got = torch.load(str(path) + ".out", weights_only=True)
        assert got["history"] == reference["history"], f"round {round_}"
        for name, value in reference["params"].items():
            assert torch.equal(got["params"][name], value), f"round {round_}: {name}"
    assert interrupted >= 2  # the signal landed mid-run in most rounds
