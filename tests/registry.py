"""The one list of every transform under test, and the parameters they are tested on.

Generic tests (tests/test_contract.py, tests/test_metagradient.py) are parametrized over
``REGISTRY`` × ``SHAPES``. ``test_registry_covers_every_transform`` fails when a transform class or
Kronecker layer exists in the package without an entry here.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

import compiledopt as co
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

    def build(self, param: Tensor, perturb: float = 0.1, seed: int = 0) -> Transform:
        """The transform for ``param``, weights moved off their identity start."""
        transform = self.factory(param)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in transform.parameters():
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
                weight.add_(perturb * noise.to(weight.dtype))
        return transform


REGISTRY = [
    Entry("module_linear", co.optim.ModuleTransform(nn.Linear)),
    Entry("module_identity", co.optim.ModuleTransform(identity_linear)),
    Entry("kronecker_linear", co.optim.KroneckerTransform(co.nn.KroneckerLinear)),
    Entry(
        "kronecker_linear_bias",
        co.optim.KroneckerTransform(co.nn.KroneckerLinear, bias=True, psd=False),
    ),
    Entry("kronecker_rnn", co.optim.KroneckerTransform(co.nn.KroneckerRNN)),
    Entry("kronecker_lstm", co.optim.KroneckerTransform(co.nn.KroneckerLSTM, bias=True)),
    Entry("metacurvature", co.optim.MetaCurvatureTransform),
    Entry("metacurvature_lr", functools.partial(co.optim.MetaCurvatureTransform, lr=0.5)),
    # Shape-agnostic transforms (one instance serves any shape); float64 like the parameters.
    Entry("coordinate_mlp", lambda p: co.transforms.CoordinateMLP(hidden_sizes=(8,)).to(p.dtype)),
    Entry("coordinate_lstm", lambda p: co.transforms.CoordinateLSTM(hidden_size=6).to(p.dtype)),
    Entry("learned_step_size", lambda p: co.transforms.LearnedStepSize().to(p.dtype)),
    Entry("learned_step_size_per_element", co.transforms.LearnedStepSize.per_element),
    Entry("hypergradient_descent", lambda p: co.transforms.HypergradientDescent().to(p.dtype)),
    Entry(
        "hypergradient_descent_per_element",
        lambda p: co.transforms.HypergradientDescent(1.0, 1e-3, True).to(p.dtype),
    ),
    Entry("idbd", lambda p: co.transforms.IDBD().to(p.dtype)),
    # Non-learned baselines (no weights: the meta-gradient tests skip them).
    Entry("sgd_momentum", lambda p: co.transforms.SGD(0.9)),
    Entry("sgd_nesterov_wd", lambda p: co.transforms.SGD(0.9, 0.0, True, 1e-2)),
    Entry("adam", lambda p: co.transforms.Adam()),
    Entry("adam_amsgrad_wd", lambda p: co.transforms.Adam((0.9, 0.999), 1e-8, 1e-2, True)),
    Entry("adamw", lambda p: co.transforms.AdamW()),
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
