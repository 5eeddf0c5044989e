"""Meta-training of shape-agnostic transforms over task distributions: truncated
back-propagation (:class:`MetaTrainer`) or evolution strategies (:class:`ESTrainer`: PES or
truncated ES, antithetic, vectorized over perturbations, spread over torch.distributed ranks).

:mod:`compiledopt.meta.resume` holds what resuming a run reads: the one table of the settings a
resumed run may change (``RESUMABLE_CHANGES``) and each trainer's setting -> config field table."""

from compiledopt.meta.es import ESConfig, ESTrainer
from compiledopt.meta.inner import apply_transform, check_shape_agnostic, evaluate_curve
from compiledopt.meta.population import Population
from compiledopt.meta.trainer import MetaTrainConfig, MetaTrainer, MetaTrainResult

__all__ = [
    "ESConfig",
    "ESTrainer",
    "MetaTrainConfig",
    "MetaTrainResult",
    "MetaTrainer",
    "Population",
    "apply_transform",
    "check_shape_agnostic",
    "evaluate_curve",
]
