"""8×8 image classification with small MLPs: a meta-training distribution of tasks.

Every task draws, from its seed alone:

* a **data source**: scikit-learn's bundled digits (a random subset of 2 to 10 of the classes,
  relabelled in a random order), or one of two generators of 8×8 images that need no download:
  ``"prototypes"`` (each class a smooth random pattern; examples are it shifted by up to one pixel,
  rescaled and noised) and ``"shapes"`` (each class a soft bar, disc, ring, cross or square
  outline at its own angle, place and size; examples jitter those and add noise);
* an **MLP** on the flattened image (64 inputs): 1 to 3 hidden layers, each 16, 32 or 64 wide,
  one activation among relu, tanh, gelu and silu, default PyTorch-style uniform initialisation;
* a **batch size** of 32, 64 or 128.

Each source has a training pool, the only examples :meth:`ImageMLPTask.batch` draws from, and a
disjoint validation pool for :meth:`~ImageMLPTask.validation_batch` and
:meth:`~ImageMLPTask.evaluation_batch`. For digits the pools are the first 1200 of the 1797
images and the rest; generated pools come from two different random streams of the task's
generator, so they share no example. Everything is a deterministic function of the seed (batch
``k`` of ``(seed, k)``), and the forward pass is a pure function of the parameters (no
data-dependent control flow), so tasks work under ``torch.func.functional_call``, ``grad`` and
``vmap``.

:class:`ImageMLPFamily` augments its training tasks (per-tensor parameter scales and a loss
scale, see :mod:`compiledopt.tasks.augment`) unless asked not to; held-out tasks stay as they are.
"""

import functools
import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiledopt.tasks.augment import AugmentableFamily
from compiledopt.tasks.base import Batch, Task

__all__ = ["SOURCES", "ImageMLP", "ImageMLPFamily", "ImageMLPTask", "TaskSpec", "task_spec"]

#: The data sources a task draws from (uniformly).
SOURCES = ("digits", "prototypes", "shapes")
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
}
WIDTHS = (16, 32, 64)
BATCH_SIZES = (32, 64, 128)
MAX_DEPTH = 3

_SIZE = 8
_DIGITS_POOL = 1200  # digits: rows [0, 1200) are the training pool, the rest validation
_GENERATED_POOL = 1200  # generated: examples in the training pool ...
_GENERATED_VALIDATION = 512  # ... and in the validation pool
_SHAPES = ("bar", "disc", "ring", "cross", "square")
_MASK64 = (1 << 64) - 1


def _stream_seed(seed: int, tag: int) -> int:
    """A well-mixed 63-bit seed for stream ``tag`` of ``seed`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + tag * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _digits() -> Tuple[Tensor, Tensor]:
    from compiledopt.tasks.digits import load_digits

    try:
        return load_digits()
    except ImportError as error:
        raise ImportError(
            "the 'image-mlp' task family needs scikit-learn (pip install 'compiledopt[tasks]')"
        ) from error


# -- generated data ---------------------------------------------------------------------------


def _pixels() -> Tensor:
    """The pixels' coordinates in ``[-1, 1]``, homogeneous: rows x, y and 1, (3, 64)."""
    coords = torch.linspace(-1.0, 1.0, _SIZE)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten(), torch.ones(_SIZE * _SIZE)])


def _prototype_classes(generator: torch.Generator, classes: int) -> Tensor:
    """``classes`` smooth random patterns, each upsampled from 3×3 to 5×5 noise: (k, 3, 3, 8, 8).

    Entry ``[c, i, j]`` is pattern ``c`` shifted by ``(i - 1, j - 1)`` pixels (zero-filled).
    """
    coarse = int(torch.randint(3, 6, (), generator=generator))
    noise = torch.randn(classes, 1, coarse, coarse, generator=generator)
    smooth = F.interpolate(noise, size=(_SIZE, _SIZE), mode="bilinear", align_corners=True)
    smooth = smooth[:, 0]
    smooth = (smooth - smooth.mean((1, 2), keepdim=True)) / smooth.std((1, 2), keepdim=True)
    padded = F.pad(smooth, (1, 1, 1, 1))
    rows = [
        torch.stack([padded[:, i : i + _SIZE, j : j + _SIZE] for j in range(3)], 1)
        for i in range(3)
    ]
    return torch.stack(rows, 1)


def _prototype_examples(
    shifted: Tensor, noise: float, size: int, generator: torch.Generator
) -> Batch:
    labels = torch.randint(0, shifted.shape[0], (size,), generator=generator)
    rows, cols = torch.randint(0, 3, (2, size), generator=generator)
    amplitude = torch.empty(size, 1, 1).uniform_(0.7, 1.3, generator=generator)
    images = amplitude * shifted[labels, rows, cols]
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.reshape(size, _SIZE * _SIZE), labels


def _shape_classes(generator: torch.Generator, classes: int) -> Tensor:
    """Per class: shape index, angle, centre x, centre y, size (k, 5); no shape used > twice."""
    order = torch.randperm(len(_SHAPES), generator=generator).repeat(2)[:classes]
    angle = torch.rand(classes, generator=generator) * math.pi
    centre = torch.empty(classes, 2).uniform_(-0.4, 0.4, generator=generator)
    size = torch.empty(classes).uniform_(0.3, 0.7, generator=generator)
    return torch.cat([order[:, None].float(), angle[:, None], centre, size[:, None]], 1)


def _shape_examples(
    spec: Tensor, width: float, noise: float, size: int, generator: torch.Generator
) -> Batch:
    labels = torch.randint(0, spec.shape[0], (size,), generator=generator)
    # Pool order is free (batches draw at random): group the examples by shape, to use slices.
    kinds = spec[:, 0].long()
    labels = labels[torch.argsort(kinds[labels] * spec.shape[0] + labels)]
    counts = torch.bincount(kinds[labels], minlength=len(_SHAPES)).tolist()
    _, angle, cx, cy, radius = spec[labels].unbind(1)
    jitter = torch.randn(3, size, generator=generator)
    angle = angle + 0.1 * jitter[0]
    cx, cy = cx + 0.12 * jitter[1], cy + 0.12 * jitter[2]
    radius = radius[:, None] * torch.empty(size, 1).uniform_(0.85, 1.15, generator=generator)
    amplitude = torch.empty(size, 1).uniform_(0.7, 1.3, generator=generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Each pixel's coordinates along the example's two axes, from its centre: u and v, (n, 64).
    along = torch.stack([cos, sin, -cos * cx - sin * cy], 1)
    across = torch.stack([-sin, cos, sin * cx - cos * cy], 1)
    pixels = _pixels()
    u, v = (along @ pixels).abs(), (across @ pixels).abs()
    parts, first = [], 0  # the distance of each pixel to the example's shape, by shape
    for name, count in zip(_SHAPES, counts):
        a, b = u[first : first + count], v[first : first + count]
        r = radius[first : first + count]
        first += count
        if name == "bar":
            parts.append(a)
        elif name == "disc":
            parts.append(F.relu(torch.sqrt(a * a + b * b) - r))
        elif name == "ring":
            parts.append((torch.sqrt(a * a + b * b) - r).abs())
        elif name == "cross":
            parts.append(torch.minimum(a, b))
        else:  # square outline
            parts.append((torch.maximum(a, b) - r).abs())
    images = torch.cat(parts).mul_(1.0 / width).square_().neg_().exp_().mul_(amplitude)
    return images.add_(torch.randn(images.shape, generator=generator), alpha=noise), labels


@functools.lru_cache(maxsize=32)
def generated_pools(source: str, seed: int, classes: int) -> Tuple[Batch, Batch, Tuple[int, int]]:
    """The training and validation pools of generated ``source`` data for ``seed``.

    The classes (patterns or shapes) and the noise level come from one stream of ``seed``; the
    training and validation examples from two others, whose seeds are returned as a third item.
    Cached (about 0.45 MB an entry), since held-out tasks are made again at every evaluation.
    """
    definition = torch.Generator().manual_seed(_stream_seed(seed, 1))
    streams = (_stream_seed(seed, 2), _stream_seed(seed, 3))
    sizes = (_GENERATED_POOL, _GENERATED_VALIDATION)
    if source == "prototypes":
        shifted = _prototype_classes(definition, classes)
        noise = float(torch.empty(()).uniform_(0.4, 1.4, generator=definition))

        def make(stream: int, size: int) -> Batch:
            generator = torch.Generator().manual_seed(stream)
            return _prototype_examples(shifted, noise, size, generator)

    elif source == "shapes":
        spec = _shape_classes(definition, classes)
        width = float(torch.empty(()).uniform_(0.15, 0.35, generator=definition))
        noise = float(torch.empty(()).uniform_(0.15, 0.5, generator=definition))

        def make(stream: int, size: int) -> Batch:
            generator = torch.Generator().manual_seed(stream)
            return _shape_examples(spec, width, noise, size, generator)

    else:
        raise ValueError(f"Invalid generated source: {source!r} (prototypes or shapes)")
    train, validation = (make(stream, size) for stream, size in zip(streams, sizes))
    return train, validation, streams


# -- the model --------------------------------------------------------------------------------


class _Dense(nn.Linear):
    """An ``nn.Linear`` holding the given weight and bias (drawn without the global RNG); a
    linear layer by type, so :func:`compiledopt.roles.roles_of` finds the input layer
    and the head."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class ImageMLP(nn.Module):
    """``64 → widths… → classes`` with ``activation`` after every hidden layer.

    Parameters are named ``layers.<i>.weight`` / ``layers.<i>.bias``, the last layer being the
    classifier. Weights and biases are uniform in ``±1 / sqrt(fan_in)`` (PyTorch's ``nn.Linear``
    default), drawn from ``generator`` so that building a model leaves the global RNG alone.
    """

    def __init__(
        self,
        widths: Sequence[int],
        classes: int,
        activation: str,
        generator: torch.Generator,
        in_features: int = _SIZE * _SIZE,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation: {activation!r} (one of {sorted(ACTIVATIONS)})")
        self.activation = activation
        self.sizes = (in_features, *widths, classes)
        layers = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            weight = (torch.rand(fan_out, fan_in, generator=generator) * 2.0 - 1.0) * bound
            bias = (torch.rand(fan_out, generator=generator) * 2.0 - 1.0) * bound
            layers.append(_Dense(weight, bias))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        *hidden, last = self.layers
        for layer in hidden:
            x = act(layer(x))
        return last(x)


# -- the task ---------------------------------------------------------------------------------


def _pick(options: Sequence, generator: torch.Generator):
    return options[int(torch.randint(0, len(options), (), generator=generator))]


class TaskSpec(NamedTuple):
    """What a seed draws, before the parameters and the data."""

    source: str
    classes: int
    widths: Tuple[int, ...]
    activation: str
    batch_size: int
    digits: Optional[Tuple[int, ...]]  # the digit of each label (digits source only)


def _draw_spec(g: torch.Generator) -> TaskSpec:
    source = _pick(SOURCES, g)
    classes = int(torch.randint(2, 11, (), generator=g))
    depth = int(torch.randint(1, MAX_DEPTH + 1, (), generator=g))
    widths = tuple(_pick(WIDTHS, g) for _ in range(depth))
    activation = _pick(tuple(ACTIVATIONS), g)
    batch_size = _pick(BATCH_SIZES, g)
    digits = None
    if source == "digits":
        digits = tuple(torch.randperm(10, generator=g)[:classes].tolist())
    return TaskSpec(source, classes, widths, activation, batch_size, digits)


def task_spec(seed: int) -> TaskSpec:
    """The data source, classes, hidden widths, activation and batch size of task ``seed``.

    Cheap (no data, no parameters): for choosing or counting tasks.
    """
    return _draw_spec(torch.Generator().manual_seed(seed))


class ImageMLPTask(Task):
    """One 8×8 classification problem with one MLP, all drawn from ``seed`` (see the module).

    Attributes:
        spec (TaskSpec): what the seed drew; its fields are also attributes:
        source (str): ``"digits"``, ``"prototypes"`` or ``"shapes"``.
        classes (int): the number of classes (and outputs).
        digits (tuple of int or None): the digit of each label, for the digits source.
        widths (tuple of int): hidden layer widths.
        activation (str): ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"silu"``.
        batch_size (int): examples per :meth:`batch` and :meth:`validation_batch`.
        pool, validation (Batch): the training and validation pools, inputs flattened to 64.
        pool_index, validation_index (Tensor or None): for digits, the data-set rows of the pools.
        streams (tuple of int or None): for generated data, the seeds of the two pools' streams.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)
        self.spec = _draw_spec(g)
        self.source, self.classes, self.widths, self.activation, self.batch_size, self.digits = (
            self.spec
        )
        model = ImageMLP(self.widths, self.classes, self.activation, g)
        super().__init__(seed, model, device)
        self.pool_index: Optional[Tensor] = None
        self.validation_index: Optional[Tensor] = None
        self.streams: Optional[Tuple[int, int]] = None
        if self.source == "digits":
            pool, validation = self._digit_pools()
        else:
            pool, validation, self.streams = generated_pools(self.source, seed, self.classes)
        self.pool: Batch = (pool[0].to(self.device), pool[1].to(self.device))
        self.validation: Batch = (validation[0].to(self.device), validation[1].to(self.device))

    def _digit_pools(self) -> Tuple[Batch, Batch]:
        assert self.digits is not None, "the digits source always draws its digits"
        images, labels = _digits()
        relabel = torch.full((10,), -1, dtype=torch.int64)
        relabel[list(self.digits)] = torch.arange(self.classes)
        index = torch.nonzero(relabel[labels] >= 0).squeeze(1)
        self.pool_index = index[index < _DIGITS_POOL]
        self.validation_index = index[index >= _DIGITS_POOL]
        pool_rows, validation_rows = self.pool_index, self.validation_index
        return (
            (images[pool_rows], relabel[labels[pool_rows]]),
            (images[validation_rows], relabel[labels[validation_rows]]),
        )

    def _draw(self, pool: Batch, stream: int) -> Batch:
        pick = torch.randint(0, len(pool[1]), (self.batch_size,), generator=self.generator(stream))
        pick = pick.to(self.device)
        return pool[0][pick], pool[1][pick]

    def batch(self, step: int) -> Batch:
        """``batch_size`` training-pool examples, drawn with replacement from ``(seed, step)``."""
        return self._draw(self.pool, step)

    def validation_batch(self, step: int) -> Batch:
        """``batch_size`` examples of the validation pool, drawn from ``(seed, step)``."""
        return self._draw(self.validation, -1 - step)

    def evaluation_batch(self) -> Batch:
        """The whole validation pool (512 generated examples, or the digits' held-out rows)."""
        return self.validation

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def describe(self) -> str:
        """One line for logs: data source, classes, layer sizes, activation and batch size."""
        if self.digits is not None:
            data = f"digits {list(self.digits)}"
        else:
            data = f"{self.source} {self.classes} classes"
        sizes = "-".join(str(n) for n in cast(ImageMLP, self.model).sizes)
        return f"{data}, mlp {sizes} {self.activation}, batch {self.batch_size}"

    def __repr__(self) -> str:
        return f"ImageMLPTask(seed={self.seed}: {self.describe()})"


class ImageMLPFamily(AugmentableFamily):
    """MLPs on 8×8 images from digits or two generators, everything varied per task.

    Needs scikit-learn (the digits are part of the distribution): it is imported, and the digits
    loaded, when the family is built, so a missing package shows at once.

    Args:
        seed (int, optional): distinguishes task streams. (default: 0)
        device (str or torch.device, optional): device of the tasks. (default: "cpu")
        augment (bool, optional): augment training tasks as :class:`AugmentedFamily` does, with
            the two limits below; held-out tasks are never augmented. (default: True)
        max_param_scale (float, optional): limit of the per-tensor scales. (default: 10.0)
        max_loss_scale (float, optional): limit of the loss scale. (default: 10.0)

    :meth:`make` always returns the plain task of a seed; :meth:`sample` is what meta-training
    uses.
    """

    name = "image-mlp"

    def prepare(self) -> None:
        _digits()  # a missing scikit-learn shows at once

    def make(self, seed: int) -> ImageMLPTask:
        return ImageMLPTask(seed, self.device)
