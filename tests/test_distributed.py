"""Data-parallel meta-training: 2 ranks x T/2 tasks give what 1 process x T tasks gives.

One launch of two CPU processes (gloo, ``torch.multiprocessing.spawn``) runs every scenario
in turn, so the test costs one interpreter start-up per rank: MAML with learned per-parameter
step sizes, LLAMA's Laplace evidence with a learned noise and prior scale (and a meta-batch of
5 shared 3 + 2), resuming across world sizes, ranks that disagree on a setting, a rank that
fails during set-up, and a rank that dies mid-run. The single-process references run here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from hierbayes.inference import FitResult, fit
from hierbayes.inference.training.distributed import (
    DistributedContext,
    DistributedTrainingError,
)
from hierbayes.models import BayesianLinearRegression, NeuralRegression
from hierbayes.tasks import SinusoidTasks, TaskCollection
from tests.helpers import regression_batch, tiny_mlp

STEPS = 4
#: float64 sums in a different order: rounding only.
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def maml(**options: Any) -> FitResult:
    return fit(
        NeuralRegression(tiny_mlp(6)),
        SinusoidTasks(shots=5, query_shots=5),
        method="maml",
        meta_batch_size=4,
        step_size=0.02,
        learn_step_size="per_parameter",  # learned step sizes are trained parameters too
        lr=0.01,
        dtype=torch.float64,
        progress=False,
        check_every=2,
        **{"meta_steps": STEPS, **options},
    )


def llama(**options: Any) -> FitResult:
    batch = regression_batch(T=12, d=2, seed=3)
    tasks = TaskCollection.from_tensors(
        batch.support_x, batch.support_y, batch.query_x, batch.query_y, dtype=torch.float64
    )
    model = BayesianLinearRegression(
        2, bias=True, learn_noise=True, learn_prior_scale=True, noise_scale=0.5
    )
    return fit(
        model,
        tasks,  # 12 tasks: the hyperprior enters with weight 1/12
        method="llama",
        objective="evidence",
        meta_batch_size=5,  # shared 3 + 2 by two ranks
        step_size=0.05,
        lr=0.02,
        dtype=torch.float64,
        progress=False,
        **{"meta_steps": STEPS, **options},
    )


def values(result: FitResult) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in result.params.items()},
        "guide": {k: v.detach().clone() for k, v in result.guide.state_dict().items()},
        "history": list(result.history),
    }


def _worker(rank: int, world: int, port: int, folder: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        HIERBAYES_DIST_TIMEOUT="60",
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    out: dict[str, Any] = {}
    out["maml"] = values(maml())  # distributed=None: on, as WORLD_SIZE is 2
    out["llama"] = values(llama(distributed=True))
    out["maml_second_half"] = values(maml(resume=folder / "half_1process.pt"))
    maml(
        meta_steps=STEPS // 2, checkpoint=folder / "half_2ranks.pt", metrics_log=folder / "m.jsonl"
    )
    out["metrics_rows"] = len((folder / "m.jsonl").read_text().splitlines())
    try:
        maml(seed=rank)
    except DistributedTrainingError as err:
        out["mismatch"] = str(err)
    try:
        maml(resume=folder / ("missing.pt" if rank == 1 else "half_1process.pt"))
    except Exception as err:
        out["setup"] = f"{type(err).__name__}: {err}"
    torch.save(out, folder / f"rank{rank}.pt")

    def die(step: int, loss: float, result: FitResult) -> None:
        if rank == 1 and step == 1:
            os._exit(0)  # a rank that vanishes without a word

    try:
        maml(callback=die)
    except DistributedTrainingError as err:
        out["died"] = str(err)
    torch.save(out, folder / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_two_ranks(folder: Path) -> list[dict[str, Any]]:
    """Every scenario of :func:`_worker` on two gloo ranks; what each rank recorded."""
    maml(meta_steps=STEPS // 2, checkpoint=folder / "half_1process.pt")
    mp.spawn(_worker, args=(2, _free_port(), folder), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert_close(a["params"][name], b["params"][name], **TOLERANCE, msg=name)
    for name in a["guide"]:
        assert_close(a["guide"][name], b["guide"][name], **TOLERANCE, msg=name)
    assert_close(torch.tensor(a["history"]), torch.tensor(b["history"]), **TOLERANCE)


def test_two_gloo_ranks_train_as_one_process_and_stop_together(tmp_path: Path) -> None:
    # one launch for every scenario (a test each would start the two processes again under
    # pytest-xdist, which gives each worker its own fixtures)
    first, second = ranks = launch_two_ranks(tmp_path)

    # 2 ranks x T/2 tasks = 1 process x T tasks, for MAML (learned step sizes) and LLAMA
    # (Laplace evidence, learned noise and prior scale, a hyperprior, a 3 + 2 share)
    for method, run in (("maml", maml), ("llama", llama)):
        single = values(run())
        assert single["history"][-1] < single["history"][0]  # it did train
        for rank in ranks:
            assert_same_run(rank[method], single)
        # every rank holds the global (all-reduced) loss, bit for bit
        assert first[method]["history"] == second[method]["history"]

    # checkpoints resume across world sizes: 1 process -> 2 ranks, and 2 ranks -> 1 process
    straight = values(maml())
    assert_same_run(first["maml_second_half"], straight)
    assert_same_run(values(maml(resume=tmp_path / "half_2ranks.pt")), straight)
    assert first["metrics_rows"] == STEPS // 2  # one metrics log, from rank 0 only

    # ranks that disagree on a setting stop with the field named, on every rank
    for rank in ranks:
        assert "the ranks disagree on seed: rank 0 has 0, rank 1 has 1" in rank["mismatch"]

    # a rank failing in set-up stops the other with its error; a rank dying mid-run too
    assert second["setup"].startswith("CheckpointError: no saved run at")
    assert first["setup"].startswith("DistributedTrainingError: rank 1 of 2 failed while")
    assert "CheckpointError: no saved run at" in first["setup"]
    assert first["died"].startswith("rank 0 of 2: ") and "Another rank has stopped" in first["died"]


def test_a_meta_batch_is_shared_in_contiguous_near_equal_parts() -> None:
    def shares(n: int, world: int) -> list[tuple[int, int]]:
        return [
            (s.start, s.stop)
            for s in (
                DistributedContext(r, world, r, torch.device("cpu"), "gloo", 1.0).share(n)
                for r in range(world)
            )
        ]

    assert shares(5, 2) == [(0, 3), (3, 5)]
    assert shares(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert shares(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(DistributedTrainingError, match="at least one task"):
        shares(1, 2)


@pytest.mark.slow
def test_the_sinusoid_command_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 -m hierbayes sinusoid``: rank 0 writes and prints, and
    its figures equal a one-process run's (float32: to rounding)."""
    import json
    import subprocess
    import sys

    args = ["sinusoid", "--meta-steps", "20", "--eval-tasks", "10", "--plot-tasks", "0"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    torchrun = Path(sys.executable).with_name("torchrun")
    launch = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "hierbayes"]
    two = subprocess.run(
        [*launch, *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "hierbayes", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        check=True,
    )
    assert two.stdout.count("wrote ") == 1  # rank 1 prints nothing
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.json"]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    both = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert both["mse"]["mean"] == pytest.approx(one["mse"]["mean"], rel=1e-5)
    assert both["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
