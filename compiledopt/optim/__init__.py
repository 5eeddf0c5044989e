"""Differentiable optimization: the learn2learn.optim API on compiledopt's transform contract."""

from compiledopt.optim.differentiable_sgd import DifferentiableSGD
from compiledopt.optim.learnable_optimizer import LearnableOptimizer
from compiledopt.optim.parameter_update import ParameterUpdate
from compiledopt.transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
    Transform,
    TransformDictionary,
)

__all__ = [
    "DifferentiableSGD",
    "KroneckerTransform",
    "LearnableOptimizer",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ParameterUpdate",
    "ReshapedTransform",
    "Transform",
    "TransformDictionary",
]
