r"""A module model's parameters in Pyro's parameter store: always its own, never another's.

Pyro keeps one global parameter store, keyed by name. A ``PyroModule``'s parameters enter it
under their full names, the module's name then the attribute path (``NeuralRegression.theta``;
``NeuralRegression.net$$$0.weight`` for a plain ``nn.Module`` inside it), and whenever the
module runs under a Pyro handler (``poutine.trace``, ``SVI``, ``MCMC``) and one of those names
is already in the store with another tensor, the module **takes the store's tensor in place of
its own** (``pyro.nn.PyroModule.__getattr__``: the store wins). Two modules of one class with
one name therefore share their values through the store. That is Pyro's own convention (two
``AutoNormal`` guides share the store unless named apart), and hierbayes keeps it: its models
are named by their class (``name=`` names one apart, for two models of one class trained side
by side through ``pyro.infer.SVI``), so site names never depend on how many models a process
built.

hierbayes' own runs of a module model under Pyro (tracing it for its structure, resetting
and collecting its parameters before ``fit``, restoring a saved run, the reference samplers)
must use that module's values, whatever another model of the same name left in the store.
Before each, :func:`claim_param_store` removes the store's entries under the module's names
that hold another tensor; the module's run then enters its own tensors again (Pyro's
``PyroModule ---> ParamStore`` update). Only the public store API is used
(``__contains__``, ``get_param``, ``__delitem__``, ``scope``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.trace_struct import Trace

__all__ = [
    "NamedModel",
    "claim_param_store",
    "guide_name",
    "module_param_sites",
    "own_param_sites",
    "use_own_parameters",
]


@runtime_checkable
class NamedModel(Protocol):
    """A model with a name in the parameter store (:class:`~hierbayes.models.TaskModel`)."""

    #: The prefix of its ``pyro.param`` sites.
    name: str
    #: Whether the name was chosen by its user rather than defaulted to the class name.
    named: bool


def own_param_sites(model: Any, trace: Trace) -> tuple[str, ...]:
    """The ``pyro.param`` sites of ``trace`` (a run of ``model``) whose values are
    ``model``'s own parameters; empty for a model that is not a ``PyroModule``.

    Taken from a run in an empty scope of the parameter store (as :func:`module_param_sites`
    runs it), these are all the module's parameters that its run reaches. A ``pyro.param``
    statement the module makes with a value of its own creation (a function-style parameter)
    is not one of its parameters and is not listed.
    """
    if not isinstance(model, PyroModule):
        return ()
    own = {id(p) for p in model.parameters()}
    nodes: dict[str, Any] = trace.nodes
    return tuple(
        name
        for name, site in nodes.items()
        if site["type"] == "param" and id(_unconstrained(site["value"])) in own
    )


def _unconstrained(value: Any) -> Any:
    """The unconstrained tensor behind a ``pyro.param`` value: its ``unconstrained`` reference,
    or the value itself for a real-valued parameter whose reference the store dropped (leaving
    a scope, ``ParamStoreDict.get_state`` removes it from the tensors)."""
    reference = value.__dict__.get("unconstrained")
    return value if reference is None else reference()


def module_param_sites(model: Any, *args: Any, **kwargs: Any) -> tuple[str, ...]:
    """The names of the ``pyro.param`` sites of ``model(*args, **kwargs)`` that are the module's
    own parameters (empty for a model that is not a ``PyroModule``).

    The model runs once in an empty scope of the parameter store (``ParamStoreDict.scope``),
    where nothing can stand in for its own tensors, under ``poutine.block`` (a user's handlers
    see nothing); the store is left as it was.
    """
    if not isinstance(model, PyroModule):
        return ()
    # bookkeeping: the run's draws come from a forked generator, so the user's random stream
    # (and with it a seeded run's trajectory) is where it was
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with pyro.get_param_store().scope(), poutine.block(), torch.random.fork_rng(devices=devices):
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return own_param_sites(model, trace)


def claim_param_store(model: Any, names: Iterable[str]) -> None:
    """Point the parameter store's entries ``names`` at ``model``'s own tensors.

    Each entry that holds a tensor other than one of ``model.parameters()`` (another model's,
    left by a model of the same name) is removed, so that the next run of ``model`` under a
    Pyro handler enters its own tensor instead of taking the store's. Entries that already hold
    the module's own tensors are left alone (an optimiser's state keyed on them stays valid).
    Nothing happens for a model that is not a ``PyroModule``.
    """
    if not isinstance(model, PyroModule):
        return
    own = {id(p) for p in model.parameters()}
    store = pyro.get_param_store()
    for name in names:
        if name in store and id(store.get_param(name).unconstrained()) not in own:  # type: ignore[attr-defined]
            del store[name]


def use_own_parameters(model: Any, *args: Any, **kwargs: Any) -> tuple[str, ...]:
    """:func:`claim_param_store` for the sites :func:`module_param_sites` finds in
    ``model(*args, **kwargs)``; returns those names. Call it before running a ``PyroModule``
    model under a Pyro handler, with the arguments of that run (one task is enough)."""
    names = module_param_sites(model, *args, **kwargs)
    claim_param_store(model, names)
    return names


def guide_name(model: object) -> str:
    """The name a :class:`~hierbayes.inference.TruncatedGradientGuide` of ``model`` takes in the
    parameter store: ``"TruncatedGradientGuide"``, or ``"TruncatedGradientGuide_a"`` for a
    model named ``"a"`` (``TaskModel(..., name="a")``): models named apart get guides named
    apart, so both pairs can be trained side by side through ``pyro.infer.SVI``."""
    if isinstance(model, NamedModel) and model.named:
        return f"TruncatedGradientGuide_{model.name}"
    return "TruncatedGradientGuide"
