"""A real Ctrl-C at any moment, then a resume, takes exactly the steps of a straight run (issue
19, break 3): the interrupted run is saved at a step boundary, with the random generators, the
optimiser and the history as they were there.

The workload draws from torch's global generator at every step (LLAMA's sampled predictive on a
plain Bernoulli program) and from the task sampler's, so a state saved mid-step would show.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.runtime import am_i_wrapped

from hierbayes.errors import UnconvergedWarning
from hierbayes.inference import FitResult, MetaTrainingInterrupted, fit
from hierbayes.inference.training import loop as loop_module
from tests.programs import family_program, family_tasks

N = 8
OPTIONS: dict[str, Any] = dict(
    method="llama",
    objective="predictive",
    predictive="sampled",
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


class _SignalOnEntry(pyro.plate):
    """A data plate that gets a SIGINT once it has entered Pyro's handler stack, at its
    ``at``-th entry: a real Ctrl-C lands at any bytecode, Pyro's own included."""

    entries = 0
    at = 0

    def __enter__(self) -> Any:
        entered = super().__enter__()
        type(self).entries += 1
        if type(self).entries == type(self).at:
            signal.raise_signal(signal.SIGINT)
        return entered


def test_a_sigint_inside_pyros_own_code_leaves_pyro_clean(tmp_path: Path) -> None:
    """A SIGINT raised as an exception inside a plate's ``__enter__`` leaves the plate on Pyro's
    stack and its dimension taken (its ``__exit__`` never runs): every later run in the process
    failed with "duplicate plate 'data'". The interrupt now waits for the step's computation."""

    class Plate(_SignalOnEntry):
        at = 30

    def program(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            eta = x[..., 0] * phi[..., 0] + phi[..., 1]
            with Plate("data", x.shape[1], dim=-1):
                pyro.sample("y", dist.Bernoulli(logits=eta), obs=None if y is None else y[..., 0])

    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted) as info:
        fit(program, family_tasks("bernoulli", T=6), checkpoint=path, **OPTIONS)
    assert 0 < len(info.value.result.history) < N
    assert not am_i_wrapped()  # nothing of the interrupted run is left on Pyro's stack
    _same(fit(program, family_tasks("bernoulli", T=6), resume=path, **OPTIONS), _run())


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


class _InterruptAt:
    """A ``callback`` that stops the run after meta-step ``at`` (its commit is done), by a
    ``KeyboardInterrupt`` of its own or by a real SIGINT."""

    def __init__(self, at: int, signal_it: bool) -> None:
        self.at, self.signal_it = at, signal_it

    def __call__(self, step: int, loss: float, result: FitResult) -> None:
        if step != self.at:
            return
        if self.signal_it:
            signal.raise_signal(signal.SIGINT)
        else:
            raise KeyboardInterrupt


@pytest.mark.parametrize("at", [3, N - 1], ids=["mid-run", "last step"])
@pytest.mark.parametrize("signal_it", [False, True], ids=["raised", "signalled"])
def test_a_ctrl_c_in_the_callback_keeps_the_step_it_follows(
    tmp_path: Path, signal_it: bool, at: int
) -> None:
    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted) as info:
        _run(checkpoint=path, callback=_InterruptAt(at, signal_it))
    assert len(info.value.result.history) == at + 1  # the callback runs after the step
    assert len(torch.load(path, weights_only=True)["history"]) == at + 1
    _same(_run(resume=path), _run())


def test_a_second_ctrl_c_while_the_first_waits_raises_at_once(tmp_path: Path) -> None:
    """The first SIGINT inside the loss waits for the step's computation to end; a second one
    (the user insists) is raised where it lands; both leave the run at the step's start."""
    calls = [0]
    program = family_program("bernoulli")
    ran_on: list[str] = []

    def interrupting(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        calls[0] += 1
        if calls[0] == 30:
            signal.raise_signal(signal.SIGINT)
            ran_on.append("after the first")
            signal.raise_signal(signal.SIGINT)
            ran_on.append("after the second")
        program(x, y)

    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted) as info:
        fit(interrupting, family_tasks("bernoulli", T=6), checkpoint=path, **OPTIONS)
    assert ran_on == ["after the first"]
    assert 0 < len(info.value.result.history) < N
    _same(fit(program, family_tasks("bernoulli", T=6), resume=path, **OPTIONS), _run())


def test_a_sigint_inside_the_inner_loop_check_rolls_the_step_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of step 4 (check_every=2) runs after the step's batch was drawn."""
    check = loop_module.check_inner_loop

    def interrupting(guide: Any, batch: Any, step: int) -> None:
        check(guide, batch, step)
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop_module, "check_inner_loop", interrupting)
    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted) as info:
        _run(checkpoint=path)
    assert len(info.value.result.history) == 4
    monkeypatch.setattr(loop_module, "check_inner_loop", check)
    _same(_run(resume=path), _run())


def test_a_second_ctrl_c_waits_for_the_interrupted_runs_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second SIGINT while the interrupted run is being saved does not cut the write (it used
    to, and the run was saved a second time by the caller)."""
    save = FitResult.save
    writes: list[str] = []

    def impatient(self: FitResult, path: str | os.PathLike[str]) -> Path:
        writes.append(os.fspath(path))
        if len(writes) == 1:
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, as the write begins
        return save(self, path)

    monkeypatch.setattr(FitResult, "save", impatient)
    path = tmp_path / "run.pt"
    with pytest.raises(MetaTrainingInterrupted, match="saved at"):
        _run(checkpoint=path, callback=_InterruptAt(2, signal_it=False))
    assert writes == [str(path)]  # written once, whole
    monkeypatch.setattr(FitResult, "save", save)
    _same(_run(resume=path), _run())


def test_a_sigint_in_a_full_batch_lbfgs_run_stops_between_iterations(tmp_path: Path) -> None:
    """The L-BFGS path (full_batch=True) takes the same guard: a SIGINT inside the model stops
    the run between iterations, Pyro's stack is clean, and resuming equals resuming a run that
    stopped at that iteration by itself."""
    program = family_program("normal")
    options: dict[str, Any] = dict(method="maml", full_batch=True, progress=False)
    calls = [0]

    def interrupting(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        calls[0] += 1
        if calls[0] == 12:
            signal.raise_signal(signal.SIGINT)
        program(x, y)

    with pytest.raises(MetaTrainingInterrupted) as info:
        fit(
            interrupting,
            family_tasks("normal", T=6),
            meta_steps=10,
            checkpoint=tmp_path / "interrupted.pt",
            **options,
        )
    done = len(info.value.result.history)
    assert 0 < done < 5 and not am_i_wrapped()
    with pytest.warns(UnconvergedWarning):  # it stopped at meta_steps, as it was told
        fit(
            program,
            family_tasks("normal", T=6),
            meta_steps=done,
            checkpoint=tmp_path / "s.pt",
            **options,
        )
    a, b = (
        fit(program, family_tasks("normal", T=6), meta_steps=10, resume=tmp_path / name, **options)
        for name in ("interrupted.pt", "s.pt")
    )
    _same(a, b)
