"""compiledopt: learned optimizers written once, run anywhere."""

from compiledopt import learned, nn, optim, pretrained, transforms
from compiledopt.module_update import clone_module, update_module
from compiledopt.roles import param_groups
from compiledopt.runtime import FrozenOptimizer
from compiledopt.version import VERSION

__version__ = VERSION

__all__ = [
    "FrozenOptimizer",
    "clone_module",
    "learned",
    "nn",
    "optim",
    "param_groups",
    "pretrained",
    "transforms",
    "update_module",
]
