"""MLP classification of scikit-learn's bundled 8×8 handwritten digits (a real data set).

Besides the task family, :func:`digits_split` and :func:`sample_batches` give the fixed split and
the seeded minibatches of the fine-tuning job (:mod:`compiledopt.apps.finetune`) and of the
learning-quality benchmarks.
"""

import functools
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiledopt.tasks.base import Batch, Task, TaskFamily

#: Rows per minibatch of :func:`sample_batches`.
BATCH = 64


@functools.lru_cache(maxsize=1)
def load_digits() -> Tuple[Tensor, Tensor]:
    """The 1797 digits as (N, 64) float32 in [0, 1] and (N,) int64 labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' task family needs scikit-learn (pip install 'compiledopt[tasks]')"
        ) from error
    data = sklearn_digits()
    images = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(data.target, dtype=torch.int64)


class DigitsTask(Task):
    """Classify a random subset of 2 to 5 digit classes with a one-hidden-layer MLP.

    The first 1200 examples are the data pool of training tasks' batches; the rest are used for
    :meth:`evaluation_batch`.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        g = torch.Generator().manual_seed(seed)
        count = int(torch.randint(2, 6, (), generator=g))
        self.digits = torch.randperm(10, generator=g)[:count]
        hidden = int(torch.randint(16, 49, (), generator=g))
        self.batch_size = batch_size
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, count))
        super().__init__(seed, model, device)
        images, labels = load_digits()
        mask = torch.isin(labels, self.digits)
        relabel = torch.full((10,), -1, dtype=torch.int64)
        relabel[self.digits] = torch.arange(count)
        index = torch.nonzero(mask).squeeze(1)
        train, held = index[index < 1200], index[index >= 1200]
        self.pool = (images[train].to(self.device), relabel[labels[train]].to(self.device))
        self.held = (images[held].to(self.device), relabel[labels[held]].to(self.device))

    def batch(self, step: int) -> Batch:
        pick = torch.randint(
            0, len(self.pool[1]), (self.batch_size,), generator=self.generator(step)
        )
        pick = pick.to(self.device)
        return self.pool[0][pick], self.pool[1][pick]

    def evaluation_batch(self) -> Batch:
        return self.held

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)


class DigitsFamily(TaskFamily):
    """MLPs on subsets of scikit-learn's digits."""

    name = "digits"

    def make(self, seed: int) -> Task:
        return DigitsTask(seed, self.device)


def digits_split(classes: Sequence[int], seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and held-out examples (2/3 : 1/3, shuffled by ``seed``) of the given digit classes:
    ``(x_train, y_train, x_held_out, y_held_out)``, the images as (N, 64) rows."""
    images, labels = load_digits()
    index = torch.nonzero(torch.isin(labels, torch.tensor(list(classes)))).squeeze(1)
    index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))]
    cut = 2 * len(index) // 3
    train, held = index[:cut], index[cut:]
    return images[train], labels[train], images[held], labels[held]


def sample_batches(
    x: Tensor, y: Tensor, steps: int, seed: int, batch: int = BATCH
) -> List[Tuple[Tensor, Tensor]]:
    """``steps`` minibatches of ``batch`` rows of ``(x, y)`` drawn with replacement, seeded."""
    generator = torch.Generator().manual_seed(seed)
    picks = [torch.randint(0, len(y), (batch,), generator=generator) for _ in range(steps)]
    return [(x[p], y[p]) for p in picks]
