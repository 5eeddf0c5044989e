"""What runs at training time: :class:`FrozenOptimizer`, the compiled per-tensor runner and the
state rounding."""

from compiledopt.runtime.frozen_optimizer import FrozenOptimizer

__all__ = ["FrozenOptimizer"]
