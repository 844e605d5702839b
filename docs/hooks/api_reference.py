"""The API reference, generated from the package's namespaces (an mkdocs hook).

Each public namespace of hierbayes gets one page under ``api/``. A page renders every name of
the namespace's ``__all__`` whose home it is, and links the names it re-exports to their home:
a name's home is the deepest namespace that exports it (``TaskBatch`` is documented under
``hierbayes.tasks`` and linked from ``hierbayes``). ``hierbayes.inference.core`` has no
``__all__``; its page renders each of its modules. Nothing here edits a docstring: the reST in
them is rewritten when griffe loads the package (``rest_docstrings.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
import types
from dataclasses import dataclass, field
from typing import Any

#: (namespace, page, title) in the order of the reference's navigation.
NAMESPACES: tuple[tuple[str, str, str], ...] = (
    ("hierbayes", "api/hierbayes.md", "hierbayes"),
    ("hierbayes.inference", "api/inference.md", "hierbayes.inference"),
    ("hierbayes.inference.posteriors", "api/posteriors.md", "hierbayes.inference.posteriors"),
    ("hierbayes.inference.objectives", "api/objectives.md", "hierbayes.inference.objectives"),
    ("hierbayes.inference.references", "api/references.md", "hierbayes.inference.references"),
    ("hierbayes.inference.diagnostics", "api/diagnostics.md", "hierbayes.inference.diagnostics"),
    ("hierbayes.inference.curvature", "api/curvature.md", "hierbayes.inference.curvature"),
    ("hierbayes.inference.core", "api/core.md", "hierbayes.inference.core"),
    (
        "hierbayes.inference.linear_gaussian",
        "api/linear_gaussian.md",
        "hierbayes.inference.linear_gaussian",
    ),
    ("hierbayes.models", "api/models.md", "hierbayes.models"),
    ("hierbayes.tasks", "api/tasks.md", "hierbayes.tasks"),
    ("hierbayes.errors", "api/errors.md", "hierbayes.errors"),
)


@dataclass
class Page:
    """One namespace's page: what it renders and what it links elsewhere."""

    namespace: str
    path: str
    title: str
    rendered: list[str] = field(default_factory=list)  # dotted paths rendered here
    linked: list[tuple[str, str]] = field(default_factory=list)  # (name, home path)
    subpackages: list[str] = field(default_factory=list)


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return []


def _core_modules(package: types.ModuleType) -> list[str]:
    return sorted(
        f"{package.__name__}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    )


def build_pages() -> list[Page]:
    """The reference's pages, each name rendered once, at its home."""
    modules = {name: importlib.import_module(name) for name, _, _ in NAMESPACES}
    documented = {name for name, _, _ in NAMESPACES}
    homes: dict[int, str] = {}  # id(object) -> the dotted path it is rendered under
    depth: dict[int, int] = {}
    for namespace, module in modules.items():
        for name in _public_names(module):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or name == "__version__":
                continue
            key = id(obj)
            level = namespace.count(".")
            if key not in homes or level > depth[key]:
                homes[key] = f"{namespace}.{name}"
                depth[key] = level
    pages = []
    for namespace, path, title in NAMESPACES:
        module = modules[namespace]
        page = Page(namespace, path, title)
        names = _public_names(module)
        if not names:  # the functional core: one section per module
            page.rendered = _core_modules(module)
        for name in names:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                if obj.__name__ in documented:
                    page.subpackages.append(obj.__name__)
                continue
            if name == "__version__":
                continue
            home = homes[id(obj)]
            if home == f"{namespace}.{name}":
                page.rendered.append(home)
            else:
                page.linked.append((name, home))
        pages.append(page)
    return pages


def _page_markdown(page: Page, pages: list[Page]) -> str:
    where = {p.namespace: p.path for p in pages}
    lines = [f"# `{page.title}`", "", f"::: {page.namespace}"]
    lines += ["    options:", "      members: false", "      show_root_heading: false", ""]
    if page.subpackages:
        lines += [
            "**Subpackages:** "
            + ", ".join(
                f"[`{sub}`]({_relative(page.path, where[sub])})" for sub in page.subpackages
            ),
            "",
        ]
    if page.linked:
        lines += ["**Also exported here** (documented at their home):", ""]
        lines += [f"- [`{name}`][{home}]: `{home}`" for name, home in page.linked]
        lines.append("")
    for dotted in page.rendered:
        lines += [f"::: {dotted}", "    options:", "      heading_level: 2", ""]
    return "\n".join(lines)


def _relative(source: str, target: str) -> str:
    # every generated page lies in api/
    return target.removeprefix("api/")


def linkable_roots() -> tuple[set[str], set[str]]:
    """What the reference renders: namespaces (their docstring only) and objects with members."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for page in build_pages():
        exact.add(page.namespace)
        prefixes.update(page.rendered)
    return exact, prefixes


#: Pages of the repository's root shown on the site as they are (what was measured, and where
#: each piece of mathematics lives), so the guide links to the figures it quotes.
ROOT_PAGES = (("BENCHMARKS.md", "benchmarks.md"), ("ARCHITECTURE.md", "architecture.md"))


def on_files(files: Any, config: Any) -> Any:
    """Add the reference's generated pages and the root's pages to the site (mkdocs hook)."""
    from pathlib import Path

    from mkdocs.structure.files import File

    pages = build_pages()
    for page in pages:
        files.append(File.generated(config, page.path, content=_page_markdown(page, pages)))
    root = Path(config["config_file_path"]).parent
    for source, target in ROOT_PAGES:
        files.append(File.generated(config, target, content=(root / source).read_text()))
    return files
