"""The catalog: every shape-agnostic rule by name, registered once.

This is the one place a rule is registered. The command line (``compiledopt train --transform``),
the export spec (``{"kind": "shape_agnostic", "name": ...}``) and the step-speed benchmark all
read it, and each rule states its own cost model (:meth:`Transform.cost
<compiledopt.transforms.Transform.cost>`) next to its update. A checkpoint or an artifact records
``{"name": ..., "kwargs": {...}}``; :func:`build_transform` turns it back into a module, so
loading a trained optimizer never unpickles code.

Adding a learned family: write its module in this package (a :class:`Transform` with
``shape_agnostic = True`` and a ``cost`` method) and add one :class:`CatalogEntry` line below.
"""

from typing import Any, Callable, Dict, Mapping, NamedTuple, Tuple

from compiledopt.learned.celo2 import Celo2
from compiledopt.learned.lstm import CoordinateLSTM
from compiledopt.learned.mlp import CoordinateMLP
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize
from compiledopt.transforms.base import Transform
from compiledopt.transforms.baselines import SGD, Adam, AdamW


class CatalogEntry(NamedTuple):
    """A registered rule.

    Attributes:
        build (callable): the transform class (or factory) taking the spec's ``kwargs``.
        inner_lr (float): the learning rate it is meant to run at.
        summary (str): one line for listings.
        learned (bool): meta-trained (a learned family) or a fixed hand-written baseline.
    """

    build: Callable[..., Transform]
    inner_lr: float
    summary: str
    learned: bool = True


CATALOG: Dict[str, CatalogEntry] = {
    "coordinate-mlp": CatalogEntry(
        CoordinateMLP, 10.0, "per-coordinate MLP (small_fc_lopt-class features)"
    ),
    "coordinate-lstm": CatalogEntry(
        CoordinateLSTM, 0.1, "coordinate-wise two-layer LSTM (Andrychowicz et al. 2016)"
    ),
    "normalized-mlp": CatalogEntry(
        NormalizedMLP, 1e-3, "odd per-coordinate MLP on scale-free features, unit-RMS output"
    ),
    "celo2": CatalogEntry(Celo2, 1e-3, "Celo2: MLP on Adam/Adafactor features, orthogonalised"),
    "learned-step-size": CatalogEntry(
        LearnedStepSize, 0.1, "one learnable log step size shared by all parameters"
    ),
    "hypergradient": CatalogEntry(
        HypergradientDescent, 0.1, "hypergradient descent (Baydin et al. 2017)"
    ),
    "idbd": CatalogEntry(IDBD, 0.1, "Incremental Delta-Bar-Delta (Sutton 1992)"),
    "sgd": CatalogEntry(SGD, 0.1, "SGD with optional momentum (not learned)", learned=False),
    "adam": CatalogEntry(Adam, 1e-3, "Adam (not learned)", learned=False),
    "adamw": CatalogEntry(AdamW, 1e-3, "AdamW (not learned)", learned=False),
}

#: The rules that are meta-trained (the others are fixed baselines), in catalog order.
LEARNED: Tuple[str, ...] = tuple(name for name, entry in CATALOG.items() if entry.learned)


def build_transform(name: str, kwargs: Mapping[str, Any] | None = None) -> Transform:
    """The catalog transform ``name`` built with ``kwargs``."""
    if name not in CATALOG:
        raise ValueError(f"Unknown transform: {name!r} (choose from {sorted(CATALOG)})")
    return CATALOG[name].build(**dict(kwargs or {}))
