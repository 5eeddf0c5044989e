"""Meta-training of shape-agnostic transforms over task distributions: one loop
(:class:`MetaLoop`) with the meta-gradient estimator its :class:`MetaConfig` names — truncated
back-propagation (``"tbptt"``, :mod:`compiledopt.meta.tbptt`), persistent or truncated evolution
strategies (``"pes"``, ``"es"``: :mod:`compiledopt.meta.es`, antithetic, vectorized over
perturbations) — in one process or spread over torch.distributed ranks.

:mod:`compiledopt.meta.estimator` states the estimator contract; :mod:`compiledopt.meta.resume`
holds what resuming a run reads (``RESUMABLE_CHANGES``, the one table of the settings a resumed
run may change)."""

# The built-in estimators register themselves on import (a new one: one file, one line here).
from compiledopt.meta import es, tbptt  # noqa: F401
from compiledopt.meta.estimator import ESTIMATORS, Estimate, Estimator, MetaConfig, Slot
from compiledopt.meta.inner import apply_transform, check_shape_agnostic, evaluate_curve
from compiledopt.meta.loop import MetaLoop, MetaResult
from compiledopt.meta.population import Population

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "Estimator",
    "MetaConfig",
    "MetaLoop",
    "MetaResult",
    "Population",
    "Slot",
    "apply_transform",
    "check_shape_agnostic",
    "evaluate_curve",
]
