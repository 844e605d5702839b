"""Moved to :mod:`hierbayes.inference.objectives` (kept while the package is reorganised)."""

from hierbayes.inference.objectives import MAMLObjective, MetaObjective, as_task_batch, task_scale

__all__ = ["MAMLObjective", "MetaObjective", "as_task_batch", "task_scale"]
