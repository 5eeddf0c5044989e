"""Learnable gradient transforms, all on one contract (see :class:`Transform`)."""

from compiledopt.transforms.base import Transform, UpdateFunction
from compiledopt.transforms.dictionary import TransformDictionary
from compiledopt.transforms.kronecker import KroneckerTransform, KroneckerUpdate
from compiledopt.transforms.metacurvature import MetaCurvatureTransform
from compiledopt.transforms.module import ModuleTransform, ReshapedTransform

__all__ = [
    "KroneckerTransform",
    "KroneckerUpdate",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ReshapedTransform",
    "Transform",
    "TransformDictionary",
    "UpdateFunction",
]
