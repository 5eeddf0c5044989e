"""The catalog: every shape-agnostic rule by name, registered once.

This is the one place a rule is registered. The command line (``compiledopt train --transform``),
the export spec (``{"kind": "shape_agnostic", "name": ...}``) and the step-speed benchmark all
read it, and each rule states its own cost model (:meth:`Transform.cost
<compiledopt.transforms.Transform.cost>`) next to its update. A checkpoint or an artifact records
``{"name": ..., "kwargs": {...}}``; :func:`build_transform` turns it back into a module, so
loading a trained optimizer never unpickles code.

Adding a learned family: write its module in this package (a :class:`Transform` with
``shape_agnostic = True`` and a ``cost`` method) and add one :class:`CatalogEntry` line below.

The shape-bound families (a transform built per parameter, from the parameter: Kronecker-factored
preconditioners, meta-curvature, per-element step sizes, a module per parameter) are registered
here too, in :data:`BOUND`: each states its spec's fields (their defaults and what a valid value
is) and how it builds a parameter's transform. The export spec, the manifest check and the
benchmarks read both tables when they run; :func:`kinds` is every spec kind.
"""

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

from torch import Tensor, nn

import compiledopt.nn as cnn
from compiledopt._validation import is_real
from compiledopt.learned.celo2 import Celo2
from compiledopt.learned.lstm import CoordinateLSTM
from compiledopt.learned.mlp import CoordinateMLP
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize
from compiledopt.transforms.base import Transform
from compiledopt.transforms.baselines import SGD, Adam, AdamW
from compiledopt.transforms.kronecker import KroneckerTransform
from compiledopt.transforms.metacurvature import MetaCurvatureTransform
from compiledopt.transforms.module import ModuleTransform


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


# Shape-bound families -------------------------------------------------------------------------

#: The default of a spec field that has none: the spec must give it.
REQUIRED = object()


def is_flag(value: Any) -> bool:
    return isinstance(value, bool)


def is_positive(value: Any) -> bool:
    return is_real(value) and value > 0


class SpecField(NamedTuple):
    """One field of a shape-bound spec.

    Attributes:
        name (str): the key in the spec.
        default: its value when the spec leaves it out (:data:`REQUIRED`: it may not).
        check (callable): whether a value is valid (its JSON type and range).
        expected (str): what a valid value is, for messages (``"true or false"``).
        choices (mapping, optional): the names it may take and what each stands for (a layer
            class); a value outside them is an unknown ``label``.
        label (str): what a choice names, for messages (``"Kronecker layer"``).
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    expected: str
    choices: Optional[Mapping[str, Any]] = None
    label: str = ""


def choice(name: str, choices: Mapping[str, Any], label: str) -> SpecField:
    """A required field naming one of ``choices``."""
    return SpecField(
        name, REQUIRED, lambda v: isinstance(v, str) and v in choices, "a string", choices, label
    )


class BoundFamily(NamedTuple):
    """A registered shape-bound family.

    Attributes:
        build (callable): ``build(param, fields)``: the transform of one parameter, from a
            zero tensor of its shape, dtype and device and the spec's fields (defaults filled in).
        fields (tuple of SpecField): the spec's fields besides ``kind``.
        summary (str): one line for listings.
    """

    build: Callable[[Tensor, Dict[str, Any]], Transform]
    fields: Tuple[SpecField, ...]
    summary: str


KRONECKER_LAYERS = {
    "KroneckerLinear": cnn.KroneckerLinear,
    "KroneckerRNN": cnn.KroneckerRNN,
    "KroneckerLSTM": cnn.KroneckerLSTM,
}
MODULES = {"Linear": nn.Linear}


def _kronecker(param: Tensor, fields: Dict[str, Any]) -> Transform:
    layer = KRONECKER_LAYERS[fields["layer"]]
    return KroneckerTransform(layer, bias=fields["bias"], psd=fields["psd"])(param)


def _metacurvature(param: Tensor, fields: Dict[str, Any]) -> Transform:
    return MetaCurvatureTransform(param, lr=float(fields["lr"]))


def _per_element(param: Tensor, fields: Dict[str, Any]) -> Transform:
    return LearnedStepSize.per_element(param, float(fields["step_size"]))


def _module(param: Tensor, fields: Dict[str, Any]) -> Transform:
    return ModuleTransform(MODULES[fields["module"]])(param)


BOUND: Dict[str, BoundFamily] = {
    "kronecker": BoundFamily(
        _kronecker,
        (
            choice("layer", KRONECKER_LAYERS, "Kronecker layer"),
            SpecField("bias", False, is_flag, "true or false"),
            SpecField("psd", True, is_flag, "true or false"),
        ),
        "Kronecker-factored linear transform of each parameter's gradient",
    ),
    "metacurvature": BoundFamily(
        _metacurvature,
        (SpecField("lr", 1.0, is_real, "a finite number"),),
        "meta-curvature (Park & Oliva 2019): a learned curvature per parameter",
    ),
    "per_element_step_size": BoundFamily(
        _per_element,
        (SpecField("step_size", 1.0, is_positive, "a finite number > 0"),),
        "Meta-SGD: one learned step size per element",
    ),
    "module": BoundFamily(
        _module,
        (choice("module", MODULES, "module"),),
        "a dense torch module (numel x numel) on each flat gradient",
    ),
}


def kinds() -> Tuple[str, ...]:
    """Every transform spec kind, read when called (a family registered later is included):
    the catalog's shape-agnostic rules, then the bound families."""
    return ("shape_agnostic", *BOUND)


def spec_fields(kind: str) -> Tuple[str, ...]:
    """The keys a spec of ``kind`` may have."""
    if kind == "shape_agnostic":
        return ("kind", "name", "kwargs")
    return ("kind", *(field.name for field in BOUND[kind].fields))
