"""Meta-training of shape-agnostic transforms over task distributions."""

from compiledopt.meta.inner import apply_transform, check_shape_agnostic, evaluate_curve
from compiledopt.meta.trainer import MetaTrainConfig, MetaTrainer, MetaTrainResult

__all__ = [
    "MetaTrainConfig",
    "MetaTrainResult",
    "MetaTrainer",
    "apply_transform",
    "check_shape_agnostic",
    "evaluate_curve",
]
