"""The built-in task families by name."""

from typing import Dict, Type

import torch

from compiledopt.tasks.base import TaskFamily
from compiledopt.tasks.digits import DigitsFamily
from compiledopt.tasks.image_mlp import ImageMLPFamily
from compiledopt.tasks.images import BarsFamily
from compiledopt.tasks.mixed import MixedFamily, MixedLMFamily
from compiledopt.tasks.regression import RegressionFamily
from compiledopt.tasks.text_lm import TextLMFamily

FAMILIES: Dict[str, Type[TaskFamily]] = {
    family.name: family
    for family in (
        RegressionFamily,
        BarsFamily,
        DigitsFamily,
        MixedFamily,
        ImageMLPFamily,
        TextLMFamily,
        MixedLMFamily,
    )
}


def get_family(name: str, seed: int = 0, device: torch.device | str = "cpu") -> TaskFamily:
    """The built-in family called ``name`` (see :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family: {name!r} (choose from {sorted(FAMILIES)})")
    return FAMILIES[name](seed=seed, device=device)
