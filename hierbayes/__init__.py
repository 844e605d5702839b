"""hierbayes: gradient-based meta-learning as empirical Bayes in Pyro.

MAML's inner loop is a truncated-gradient point estimate of each task's parameters in a
hierarchical model (Grant et al. 2018); hierbayes makes that model a Pyro program, the inner
loop a Pyro guide, and adds Laplace evidence corrections and Gaussian task posteriors.

``hierbayes.fit(model, tasks)`` meta-trains and ``hierbayes.load(path)`` reads a saved run;
``hierbayes.models``, ``hierbayes.tasks`` and ``hierbayes.inference`` hold the rest.
"""

from hierbayes import inference, models, tasks
from hierbayes.errors import (
    HierbayesError,
    ModelContractError,
    NumericalError,
    TaskDataError,
    UnconvergedWarning,
)
from hierbayes.inference.training.fit import fit
from hierbayes.inference.training.load import load
from hierbayes.tasks import SinusoidTasks, TaskBatch, TaskCollection

__version__ = "0.1.0"

__all__ = [
    "HierbayesError",
    "ModelContractError",
    "NumericalError",
    "SinusoidTasks",
    "TaskBatch",
    "TaskCollection",
    "TaskDataError",
    "UnconvergedWarning",
    "__version__",
    "fit",
    "inference",
    "load",
    "models",
    "tasks",
]
