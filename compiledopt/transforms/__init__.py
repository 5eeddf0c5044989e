"""Learnable gradient transforms, all on one contract (see :class:`Transform`)."""

from compiledopt.transforms.base import Transform, UpdateFunction
from compiledopt.transforms.baselines import SGD, Adam, AdamW
from compiledopt.transforms.dictionary import TransformDictionary
from compiledopt.transforms.kronecker import KroneckerTransform, KroneckerUpdate
from compiledopt.transforms.lstm import CoordinateLSTM
from compiledopt.transforms.metacurvature import MetaCurvatureTransform
from compiledopt.transforms.mlp import CoordinateMLP
from compiledopt.transforms.module import ModuleTransform, ReshapedTransform
from compiledopt.transforms.step_sizes import IDBD, HypergradientDescent, LearnedStepSize

__all__ = [
    "IDBD",
    "SGD",
    "Adam",
    "AdamW",
    "CoordinateLSTM",
    "CoordinateMLP",
    "HypergradientDescent",
    "KroneckerTransform",
    "KroneckerUpdate",
    "LearnedStepSize",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ReshapedTransform",
    "Transform",
    "TransformDictionary",
    "UpdateFunction",
]
