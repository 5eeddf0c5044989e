"""A small CNN classifying generated 8×8 images of oriented bars."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiledopt.tasks.base import Batch, Task, TaskFamily

_SIZE = 8


def _bar_images(angles: Tensor, offsets: Tensor, width: float) -> Tensor:
    """Soft bars through the image at ``angles`` shifted by ``offsets``: (N, 1, 8, 8)."""
    coords = torch.linspace(-1.0, 1.0, _SIZE)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    normal_x, normal_y = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    distance = xx * normal_x + yy * normal_y - offsets[:, None, None]
    return torch.exp(-((distance / width) ** 2)).unsqueeze(1)


class BarsTask(Task):
    """Classify the orientation of a noisy bar into one of ``classes`` angle bins.

    Each task draws its number of classes, the bar width, the noise level and a random rotation
    of the class angles.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.classes = int(torch.randint(2, 5, (), generator=g))
        self.width = float(torch.empty(()).uniform_(0.2, 0.5, generator=g))
        self.noise = float(torch.empty(()).uniform_(0.1, 0.4, generator=g))
        self.rotation = float(torch.empty(()).uniform_(0.0, math.pi, generator=g))
        self.batch_size = batch_size
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, self.classes),
        )
        super().__init__(seed, model, device)

    def _sample(self, stream: int, size: int) -> Batch:
        g = self.generator(stream)
        labels = torch.randint(0, self.classes, (size,), generator=g)
        jitter = torch.randn(size, generator=g) * 0.1
        angles = self.rotation + labels * math.pi / self.classes + jitter
        offsets = torch.empty(size).uniform_(-0.5, 0.5, generator=g)
        images = _bar_images(angles, offsets, self.width)
        images = images + self.noise * torch.randn(images.shape, generator=g)
        return images.to(self.device), labels.to(self.device)

    def batch(self, step: int) -> Batch:
        return self._sample(step, self.batch_size)

    def evaluation_batch(self) -> Batch:
        return self._sample(-1, 512)

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)


class BarsFamily(TaskFamily):
    """Small CNNs on generated bar-orientation images (no downloads)."""

    name = "bars"

    def make(self, seed: int) -> Task:
        return BarsTask(seed, self.device)
