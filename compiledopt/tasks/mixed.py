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
