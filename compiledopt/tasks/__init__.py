"""Built-in task families for meta-training and evaluation; none needs a download."""

from typing import Dict, Type

import torch

from compiledopt.tasks.base import Task, TaskFamily, task_seed
from compiledopt.tasks.digits import DigitsFamily, DigitsTask
from compiledopt.tasks.images import BarsFamily, BarsTask
from compiledopt.tasks.regression import RegressionFamily, TeacherRegressionTask

FAMILIES: Dict[str, Type[TaskFamily]] = {
    family.name: family for family in (RegressionFamily, BarsFamily, DigitsFamily)
}


def get_family(name: str, seed: int = 0, device: torch.device | str = "cpu") -> TaskFamily:
    """The built-in family called ``name`` (see :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family: {name!r} (choose from {sorted(FAMILIES)})")
    return FAMILIES[name](seed=seed, device=device)


__all__ = [
    "FAMILIES",
    "BarsFamily",
    "BarsTask",
    "DigitsFamily",
    "DigitsTask",
    "RegressionFamily",
    "Task",
    "TaskFamily",
    "TeacherRegressionTask",
    "get_family",
    "task_seed",
]
