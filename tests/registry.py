"""The one list of every transform under test, and the parameters they are tested on.

Generic tests (tests/test_contract.py, tests/test_metagradient.py) are parametrized over
``REGISTRY`` × ``SHAPES``. ``test_registry_covers_every_transform`` fails when a transform class or
Kronecker layer exists in the package without an entry here.
"""

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

import compiledopt as co
from compiledopt.learned.catalog import build_transform
from compiledopt.transforms import Transform

# rank -> an example parameter shape: scalar, bias, Linear, Conv1d, Conv2d, Conv3d weights.
SHAPES: Dict[int, Tuple[int, ...]] = {
    0: (),
    1: (5,),
    2: (4, 3),
    3: (3, 2, 3),
    4: (3, 2, 2, 2),
    5: (2, 2, 1, 2, 2),
}


def identity_linear(n: int, m: int) -> nn.Linear:
    """``nn.Linear`` that starts as the identity map (the documented ModuleTransform recipe)."""
    layer = nn.Linear(n, m)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@dataclass(frozen=True)
class Entry:
    """A transform under test: ``factory(param)`` builds it for one parameter."""

    name: str
    factory: Callable[[Tensor], nn.Module]
    spec: Optional[Dict[str, Any]] = (
        None  # how compiledopt.export rebuilds it (None: not exportable)
    )

    def build(self, param: Tensor, perturb: float = 0.1, seed: int = 0) -> Transform:
        """The transform for ``param``, weights moved off their identity start."""
        transform = self.factory(param)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in transform.parameters():
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
                weight.add_(perturb * noise.to(weight.dtype))
        return transform


def agnostic(name: str, catalog_name: str, **kwargs: Any) -> Entry:
    """A shape-agnostic catalog transform: one instance serves any shape."""
    spec = {"kind": "shape_agnostic", "name": catalog_name, "kwargs": kwargs}
    return Entry(name, lambda p: build_transform(catalog_name, kwargs).to(p.dtype), spec)


def kronecker(name: str, layer: str, bias: bool = False, psd: bool = True) -> Entry:
    factory = co.optim.KroneckerTransform(getattr(co.nn, layer), bias=bias, psd=psd)
    return Entry(name, factory, {"kind": "kronecker", "layer": layer, "bias": bias, "psd": psd})


REGISTRY = [
    Entry(
        "module_linear", co.optim.ModuleTransform(nn.Linear), {"kind": "module", "module": "Linear"}
    ),
    Entry("module_identity", co.optim.ModuleTransform(identity_linear)),
    kronecker("kronecker_linear", "KroneckerLinear"),
    kronecker("kronecker_linear_bias", "KroneckerLinear", bias=True, psd=False),
    kronecker("kronecker_rnn", "KroneckerRNN"),
    kronecker("kronecker_lstm", "KroneckerLSTM", bias=True),
    Entry("metacurvature", co.optim.MetaCurvatureTransform, {"kind": "metacurvature", "lr": 1.0}),
    Entry(
        "metacurvature_lr",
        functools.partial(co.optim.MetaCurvatureTransform, lr=0.5),
        {"kind": "metacurvature", "lr": 0.5},
    ),
    Entry(
        "learned_step_size_per_element",
        co.learned.LearnedStepSize.per_element,
        {"kind": "per_element_step_size", "step_size": 1.0},
    ),
    agnostic("coordinate_mlp", "coordinate-mlp", hidden_sizes=[8]),
    agnostic("coordinate_lstm", "coordinate-lstm", hidden_size=6),
    agnostic("normalized_mlp", "normalized-mlp"),
    # The harness options (orthogonalize, adam_vectors) are checked in tests/test_normalized.py
    # against the float64 reference, fused and scripted: Newton–Schulz amplifies float32 rounding
    # past the shared 1e-6 ONNX target, and a second full contract run of one family costs
    # minutes of the suite.
    agnostic("learned_step_size", "learned-step-size"),
    agnostic("hypergradient_descent", "hypergradient"),
    agnostic("hypergradient_descent_per_element", "hypergradient", per_element=True),
    agnostic("idbd", "idbd"),
    # Celo2 without Newton–Schulz (whose cost is not per coordinate); orthogonalize, the traced
    # orientation switch and imported weights are checked in tests/test_celo2.py.
    agnostic("celo2", "celo2", hidden_size=4, orthogonalize=False),
    # Non-learned baselines (no weights: the meta-gradient tests skip them).
    agnostic("sgd_momentum", "sgd", momentum=0.9),
    agnostic("sgd_nesterov_wd", "sgd", momentum=0.9, nesterov=True, weight_decay=1e-2),
    agnostic("adam", "adam"),
    agnostic("adam_amsgrad_wd", "adam", weight_decay=1e-2, amsgrad=True),
    agnostic("adamw", "adamw"),
]

REGISTRY_IDS = [entry.name for entry in REGISTRY]


def example_param(rank: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """A parameter of the registry's example shape for ``rank``."""
    generator = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(SHAPES[rank], generator=generator, dtype=dtype))


def _has_weights(entry: Entry) -> bool:
    return any(True for _ in entry.build(example_param(1)).parameters())


# The entries with learnable weights (meta-gradient tests need something to differentiate).
LEARNED = [entry for entry in REGISTRY if _has_weights(entry)]
LEARNED_IDS = [entry.name for entry in LEARNED]
