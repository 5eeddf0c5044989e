"""The transform contract (:class:`Transform`), the learn2learn building blocks and the
hand-written baselines. Learned optimizer families live in :mod:`compiledopt.learned`."""

from compiledopt.transforms.base import Transform, UpdateFunction
from compiledopt.transforms.baselines import SGD, Adam, AdamW
from compiledopt.transforms.dictionary import TransformDictionary
from compiledopt.transforms.kronecker import KroneckerTransform, KroneckerUpdate
from compiledopt.transforms.metacurvature import MetaCurvatureTransform
from compiledopt.transforms.module import ModuleTransform, ReshapedTransform

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "KroneckerTransform",
    "KroneckerUpdate",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ReshapedTransform",
    "Transform",
    "TransformDictionary",
    "UpdateFunction",
]
