"""The held-out tasks: problems unlike the meta-training families, each generated locally.

Meta-training (:mod:`compiledopt.tasks`) uses small MLPs (widths 16–64, depth 1–3) on 8×8 digits
or generated 8×8 bar images, a one-hidden-layer teacher regression, and a two-conv CNN on 8×8 bars.
None of the tasks here is one of those: a CNN on 16×16 shapes, a character-level transformer
(:mod:`~benchmarks.learning_quality.charlm`), an MLP ten times wider, a deep layer-normed MLP,
regression of a random Fourier series, logistic regression on ill-conditioned features, the demo's
fine-tuning job, and a long horizon (ten times the steps of the longest meta-training unroll).

A task is a pure function of its seed: :meth:`Task.model` builds the same initial weights every
time, :meth:`Task.batch` the same minibatch for a step, :meth:`Task.validation` one fixed held-out
set (never a training example: generated from separate random streams, or a disjoint split).
"""

import copy
import functools
import math
from typing import Dict, List, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.learning_quality.base import DATA_STREAM, Batch, Task, mlp
from benchmarks.learning_quality.charlm import CharLM
from benchmarks.learning_quality.hf_trainer import GPTLMTrainer
from benchmarks.learning_quality.transformer_tasks import GPTLM, GPTLMRMS, LMFinetune, ShapesViT

# -- a CNN on 16×16 shapes ------------------------------------------------------------------------

SHAPES = ("disc", "square", "diamond", "ring", "cross")
_SIDE = 16


def shape_images(labels: Tensor, generator: torch.Generator) -> Tensor:
    """Noisy 16×16 images of the shapes ``labels`` index (:data:`SHAPES`) at random positions,
    sizes and contrasts: (N, 1, 16, 16)."""
    n = labels.shape[0]
    coords = torch.linspace(-1.0, 1.0, _SIDE)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = torch.empty(n, 2).uniform_(-0.35, 0.35, generator=generator)
    radius = torch.empty(n).uniform_(0.3, 0.55, generator=generator)[:, None, None]
    dx = (xx - centre[:, 0, None, None]).abs()
    dy = (yy - centre[:, 1, None, None]).abs()
    thin = 0.35 * radius
    masks = torch.stack(
        [
            dx**2 + dy**2 < radius**2,
            torch.maximum(dx, dy) < 0.8 * radius,
            dx + dy < radius,
            ((dx**2 + dy**2).sqrt() - radius).abs() < 0.12,
            ((dx < thin) & (dy < radius)) | ((dy < thin) & (dx < radius)),
        ],
        dim=1,
    ).float()
    images = masks[torch.arange(n), labels]
    contrast = torch.empty(n, 1, 1).uniform_(0.6, 1.4, generator=generator)
    noise = 0.35 * torch.randn(n, _SIDE, _SIDE, generator=generator)
    return (contrast * images + noise).unsqueeze(1)


class ShapesCNN(Task):
    """A three-conv CNN classifying 16×16 images of five shapes."""

    name = "cnn"
    summary = "CNN (3 conv layers, 8-16-16 channels) classifying 5 shapes in noisy 16x16 images"
    validation_size = 256

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, len(SHAPES)),
        )

    def sample(self, stream: int, size: int) -> Batch:
        g = self.generator(stream)
        labels = torch.randint(0, len(SHAPES), (size,), generator=g)
        return shape_images(labels, g), labels


# -- digits: a wide MLP, and the demo's fine-tuning job ------------------------------------------


def _digit_batches(x: Tensor, y: Tensor, steps: int, seed: int) -> List[Batch]:
    from compiledopt.tasks.digits import sample_batches

    return sample_batches(x, y, steps, seed)


class WideMLP(Task):
    """All ten digits with one hidden layer of 640 units (ten times the widest meta-training
    MLP); the train/validation split of ``compiledopt finetune``'s
    :func:`~compiledopt.tasks.digits.digits_split`."""

    name = "wide-mlp"
    summary = "MLP 64-640-10 (ReLU) on all 10 scikit-learn digits, 2/3 train 1/3 validation"
    needs = ("sklearn",)

    def __init__(self, seed: int, steps: int) -> None:
        from compiledopt.tasks.digits import digits_split

        super().__init__(seed, steps)
        x, y, self.held_x, self.held_y = digits_split(range(10), self.seed)
        self.batches = _digit_batches(x, y, steps, self.seed + 1)

    def build_model(self) -> nn.Module:
        return mlp([64, 640, 10], nn.ReLU)

    def batch(self, step: int) -> Batch:
        return self.batches[step]

    def validation(self) -> Batch:
        return self.held_x, self.held_y


@functools.lru_cache(maxsize=2)
def _pretrained(seed: int) -> nn.Module:
    from compiledopt.apps.finetune import pretrain

    return pretrain(seed)


class Finetune(Task):
    """``compiledopt finetune``'s job: the 64-64-10 MLP pre-trained with AdamW on digits 0–4
    (:func:`~compiledopt.apps.finetune.pretrain`), fine-tuned on digits 5–9, with that command's
    split and minibatches for the same seed."""

    name = "finetune"
    summary = "fine-tune the demo MLP 64-64-10 pre-trained on digits 0-4 to digits 5-9"
    default_steps = 200
    needs = ("sklearn",)

    def __init__(self, seed: int, steps: int) -> None:
        from compiledopt.tasks.digits import digits_split

        super().__init__(seed, steps)
        x, y, self.held_x, self.held_y = digits_split(range(5, 10), self.seed + 1)
        self.batches = _digit_batches(x, y, steps, self.seed + 2)

    def model(self) -> nn.Module:
        return copy.deepcopy(_pretrained(self.seed))

    def batch(self, step: int) -> Batch:
        return self.batches[step]

    def validation(self) -> Batch:
        return self.held_x, self.held_y


# -- generated data: regression, logistic regression, a deep MLP ---------------------------------


class FourierRegression(Task):
    """Fit a random smooth function of 3 inputs (a sum of 32 random sinusoids) with a two-hidden-
    layer SiLU MLP, under MSE."""

    name = "regression"
    summary = "MLP 3-64-64-1 (SiLU) regressing a random 32-term Fourier series, MSE"
    inputs = 3
    terms = 32

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps)
        g = self.generator(DATA_STREAM)
        self.frequencies = 2.0 * torch.randn(self.inputs, self.terms, generator=g)
        self.phases = torch.empty(self.terms).uniform_(0.0, 2 * math.pi, generator=g)
        self.amplitudes = torch.randn(self.terms, 1, generator=g) / math.sqrt(self.terms / 2)

    def build_model(self) -> nn.Module:
        return mlp([self.inputs, 64, 64, 1], nn.SiLU)

    def sample(self, stream: int, size: int) -> Batch:
        g = self.generator(stream)
        x = torch.empty(size, self.inputs).uniform_(-1.0, 1.0, generator=g)
        y = torch.sin(x @ self.frequencies + self.phases) @ self.amplitudes
        return x, y + 0.01 * torch.randn(size, 1, generator=g)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)


class LongHorizon(FourierRegression):
    """:class:`FourierRegression` for 3,000 steps: ten times the longest meta-training unroll."""

    name = "long-horizon"
    summary = "the regression task for 3000 steps (10x the longest meta-training unroll)"
    default_steps = 3000
    quick_steps = 24


class Logistic(Task):
    """Multinomial logistic regression (a linear layer) on 40 features whose scales span two
    decades (an ill-conditioned problem), labels drawn from a softmax teacher."""

    name = "logistic"
    summary = "linear 40-10 softmax regression, feature scales 0.1-10, noisy teacher labels"
    features = 40
    classes = 10
    validation_size = 2048

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps)
        g = self.generator(DATA_STREAM)
        self.teacher = 2.0 * torch.randn(self.features, self.classes, generator=g)
        self.scales = 10.0 ** torch.empty(self.features).uniform_(-1.0, 1.0, generator=g)

    def build_model(self) -> nn.Module:
        return nn.Linear(self.features, self.classes)

    def sample(self, stream: int, size: int) -> Batch:
        g = self.generator(stream)
        z = torch.randn(size, self.features, generator=g)
        logits = z @ self.teacher / math.sqrt(self.features)
        labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
        return z * self.scales, labels


class DeepMLP(Task):
    """A 7-layer MLP (6 hidden layers of 48 units, each Linear → LayerNorm → GELU) classifying
    points by a random teacher network's arg-max."""

    name = "deep-mlp"
    summary = "MLP 20-48x6-8, LayerNorm + GELU per layer, 8 classes from a random teacher"
    inputs = 20
    width = 48
    depth = 6
    classes = 8

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps)
        g = self.generator(DATA_STREAM)
        self.teacher_in = torch.randn(self.inputs, 32, generator=g) / math.sqrt(self.inputs)
        self.teacher_out = torch.randn(32, self.classes, generator=g)

    def build_model(self) -> nn.Module:
        layers: List[nn.Module] = []
        width = self.inputs
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.width), nn.LayerNorm(self.width), nn.GELU()]
            width = self.width
        return nn.Sequential(*layers, nn.Linear(width, self.classes))

    def sample(self, stream: int, size: int) -> Batch:
        g = self.generator(stream)
        x = torch.randn(size, self.inputs, generator=g)
        labels = (torch.tanh(3.0 * x @ self.teacher_in) @ self.teacher_out).argmax(1)
        return x, labels


#: Every task by name, in report order: the classic suite, then the transformer suite
#: (:mod:`~benchmarks.learning_quality.transformer_tasks`, :mod:`~benchmarks.learning_quality.
#: hf_trainer`).
TASKS: Dict[str, Type[Task]] = {
    task.name: task
    for task in (
        ShapesCNN,
        CharLM,
        WideMLP,
        FourierRegression,
        Logistic,
        Finetune,
        DeepMLP,
        LongHorizon,
        GPTLM,
        GPTLMRMS,
        GPTLMTrainer,
        ShapesViT,
        LMFinetune,
    )
}
#: ``--suite``: named groups of tasks (``all``: every task).
SUITES: Dict[str, List[str]] = {
    "classic": [name for name, task in TASKS.items() if task.suite == "classic"],
    "transformers": [name for name, task in TASKS.items() if task.suite == "transformers"],
    "all": list(TASKS),
}
DEFAULT_SUITE = "classic"


def steps_for(name: str, quick: bool, scale: float = 1.0) -> int:
    """The steps of a run of task ``name``: its default (or quick) count times ``scale``."""
    task = TASKS[name]
    return max(2, round((task.quick_steps if quick else task.default_steps) * scale))


@functools.lru_cache(maxsize=4)
def make(name: str, seed: int, steps: int) -> Task:
    """Task ``name`` with ``seed`` for runs of ``steps`` (cached: a task is immutable)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task: {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name](seed, steps)


def seeds_for(name: str, requested: Optional[int], quick: bool, default: int) -> List[int]:
    """The seeds task ``name`` runs with: ``0 .. n-1`` where ``n`` is ``requested`` when given,
    1 with ``quick``, else the larger of ``default`` and the task's ``min_seeds``."""
    if name not in TASKS:
        raise ValueError(f"Unknown task: {name!r} (choose from {', '.join(TASKS)})")
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"the seed count must be a positive integer, got {requested!r}")
        return list(range(requested))
    return list(range(1 if quick else max(default, TASKS[name].min_seeds)))
