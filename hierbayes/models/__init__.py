"""Hierarchical task models: Pyro programs with a global theta and a per-task phi."""

from hierbayes.models.conv import ConvClassifier, conv4_network
from hierbayes.models.density import (
    Capabilities,
    DiagonalPriorDensity,
    NetworkDensity,
    PyroTaskDensity,
    TaskDensity,
    capabilities,
    task_density,
)
from hierbayes.models.grouped import (
    ContextualEffects,
    EightSchools,
    GroupedModel,
    VaryingIntercepts,
    VaryingInterceptsSlopes,
)
from hierbayes.models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from hierbayes.models.linear import BayesianLinearRegression
from hierbayes.models.network import BatchedNetwork, LayerRecord, ParameterLayout
from hierbayes.models.neural import NeuralRegression, sinusoid_network
from hierbayes.models.structure import GlobalSite, ModelStructure, model_structure
from hierbayes.models.task_model import TaskModel, TaskModelDensity, from_module

__all__ = [
    "BatchedNetwork",
    "BayesianLinearRegression",
    "Capabilities",
    "CategoricalLikelihood",
    "ContextualEffects",
    "ConvClassifier",
    "DiagonalPriorDensity",
    "EightSchools",
    "GaussianLikelihood",
    "GlobalSite",
    "GroupedModel",
    "LayerRecord",
    "Likelihood",
    "ModelStructure",
    "NetworkDensity",
    "NeuralRegression",
    "ParameterLayout",
    "PyroTaskDensity",
    "TaskDensity",
    "TaskModel",
    "TaskModelDensity",
    "VaryingIntercepts",
    "VaryingInterceptsSlopes",
    "capabilities",
    "conv4_network",
    "from_module",
    "model_structure",
    "sinusoid_network",
    "task_density",
]
