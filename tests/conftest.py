"""Shared test set-up: float64, validation on, a clean parameter store, seeded RNGs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyro
import pytest
import torch
from hypothesis import settings

settings.register_profile("hierbayes", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hierbayes"))

# One intra-op thread per test process: the small-op workloads here run faster so, and
# `make test` runs two processes (pytest-xdist) on the two cores.
torch.set_num_threads(int(os.environ.get("HIERBAYES_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _float64_clean_state() -> Iterator[None]:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(default)
    pyro.clear_param_store()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
