"""Kept import path: the ArviZ bridge lives in :mod:`hierbayes.inference.evaluation.arviz_bridge`."""

from hierbayes.inference.evaluation.arviz_bridge import *  # noqa: F403
from hierbayes.inference.evaluation.arviz_bridge import __all__  # noqa: F401
