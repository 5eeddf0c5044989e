"""The benchmark's models: parameter lists from 0.1M to 16.8M parameters.

``mlp``, ``convnet`` and ``transformer`` are :func:`compiledopt.bench.example_model`'s (the models
``compiledopt bench`` offers); ``mlp-stack`` is 16 ``Linear(1024, 1024)``; ``resnet18`` is
torchvision's ResNet-18 parameter list written out by hand (there for compile time).
"""

from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from compiledopt.bench import example_model

Shapes = List[Tuple[str, Tuple[int, ...]]]


def _module_shapes(module: nn.Module) -> Shapes:
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def resnet18_shapes() -> Shapes:
    """torchvision's ResNet-18 parameter list (names and shapes), built by hand: 62 tensors,
    11,689,512 parameters."""
    shapes: Shapes = [
        ("conv1.weight", (64, 3, 7, 7)),
        ("bn1.weight", (64,)),
        ("bn1.bias", (64,)),
    ]
    inputs = 64
    for layer, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            cin = inputs if block == 0 else width
            shapes += [
                (f"{prefix}.conv1.weight", (width, cin, 3, 3)),
                (f"{prefix}.bn1.weight", (width,)),
                (f"{prefix}.bn1.bias", (width,)),
                (f"{prefix}.conv2.weight", (width, width, 3, 3)),
                (f"{prefix}.bn2.weight", (width,)),
                (f"{prefix}.bn2.bias", (width,)),
            ]
            if block == 0 and (stride != 1 or cin != width):
                shapes += [
                    (f"{prefix}.downsample.0.weight", (width, cin, 1, 1)),
                    (f"{prefix}.downsample.1.weight", (width,)),
                    (f"{prefix}.downsample.1.bias", (width,)),
                ]
        inputs = width
    return [*shapes, ("fc.weight", (1000, 512)), ("fc.bias", (1000,))]


def _example(name: str) -> Callable[[], Shapes]:
    return lambda: _module_shapes(example_model(name))


def _mlp_stack() -> Shapes:
    return _module_shapes(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)]))


#: Models: a builder of the ``(name, shape)`` list and a description.
MODELS: Dict[str, Tuple[Callable[[], Shapes], str]] = {
    "mlp": (_example("mlp"), "MLP 784-128-64-10"),
    "convnet": (
        _example("convnet"),
        "conv net: 4 conv 3x3 (64-128-256-320) + batchnorm, linear head",
    ),
    "transformer": (
        _example("transformer"),
        "nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=3072)",
    ),
    "mlp-stack": (_mlp_stack, "16 x Linear(1024, 1024)"),
    "resnet18": (resnet18_shapes, "ResNet-18 parameter list (shapes by hand, no torchvision)"),
}


def model_params(name: str, seed: int = 0) -> List[Tuple[str, nn.Parameter]]:
    """The named parameters of model ``name``, each with a fixed random gradient."""
    generator = torch.Generator().manual_seed(seed)
    named = []
    for pname, shape in MODELS[name][0]():
        param = nn.Parameter(0.02 * torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator)
        named.append((pname, param))
    return named


def model_info(name: str, named: List[Tuple[str, nn.Parameter]]) -> Dict[str, Any]:
    """What the results record of a model: size, tensor count, ranks, largest tensor."""
    return {
        "name": name,
        "description": MODELS[name][1],
        "params": sum(p.numel() for _, p in named),
        "tensors": len(named),
        "ranks": sorted({p.dim() for _, p in named}),
        "largest_tensor": max(p.numel() for _, p in named),
    }
