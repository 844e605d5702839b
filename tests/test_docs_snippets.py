"""Every code block of the documentation site runs, and every output it quotes is what it prints.

The pages under ``docs/`` are read as a reader reads them: the ``python`` blocks of one page run
in order in one namespace (a later block uses what an earlier one defined). A ``text`` block
right after a ``python`` block is that block's printed output, and must be what the block
prints (``...`` stands for any text; runs of spaces are compared as one): every error message a
page quotes is produced here by the code beside it. ``sh``, ``shell`` and ``console`` blocks are
commands for a terminal and are not run. The tutorials (``docs/tutorials/*.py``, which the site's
build executes with mkdocs-gallery) run here too, as scripts.

Runs are shortened, and only that, as ``tests/test_readme.py`` shortens the README's: ``fit``
takes at most a few meta-steps, NUTS a few draws and Omniglot's pretraining a few minibatches;
everything else (imports, arguments, attribute names, shapes, messages) is the page's own. No
mkdocs is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch

import hierbayes
import hierbayes.experiments.omniglot as omniglot
import hierbayes.inference as inference
import hierbayes.inference.references as references
from hierbayes.inference import RunConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M
)
#: Blocks that are commands for a terminal, not Python.
SHELL = {"sh", "shell", "console", "bash"}
#: The most meta-steps a documentation run takes here.
STEPS = 3


@dataclasses.dataclass
class Block:
    """One ``python`` block of a page and the ``text`` block that shows its output, if any."""

    page: str
    line: int
    code: str
    output: str | None = None


def _dedent(body: str, indent: str) -> str:
    return "\n".join(line.removeprefix(indent) for line in body.splitlines())


def page_blocks(path: Path) -> list[Block]:
    """The page's ``python`` blocks in order, each with the ``text`` block right after it."""
    return blocks_of(path.read_text(), str(path.relative_to(DOCS)))


def blocks_of(text: str, name: str) -> list[Block]:
    """The ``python`` blocks of Markdown ``text``, each with its output block."""
    blocks: list[Block] = []
    previous_end = None
    for match in FENCE.finditer(text):
        info = match["info"].strip().split()
        language = info[0].lstrip(".{").rstrip("}") if info else ""
        body = _dedent(match["body"], match["indent"])
        between = text[previous_end : match.start()] if previous_end is not None else None
        if language == "python":
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(name, line, body))
        elif language == "text" and blocks and between is not None and not between.strip():
            if blocks[-1].output is None:
                blocks[-1].output = body
        elif language not in SHELL | {"text", ""}:
            raise AssertionError(
                f"{name}: a ```{language} block; the docs' blocks are python, "
                "text (a python block's output) or sh (commands, not run)"
            )
        previous_end = match.end()
    return blocks


def doc_pages() -> list[Path]:
    """Every Markdown page of the site's sources (the generated tutorial pages excluded)."""
    return sorted(
        path
        for path in DOCS.rglob("*.md")
        if "generated" not in path.relative_to(DOCS).parts and path.parent.name != "tutorials"
    )


def tutorials() -> list[Path]:
    return sorted((DOCS / "tutorials").glob("[0-9][0-9]_*.py"))


def output_matches(expected: str, printed: str) -> bool:
    """Whether ``printed`` shows ``expected``, where ``...`` in it stands for any text."""

    def squash(text: str) -> str:
        return re.sub(r"[ \t]+", " ", text).strip()

    pieces = [re.escape(squash(piece)) for piece in squash(expected).split("...")]
    return re.search(r"\s*(.*?)\s*".join(pieces), squash(printed), re.S) is not None


# -- shortened runs --------------------------------------------------------------------------


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
    monkeypatch.setenv("HIERBAYES_DOCS_FAST", "1")
    monkeypatch.chdir(tmp_path)  # pages write runs/ where they run
    torch.set_default_dtype(torch.float32)  # a reader's session (conftest restores float64)
    try:
        yield
    finally:
        plt.close("all")


# -- the tests -------------------------------------------------------------------------------


def test_the_docs_have_pages_with_code() -> None:
    pages = doc_pages()
    assert len(pages) >= 10
    assert sum(len(page_blocks(page)) for page in pages) >= 30
    assert len(tutorials()) == 5


def test_output_blocks_are_matched_with_wildcards() -> None:
    assert output_matches("a ... c", "a b c")
    assert output_matches("task 1:  got ...", "x task 1: got nan here")
    assert not output_matches("task 2", "task 1")


def test_a_text_block_after_a_python_block_is_its_output() -> None:
    page = "```python\nprint(1)\n```\n\n```text\n1\n```\n\n```sh\nmake docs\n```\n"
    [block] = blocks_of(page, "probe.md")
    assert (block.code.strip(), (block.output or "").strip()) == ("print(1)", "1")


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_python_block_of_the_page_runs_and_prints_what_it_shows(
    page: Path, shortened: None
) -> None:
    namespace: dict[str, Any] = {"__name__": "docs"}
    with warnings.catch_warnings():
        # short runs are not converged and say so; what is checked here is that the code runs
        warnings.simplefilter("ignore")
        for block in page_blocks(page):
            where = f"{block.page}:{block.line}"
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(block.code, where, "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{where} failed: {err!r}") from err
            if block.output is not None:
                assert output_matches(block.output, printed.getvalue()), (
                    f"{where} printed\n{printed.getvalue()}\nbut the page shows\n{block.output}"
                )


@pytest.mark.parametrize("script", tutorials(), ids=lambda p: p.name)
def test_every_tutorial_runs(script: Path, shortened: None) -> None:
    code = script.read_text()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as printed:
        warnings.simplefilter("ignore")
        exec(compile(code, str(script), "exec"), {"__name__": "__main__", "__file__": str(script)})
    assert "mode: fast" in printed.getvalue()
    assert plt.get_fignums(), f"{script.name} drew no figure"


def test_tutorials_read_the_fast_mode_switch() -> None:
    for script in tutorials():
        assert 'os.environ.get("HIERBAYES_DOCS_FAST", "1") != "0"' in script.read_text(), script
