"""Learned optimizer families: shape-agnostic transforms meta-trained to apply to any model.

Every family is registered once in :mod:`compiledopt.learned.catalog` (by name, with the inner
learning rate it runs at); the command line, the export spec and the benchmark read it there.
"""

from compiledopt.learned.catalog import CATALOG, LEARNED, CatalogEntry, build_transform
from compiledopt.learned.celo2 import Celo2
from compiledopt.learned.lstm import CoordinateLSTM
from compiledopt.learned.mlp import CoordinateMLP
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize

__all__ = [
    "CATALOG",
    "IDBD",
    "LEARNED",
    "CatalogEntry",
    "Celo2",
    "CoordinateLSTM",
    "CoordinateMLP",
    "HypergradientDescent",
    "LearnedStepSize",
    "NormalizedMLP",
    "build_transform",
]
