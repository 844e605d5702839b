r"""The registry of meta-learning methods: the objective each builds (which carries its own
task posterior, :meth:`~hierbayes.inference.objectives.MetaObjective.posterior`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from hierbayes.inference.objectives import (
    LLAMA_OBJECTIVES,
    MAMLObjective,
    MetaObjective,
    llama_objective,
)

__all__ = ["Method", "get_method", "methods", "register_method"]


@dataclass(frozen=True)
class Method:
    """A meta-learning method: how to build its objective.

    Attributes
    ----------
    name:
        What ``fit(..., method=name)`` takes.
    objective:
        ``objective(num_tasks=..., hyperprior_space=..., **options) -> MetaObjective``; the
        objective's :meth:`~hierbayes.inference.objectives.MetaObjective.posterior` is the
        method's task posterior.
    description:
        One line for listings.
    options:
        The option names its objective takes (``fit`` suggests the close one for a misspelled
        option); ``None`` when unknown (no check).
    """

    name: str
    objective: Callable[..., MetaObjective]
    description: str = ""
    options: frozenset[str] | None = None


_METHODS: dict[str, Method] = {}


def _init_options(cls: type) -> frozenset[str]:
    """Keyword options of ``cls.__init__`` and its bases' (``num_tasks`` and
    ``hyperprior_space`` are fit's to set)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return frozenset(names - {"hyperprior_space"})


def register_method(method: Method, *, overwrite: bool = False) -> None:
    """Make ``method`` available as ``fit(..., method=method.name)``.

    A name that is registered already is refused unless ``overwrite=True`` (as
    :func:`~hierbayes.inference.curvature.register_curvature` does).
    """
    if method.name in _METHODS and not overwrite:
        raise ValueError(
            f"a method named {method.name!r} is registered already; pass overwrite=True to "
            "replace it"
        )
    _METHODS[method.name] = method


def get_method(name: str) -> Method:
    """The registered method ``name``, or an error that lists the known ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_METHODS)}")
    return _METHODS[name]


def methods() -> dict[str, Method]:
    """The registered methods by name."""
    return dict(_METHODS)


register_method(
    Method(
        "maml",
        MAMLObjective,
        "MAML (Finn et al. 2017): query NLL at the truncated-gradient point estimate",
        frozenset(),
    )
)


register_method(
    Method(
        "llama",
        llama_objective,
        "LLAMA (Grant et al. 2018) and successors: Laplace-corrected objectives, Gaussian task "
        "posteriors; objective='predictive' (default), 'evidence' or 'paper'",
        frozenset({"objective"}).union(*(_init_options(c) for c in LLAMA_OBJECTIVES.values())),
    )
)
