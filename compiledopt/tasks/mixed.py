"""A mixture of the built-in task families."""

import torch

from compiledopt.tasks.base import Task, TaskFamily
from compiledopt.tasks.digits import DigitsFamily
from compiledopt.tasks.images import BarsFamily
from compiledopt.tasks.regression import RegressionFamily


class MixedFamily(TaskFamily):
    """Every built-in family in turn: task ``i`` comes from family ``i mod 3`` (regression, bars,
    digits), so a learned optimizer meets MLPs, CNNs and a real data set during meta-training."""

    name = "mixed"
    members = (RegressionFamily, BarsFamily, DigitsFamily)

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(seed, device)
        self.families = [member(seed, device) for member in self.members]

    def sample(self, index: int, split: str = "train") -> Task:
        family = self.families[index % len(self.families)]
        return family.sample(index // len(self.families), split)


class MixedLMFamily(TaskFamily):
    """Image classification and language modelling in turn: task ``i`` comes from
    ``image-mlp`` for even ``i`` and from ``text-lm`` for odd ``i`` (task ``i // 2`` of each), so
    a learned optimizer meets MLPs on images and small transformers on text during
    meta-training. Needs scikit-learn (the image family's digits).

    Args:
        seed (int, optional): distinguishes task streams. (default: 0)
        device (str or torch.device, optional): device of the tasks. (default: "cpu")
        augment (bool, optional): augment both families' training tasks. (default: True)
        max_param_scale, max_loss_scale (float, optional): the augmentation's limits.
            (default: 10.0)
    """

    name = "mixed-lm"

    def __init__(
        self,
        seed: int = 0,
        device: torch.device | str = "cpu",
        augment: bool = True,
        max_param_scale: float = 10.0,
        max_loss_scale: float = 10.0,
    ) -> None:
        from compiledopt.tasks.image_mlp import ImageMLPFamily
        from compiledopt.tasks.text_lm import TextLMFamily

        super().__init__(seed, device)
        self.families = [
            ImageMLPFamily(
                seed,
                device,
                augment=augment,
                max_param_scale=max_param_scale,
                max_loss_scale=max_loss_scale,
            ),
            TextLMFamily(
                seed,
                device,
                augment=augment,
                max_param_scale=max_param_scale,
                max_loss_scale=max_loss_scale,
            ),
        ]

    def sample(self, index: int, split: str = "train") -> Task:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"Invalid task index: {index!r}")
        family = self.families[index % len(self.families)]
        return family.sample(index // len(self.families), split)

    def __repr__(self) -> str:
        return f"MixedLMFamily({self.families[0]!r}, {self.families[1]!r})"
