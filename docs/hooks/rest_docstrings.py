r"""A griffe extension: the reST of hierbayes' docstrings as what mkdocstrings renders.

The docstrings are numpydoc with reST inside (Sphinx's conventions); the package is not edited
for the site. When griffe has loaded the package this extension rewrites every docstring:

* ``:math:`x``` becomes ``\(x\)`` and a ``.. math::`` block becomes ``\[ ... \]``
  (pymdownx.arithmatex hands both to MathJax); a block of several lines joined by ``\\`` is
  wrapped in ``aligned``, as Sphinx wraps it in ``split``;
* ``.. code-block:: python`` and a paragraph ending in ``::`` become fenced code;
* ``:func:``, ``:class:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:`` and
  ``:obj:`` become mkdocs-autorefs links, the target resolved as Sphinx resolves it: a dotted
  path, or a name looked up from the documented object's own scope outwards (its members,
  its module's imports). A ``~`` shows the last component only. A target that the reference
  renders is linked; one that is private or outside hierbayes (``torch``, ``warnings.warn``)
  is shown as code; a hierbayes name that resolves to nothing is a warning, which fails
  ``mkdocs build --strict``.
"""

from __future__ import annotations

import builtins
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_reference

logger = logging.getLogger("mkdocs.plugins.hierbayes.rest_docstrings")

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj|math):`([^`]+)`")
DIRECTIVE = re.compile(r"^(\s*)\.\. (math|code-block)::\s*(.*)$")
#: Packages outside hierbayes that docstrings name: shown as code (no inventory is fetched).
EXTERNAL = (
    "torch",
    "pyro",
    "numpy",
    "numpyro",
    "jax",
    "arviz",
    "matplotlib",
    "scipy",
    "warnings",
    "os",
    "sys",
    "logging",
    "pathlib",
    "typing",
    "collections",
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The indented body that follows line ``start - 1`` (blank lines inside it kept)."""
    end = start
    body: list[str] = []
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        body.append(lines[end])
        end += 1
    while body and not body[-1].strip():
        body.pop()
        end -= 1
    indents = [_indent(line) for line in body if line.strip()]
    cut = min(indents) if indents else 0
    return [line[cut:] if line.strip() else "" for line in body], end


def _math_block(body: list[str], pad: str) -> list[str]:
    equations: list[list[str]] = [[]]
    for line in body:
        if line.strip():
            equations[-1].append(line.rstrip())
        elif equations[-1]:
            equations.append([])
    out: list[str] = [""]
    for equation in (e for e in equations if e):
        text = "\n".join(equation)
        if ("\\\\" in text or "&" in text) and "\\begin" not in text:
            equation = ["\\begin{aligned}", *equation, "\\end{aligned}"]
        out += [pad + "\\[", *(pad + line for line in equation), pad + "\\]", ""]
    return out


def rewrite_blocks(text: str) -> str:
    """``.. math::``, ``.. code-block::`` and ``::`` paragraphs as Markdown blocks."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        match = DIRECTIVE.match(line)
        if match:
            pad, kind, argument = match.groups()
            body, index = _block(lines, index + 1, len(pad))
            if kind == "math":
                out += _math_block(([argument] if argument else []) + body, pad)
            else:
                language = argument or "python"
                while body and not body[0].strip():
                    body.pop(0)
                out += [
                    "",
                    f"{pad}```{language}",
                    *(pad + b if b else "" for b in body),
                    f"{pad}```",
                    "",
                ]
            continue
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.lstrip().startswith(".."):
            nxt = index + 1
            while nxt < len(lines) and not lines[nxt].strip():
                nxt += 1
            if nxt < len(lines) and _indent(lines[nxt]) > _indent(line):
                pad = " " * _indent(line)
                body, index = _block(lines, index + 1, _indent(line))
                while body and not body[0].strip():
                    body.pop(0)
                head = stripped[:-2].rstrip()
                out += [
                    head + ":" if head.strip() else "",
                    "",
                    f"{pad}```text",
                    *(pad + b if b else "" for b in body),
                    f"{pad}```",
                    "",
                ]
                continue
        out.append(line)
        index += 1
    return "\n".join(out)


def rewrite_roles(text: str, link: Callable[[str, str], str]) -> str:
    """Inline roles: math as ``\\( \\)``, cross-references through ``link(role, target)``."""

    def replace(match: re.Match[str]) -> str:
        role, target = match.groups()
        if role == "math":
            return f"\\({target}\\)"
        return link(role, target)

    return ROLE.sub(replace, text)


def rewrite(text: str, link: Callable[[str, str], str]) -> str:
    """A docstring's reST as Markdown (blocks first, then inline roles)."""
    return rewrite_roles(rewrite_blocks(text), link)


class RestDocstrings(griffe.Extension):
    """Rewrite the reST of every docstring of the loaded package (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.exact, self.prefixes = api_reference.linkable_roots()

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "hierbayes":
            return
        self.package = pkg
        self._names: dict[str, list[str]] = {}
        for obj in _walk(pkg):
            self._names.setdefault(obj.name, []).append(obj.path)
        self.prefixes = {self._canonical(path) or path for path in self.prefixes}
        self.exact = {self._canonical(path) or path for path in self.exact}
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(
                    obj.docstring.value, lambda role, target, o=obj: self._link(o, role, target)
                )

    def _canonical(self, path: str) -> str | None:
        if not path.startswith("hierbayes"):
            return None
        try:
            obj = (
                self.package
                if path == "hierbayes"
                else self.package[path.removeprefix("hierbayes.")]
            )
            return obj.canonical_path
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None

    def _resolve(self, obj: griffe.Object | griffe.Alias, target: str) -> str | None:
        """The dotted path ``target`` names, looked up as Sphinx would, or None."""
        if target.startswith("hierbayes"):
            return target
        head, _, rest = target.partition(".")
        scope: Any = obj
        found: str | None = None
        while scope is not None and found is None:
            if scope.is_class and head in scope.all_members:  # inherited members too
                member = scope.all_members[head]
                found = member.target_path if member.is_alias else member.path
                break
            try:
                found = scope.resolve(head)
            except (griffe.NameResolutionError, KeyError, AttributeError):
                scope = scope.parent
        if found is None:  # a name defined once elsewhere in the package (Sphinx's fallback)
            paths = self._names.get(head, [])
            if len(paths) != 1:
                return None
            found = paths[0]
        return f"{found}.{rest}" if rest else found

    def _link(self, obj: griffe.Object | griffe.Alias, role: str, target: str) -> str:
        text = ""
        if "<" in target and target.endswith(">"):  # :role:`text <target>`
            text, _, target = target[:-1].partition("<")
            text = " ".join(text.split())
        target = "".join(target.split())  # a target broken over two lines
        short = target.startswith("~")
        target = target.lstrip("~.")
        if not text:
            text = target.rsplit(".", 1)[-1] if short else target
        suffix = "()" if role in ("func", "meth") else ""
        code = f"`{text}{suffix}`"
        head = target.split(".")[0]
        if head in EXTERNAL or hasattr(builtins, head):
            return code
        resolved = self._resolve(obj, target)
        canonical = self._canonical(resolved) if resolved else None
        if canonical is None:
            if resolved is None or resolved.startswith("hierbayes"):
                logger.warning(
                    "%s: :%s:`%s` names nothing in hierbayes (looked up from %s)",
                    obj.filepath if not isinstance(obj.filepath, list) else obj.path,
                    role,
                    target,
                    obj.path,
                )
            return code
        if self._rendered(canonical):
            return f"[{code}][{canonical}]"
        return code

    def _rendered(self, canonical: str) -> bool:
        if canonical in self.exact:
            return True
        for root in self.prefixes:
            if canonical == root or canonical.startswith(root + "."):
                rest = canonical[len(root) + 1 :].split(".") if canonical != root else []
                return not any(part.startswith("_") for part in rest)
        return False


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)
