"""Every Python block of README.md runs, in order, as a reader runs them one after another.

The blocks share one namespace (a later block uses the model an earlier one wrote). Runs are
shortened, and only that: ``fit`` takes at most a few meta-steps, NUTS a few draws, and
Omniglot's pretraining a few minibatches, by wrapping those functions where the README reaches
them; everything else (imports, arguments, attribute names, shapes) is the README's own, so a
renamed function or option fails here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hierbayes
import hierbayes.experiments.omniglot as omniglot
import hierbayes.inference as inference
import hierbayes.inference.references as references
from hierbayes.inference import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: The most meta-steps a README run takes here.
STEPS = 3


def blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def _capped_fit(fit: Callable[..., Any]) -> Callable[..., Any]:
    def capped(*args: Any, **options: Any) -> Any:
        if "meta_steps" in options:
            options["meta_steps"] = min(options["meta_steps"], STEPS)
        run = options.get("run")
        if isinstance(run, RunConfig):
            fields: dict[str, Any] = {"meta_steps": min(run.meta_steps, STEPS)}
            if run.checkpoint_every is not None:
                fields["checkpoint_every"] = 1
            options["run"] = dataclasses.replace(run, **fields)
        return fit(*args, **options)

    return capped


def _capped_nuts(sampler: Callable[..., Any]) -> Callable[..., Any]:
    def capped(*args: Any, **options: Any) -> Any:
        options.update(num_warmup=15, num_samples=15, num_chains=2, max_tree_depth=4)
        return sampler(*args, **options)

    return capped


def _short_pretraining(pretrain: Callable[..., Any]) -> Callable[..., Any]:
    def short(train: Any, cfg: Any) -> Any:
        return pretrain(train, dataclasses.replace(cfg, pretrain_steps=3, pretrain_batch_size=8))

    return short


@pytest.fixture
def shortened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setattr(hierbayes, "fit", _capped_fit(hierbayes.fit))
    monkeypatch.setattr(inference, "fit", _capped_fit(inference.fit))
    for name in ("nuts_pyro", "nuts_full_bayes"):
        monkeypatch.setattr(references, name, _capped_nuts(getattr(references, name)))
    monkeypatch.setattr(omniglot, "pretrain_network", _short_pretraining(omniglot.pretrain_network))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the README writes runs/ where it runs
    try:
        yield
    finally:
        os.chdir(cwd)


def test_the_readme_has_its_examples() -> None:
    assert len(blocks()) >= 10


def test_every_python_block_of_the_readme_runs(shortened: None) -> None:
    namespace: dict[str, Any] = {"__name__": "readme"}
    with warnings.catch_warnings():
        # short runs are not converged and say so; what is checked here is that the code runs
        warnings.simplefilter("ignore")
        for index, code in enumerate(blocks(), start=1):
            first = code.strip().splitlines()[0]
            try:
                exec(compile(code, f"README.md block {index}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"README block {index} ({first!r}) failed: {err!r}") from err
