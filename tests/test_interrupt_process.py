"""Real SIGINTs (os.kill) to a training process at random moments: each interrupted run,
resumed, equals a straight run bit for bit (issue 19, break 3), for LLAMA's sampled predictive
(torch's global generator draws at every step) and for MAML. The resume runs in the same
process, so Pyro state left broken by an interrupt (a plate left on its stack) would show too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

#: A training process: for each method, a straight run, then rounds that each train with a
#: checkpoint until a SIGINT from the test lands, resume in a fresh model, and compare.
_CHILD = textwrap.dedent(
    """
    import signal, sys, time, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from hierbayes.inference import MetaTrainingInterrupted, fit
    from tests.programs import family_program, family_tasks

    def ignore(signum, frame):  # a SIGINT that comes after a round
        pass

    signal.signal(signal.SIGINT, ignore)
    METHODS = {{
        "llama": dict(method="llama", objective="predictive", predictive="sampled",
                      num_samples=4),
        "maml": dict(method="maml"),
    }}
    directory, rounds = sys.argv[1], int(sys.argv[2])

    def run(method, **more):
        return fit(family_program("bernoulli"), family_tasks("bernoulli", T=6),
                   meta_steps={steps}, meta_batch_size=3, step_size=0.1, check_every=5,
                   progress=False, **METHODS[method], **more)

    def wait():
        if not sys.stdin.readline():  # the test ended
            raise SystemExit(0)

    def started(step, loss, result):
        if step == 0:
            print("started", flush=True)

    def clocked(step, loss, result):
        if step == 0:
            begun.append(time.perf_counter())

    begun = []

    for method in METHODS:
        wait()  # the signal of the last round has been handled
        straight = run(method, callback=clocked)
        print("straight", time.perf_counter() - begun[-1], flush=True)  # after step 0
        for round_ in range(rounds):
            wait()  # the test is ready to send the signal
            path = f"{{directory}}/{{method}}{{round_}}.pt"
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own
            try:
                try:
                    run(method, checkpoint=path, checkpoint_every=7, callback=started)
                finally:
                    signal.signal(signal.SIGINT, ignore)
            except MetaTrainingInterrupted as err:
                print("interrupted", len(err.result.history), flush=True)
            except KeyboardInterrupt:  # after the run returned
                print("done", flush=True)
                continue
            else:
                print("done", flush=True)
                continue
            resumed = run(method, resume=path)
            bad = [name for name, value in straight.params.items()
                   if not torch.equal(value, resumed.params[name])]
            if resumed.history != straight.history:
                bad.append("history")
            print("same" if not bad else "different: " + ", ".join(bad), flush=True)
    wait()  # (as above)
    """
)


def test_real_ctrl_c_at_random_moments_then_resume_equals_a_straight_run(tmp_path: Path) -> None:
    """A training process gets a real SIGINT (os.kill) at a random moment of each round, for
    LLAMA's sampled predictive (torch's global generator draws at every step) and for MAML; each
    interrupted run is resumed in a fresh model and must equal the straight run bit for bit."""
    rounds, steps = 3, 60
    script = tmp_path / "child.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(_CHILD.format(root=root, steps=steps))
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )
    moments = random.Random(19)
    outcomes: list[str] = []

    def say(text: str) -> None:
        assert child.stdin is not None
        child.stdin.write(text + "\n")
        child.stdin.flush()

    def hear() -> str:
        assert child.stdout is not None
        text = child.stdout.readline().strip()
        if not text:
            child.wait(timeout=60)
            raise AssertionError(f"the training process stopped: {errors.read_text()[-3000:]}")
        return text

    try:
        for method in ("llama", "maml"):
            say("go")
            kind, seconds = hear().split()
            assert kind == "straight"
            for round_ in range(rounds):
                say("go")
                assert hear() == "started"
                time.sleep(moments.uniform(0.0, 0.8) * float(seconds))
                os.kill(child.pid, signal.SIGINT)
                outcome = hear()
                outcomes.append(f"{method} {round_} ({seconds}s): {outcome}")
                if outcome.startswith("interrupted"):
                    assert hear() == "same", outcomes[-1]
        say("end")
    finally:
        child.communicate(timeout=60)  # closes the pipes; the child ends on its stdin's end
    assert child.returncode == 0, errors.read_text()[-3000:]
    interrupted = [o for o in outcomes if "interrupted" in o]
    assert len(interrupted) >= 3, outcomes  # most signals landed mid-run
