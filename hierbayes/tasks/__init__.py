"""Task data: batches of support/query sets and the sources that draw them."""

from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection
from hierbayes.tasks.episodic import EpisodicSampler
from hierbayes.tasks.sinusoid import SinusoidTasks
from hierbayes.tasks.source import TaskSource

__all__ = ["EpisodicSampler", "SinusoidTasks", "TaskBatch", "TaskCollection", "TaskSource"]
