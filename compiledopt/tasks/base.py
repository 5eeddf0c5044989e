"""Tasks for meta-training: a model, its initial parameters and a deterministic stream of batches.

A :class:`Task` is fully determined by its family and seed, and its batch at inner step ``k`` is a
function of ``(seed, k)`` alone, so a meta-training run can be checkpointed and resumed exactly
without saving any random-number-generator state. A :class:`TaskFamily` samples tasks for the
``"train"`` split and disjoint ``"heldout"`` tasks for evaluation.
"""

from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

Batch = Tuple[Tensor, Tensor]

SPLITS = ("train", "heldout")
# Held-out task seeds live far from training ones, so the two splits never share a task.
_HELDOUT_OFFSET = 1_000_003


def task_seed(family_seed: int, index: int, split: str) -> int:
    """The seed of task ``index`` of ``split``; train and held-out seeds are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
    if index < 0:
        raise ValueError(f"Invalid task index: {index}")
    return family_seed * 7_919 + index + (_HELDOUT_OFFSET if split == "heldout" else 0)


class Task:
    """One optimization problem: ``loss(params, batch(k))`` for inner steps ``k = 0, 1, ...``.

    Subclasses build ``self.model`` (used functionally: its own parameters are only the
    initialisation) and implement :meth:`batch` and :meth:`criterion`.

    Args:
        seed (int): determines the data, the model initialisation and every batch.
        device (str or torch.device, optional): where parameters and batches live.
            (default: "cpu")
    """

    def __init__(self, seed: int, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.device = torch.device(device)
        self.model = model.to(self.device)

    def generator(self, stream: int) -> torch.Generator:
        """A CPU generator seeded by the task seed and ``stream`` (e.g. the inner step)."""
        return torch.Generator().manual_seed(self.seed * 1_000_033 + stream)

    def init_params(self) -> Dict[str, Tensor]:
        """Fresh initial parameters (detached copies; the same on every call)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def batch(self, step: int) -> Batch:
        """The training batch of inner step ``step``."""
        raise NotImplementedError

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, params: Dict[str, Tensor], batch: Batch) -> Tensor:
        """The scalar loss of the model at ``params`` on ``batch``."""
        inputs, target = batch
        return self.criterion(functional_call(self.model, params, (inputs,)), target)

    def evaluation_batch(self) -> Batch:
        """A fixed larger batch for reporting the task's loss."""
        raise NotImplementedError

    def roles(self) -> Dict[str, str]:
        """The role of each parameter by name (the names of :meth:`init_params`): ``matrix``,
        ``vector``, ``embedding``, ``head`` or ``input``, found from the model's module types by
        :func:`compiledopt.roles.roles_of`. Meta-training routes each parameter to the
        rule of its role."""
        from compiledopt.roles import roles_of

        by_id = roles_of(self.model)
        return {name: by_id[id(param)] for name, param in self.model.named_parameters()}


class TaskFamily:
    """A distribution of tasks. ``sample(index, split)`` is deterministic.

    Args:
        seed (int, optional): distinguishes task streams of the same family. (default: 0)
        device (str or torch.device, optional): device of the tasks. (default: "cpu")
    """

    name = "task-family"

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.device = torch.device(device)

    def make(self, seed: int) -> Task:
        raise NotImplementedError

    def sample(self, index: int, split: str = "train") -> Task:
        """Task ``index`` of ``split`` (``"train"`` or ``"heldout"``)."""
        return self.make(task_seed(self.seed, index, split))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, device={str(self.device)!r})"
