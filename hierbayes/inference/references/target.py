r"""The target of the reference methods: a task density, from a density or a hierbayes model.

The reference methods (NUTS, mean-field VI) approximate
:math:`p(\phi_j\mid x^s_j, y^s_j, \hat\theta) \propto p(y^s_j\mid\phi_j, x^s_j)\,
p(\phi_j\mid\hat\theta)`, read from a :class:`~hierbayes.models.TaskDensity`.
"""

from __future__ import annotations

from hierbayes.models.density import PyroTaskDensity, TaskDensity, task_density
from hierbayes.models.param_store import claim_param_store
from hierbayes.models.structure import model_structure
from hierbayes.tasks.batch import TaskBatch

__all__ = ["resolve_density"]


def resolve_density(model_or_density: object, tasks: TaskBatch) -> TaskDensity:
    """A :class:`~hierbayes.models.TaskDensity` from a density or a hierbayes model.

    A :class:`~hierbayes.models.TaskDensity` is returned as it is; a model (a Pyro program
    ``model(x, y)``) is traced once on ``tasks``' support set and gives its native density
    when it has one, else a :class:`~hierbayes.models.PyroTaskDensity`. Either way a
    ``PyroModule`` model's runs under the sampler use its own parameters, whatever another
    model of the same name left in Pyro's parameter store
    (:func:`~hierbayes.models.param_store.claim_param_store`).
    """
    if isinstance(model_or_density, TaskDensity):
        if isinstance(model_or_density, PyroTaskDensity):
            # the sampler runs the program under Pyro: its module's own values, not another's
            claim_param_store(model_or_density.model, model_or_density.structure.module_param_sites)
        return model_or_density
    if not callable(model_or_density):
        raise TypeError(
            "expected a hierbayes model (a Pyro program model(x, y)) or a TaskDensity; got "
            f"{type(model_or_density).__name__}"
        )
    structure = model_structure(model_or_density, tasks.support_x, tasks.support_y)
    return task_density(model_or_density, structure, tasks.support_x)
