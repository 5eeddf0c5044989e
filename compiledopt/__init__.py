"""compiledopt: learned optimizers written once, run anywhere."""

from compiledopt import nn, optim, transforms
from compiledopt.frozen_optimizer import FrozenOptimizer
from compiledopt.module_update import clone_module, update_module

__version__ = "0.1.0"

__all__ = ["FrozenOptimizer", "clone_module", "nn", "optim", "transforms", "update_module"]
