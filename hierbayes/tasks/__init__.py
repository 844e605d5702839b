"""Task data: batches of support/query sets and the sources that draw them."""

from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection
from hierbayes.tasks.episodic import EpisodicSampler
from hierbayes.tasks.grouped import GroupedTasks, eight_schools_tasks, radon_tasks
from hierbayes.tasks.images import (
    ImageDataset,
    bundled_omniglot,
    load_image_folder,
    load_omniglot,
    load_pickled_split,
)
from hierbayes.tasks.sinusoid import SinusoidTasks
from hierbayes.tasks.source import TaskSource

__all__ = [
    "EpisodicSampler",
    "GroupedTasks",
    "ImageDataset",
    "SinusoidTasks",
    "TaskBatch",
    "TaskCollection",
    "TaskSource",
    "bundled_omniglot",
    "eight_schools_tasks",
    "load_image_folder",
    "load_omniglot",
    "load_pickled_split",
    "radon_tasks",
]
