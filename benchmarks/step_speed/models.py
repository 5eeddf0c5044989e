"""The benchmark's models: parameter lists from 0.1M to 16.8M parameters.

``mlp``, ``convnet`` and ``transformer`` are :func:`compiledopt.bench.example_model`'s (the models
``compiledopt bench`` offers); ``mlp-stack`` is 16 ``Linear(1024, 1024)``; ``resnet18`` is
torchvision's ResNet-18 parameter list written out by hand (there for compile time).

:class:`ResNet18` is the same network as a module that runs (BasicBlock, no torchvision), for the
forward + backward time that an optimizer step is compared with; :func:`many_shapes` and
:func:`mixed_shapes` are the parameter lists of the many-small-tensors cases, and
:func:`shape_params` gives any list parameters with fixed random gradients.
"""

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

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


def gpt2_tiny_shapes(
    vocab: int = 80, context: int = 64, width: int = 64, layers: int = 2
) -> Shapes:
    """The parameter list of a tiny GPT-2 as ``transformers.GPT2LMHeadModel`` names it, the
    character-level model people fine-tune in examples (2 layers of width 64, a vocabulary of 80,
    context 64: 109,312 parameters in 28 tensors), written out by hand: the token and position
    embeddings, per layer two LayerNorms, the fused query/key/value and output projections and
    the 4x MLP (``Conv1D`` weights, input by output), a final LayerNorm; the head is tied to the
    token embedding (no tensor of its own)."""
    shapes: Shapes = [
        ("transformer.wte.weight", (vocab, width)),
        ("transformer.wpe.weight", (context, width)),
    ]
    for layer in range(layers):
        h = f"transformer.h.{layer}"
        shapes += [
            (f"{h}.ln_1.weight", (width,)),
            (f"{h}.ln_1.bias", (width,)),
            (f"{h}.attn.c_attn.weight", (width, 3 * width)),
            (f"{h}.attn.c_attn.bias", (3 * width,)),
            (f"{h}.attn.c_proj.weight", (width, width)),
            (f"{h}.attn.c_proj.bias", (width,)),
            (f"{h}.ln_2.weight", (width,)),
            (f"{h}.ln_2.bias", (width,)),
            (f"{h}.mlp.c_fc.weight", (width, 4 * width)),
            (f"{h}.mlp.c_fc.bias", (4 * width,)),
            (f"{h}.mlp.c_proj.weight", (4 * width, width)),
            (f"{h}.mlp.c_proj.bias", (width,)),
        ]
    return [*shapes, ("transformer.ln_f.weight", (width,)), ("transformer.ln_f.bias", (width,))]


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
    "gpt2-tiny": (gpt2_tiny_shapes, "tiny GPT-2 parameter list: 2 layers, width 64, tied head"),
}


def model_params(name: str, seed: int = 0) -> List[Tuple[str, nn.Parameter]]:
    """The named parameters of model ``name``, each with a fixed random gradient."""
    return shape_params(MODELS[name][0](), seed)


def shape_params(shapes: Shapes, seed: int = 0) -> List[Tuple[str, nn.Parameter]]:
    """Parameters of ``shapes`` (``(name, shape)`` pairs), each with a fixed random gradient."""
    generator = torch.Generator().manual_seed(seed)
    named = []
    for pname, shape in shapes:
        param = nn.Parameter(0.02 * torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator)
        named.append((pname, param))
    return named


def many_shapes(count: int, numel: int) -> Shapes:
    """``count`` vectors of ``numel`` elements each."""
    if count < 1 or numel < 1:
        raise ValueError(f"Invalid many_shapes({count}, {numel}): both must be positive")
    return [(f"p{i}", (numel,)) for i in range(count)]


def mixed_shapes(count: int, max_numel: int, seed: int = 0) -> Shapes:
    """``count`` small tensors of mixed ranks and sizes, fixed by ``seed``: in turn a vector
    (bias, norm), a matrix (linear), a conv kernel ``(out, in, 3, 3)`` and a vector again, with
    sizes drawn log-uniformly up to about ``max_numel``; every 100th one a scalar (rank 0)."""
    if count < 1 or max_numel < 16:
        raise ValueError(f"Invalid mixed_shapes({count}, {max_numel}): count ≥ 1, max_numel ≥ 16")
    generator = torch.Generator().manual_seed(seed)
    shapes: Shapes = []
    for i in range(count):
        numel = int(torch.empty(()).uniform_(0.0, math.log(max_numel), generator=generator).exp())
        numel = max(1, numel)
        kind = i % 4
        if i % 100 == 99:
            shape: Tuple[int, ...] = ()
        elif kind == 1:
            rows = max(1, int(math.sqrt(numel)))
            shape = (rows, max(1, numel // rows))
        elif kind == 2:
            channels = max(1, int(math.sqrt(numel / 9)))
            shape = (channels, max(1, numel // (9 * channels)), 3, 3)
        else:
            shape = (numel,)
        shapes.append((f"p{i}", shape))
    return shapes


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3×3 convolutions (no bias) with batch norm, and a
    1×1 convolution + batch norm on the shortcut where the size or width changes."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 written out (no torchvision): the parameter list of :func:`resnet18_shapes`
    (names and shapes) at ``width=64, classes=1000``; a smaller ``width`` scales every stage."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        if width < 1 or classes < 1:
            raise ValueError(f"Invalid ResNet18(width={width}, classes={classes})")
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inputs = width
        for layer, (factor, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
            blocks = [BasicBlock(inputs, width * factor, stride)]
            blocks.append(BasicBlock(width * factor, width * factor, 1))
            setattr(self, f"layer{layer}", nn.Sequential(*blocks))
            inputs = width * factor
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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
