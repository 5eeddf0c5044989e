"""Shape-agnostic transforms by name, for the command line and for checkpoints.

A checkpoint records ``{"name": ..., "kwargs": {...}}`` (a *spec*); :func:`build_transform` turns
it back into a module, so loading a trained optimizer never unpickles code.
"""

from typing import Any, Callable, Dict, Mapping, NamedTuple

from compiledopt.transforms.base import Transform
from compiledopt.transforms.baselines import SGD, Adam, AdamW
from compiledopt.learned.lstm import CoordinateLSTM
from compiledopt.learned.mlp import CoordinateMLP
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize


class CatalogEntry(NamedTuple):
    """A transform class and the inner learning rate it is meant to run at."""

    build: Callable[..., Transform]
    inner_lr: float
    summary: str


CATALOG: Dict[str, CatalogEntry] = {
    "coordinate-mlp": CatalogEntry(
        CoordinateMLP, 10.0, "per-coordinate MLP (small_fc_lopt-class features)"
    ),
    "coordinate-lstm": CatalogEntry(
        CoordinateLSTM, 0.1, "coordinate-wise two-layer LSTM (Andrychowicz et al. 2016)"
    ),
    "learned-step-size": CatalogEntry(
        LearnedStepSize, 0.1, "one learnable log step size shared by all parameters"
    ),
    "hypergradient": CatalogEntry(
        HypergradientDescent, 0.1, "hypergradient descent (Baydin et al. 2017)"
    ),
    "idbd": CatalogEntry(IDBD, 0.1, "Incremental Delta-Bar-Delta (Sutton 1992)"),
    "sgd": CatalogEntry(SGD, 0.1, "SGD with optional momentum (not learned)"),
    "adam": CatalogEntry(Adam, 1e-3, "Adam (not learned)"),
    "adamw": CatalogEntry(AdamW, 1e-3, "AdamW (not learned)"),
}

# The transforms that are meta-trained (the rest are fixed baselines).
LEARNED = ("coordinate-mlp", "coordinate-lstm", "learned-step-size", "hypergradient", "idbd")


def build_transform(name: str, kwargs: Mapping[str, Any] | None = None) -> Transform:
    """The catalog transform ``name`` built with ``kwargs``."""
    if name not in CATALOG:
        raise ValueError(f"Unknown transform: {name!r} (choose from {sorted(CATALOG)})")
    return CATALOG[name].build(**dict(kwargs or {}))
