"""Task augmentation: reparametrisations that change what an optimizer sees, not what it solves.

An :class:`AugmentedTask` rescales each parameter tensor of a task and scales its loss. The
optimizer works on ``p' = p / c`` (one positive ``c`` per tensor) and minimises ``s · L(c ⊙ p')``,
while the model computes with ``p = c ⊙ p'``; so every ``p'`` is the same network as ``c ⊙ p'``
in the original task and the minimisers correspond one to one: the task's function is unchanged.
What changes is what the optimizer observes: parameters of scale ``|p| / c``, gradients
``s · c ⊙ ∇L(p)``, losses ``s · L``. A learned optimizer meta-trained across such tasks is pushed to
be invariant to those scales, which it meets in real models (layer widths, initialisation and
loss conventions differ) and which plain training tasks barely vary.

:class:`AugmentedFamily` draws one augmentation per training task, log-uniformly, as a function
of the task's seed (so meta-training stays exactly resumable); held-out tasks are left as they
are, so evaluation measures the original tasks.
"""

import math
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from compiledopt.tasks.base import Batch, Task, TaskFamily

__all__ = ["AugmentableFamily", "AugmentedFamily", "AugmentedTask"]


def _check_scale(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {what}: {value!r} (a positive finite number)")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {what}: {value!r} (a positive finite number)")
    return float(value)


class AugmentedTask(Task):
    """``task`` with its parameter tensors rescaled and its loss scaled (see the module).

    Args:
        task (Task): the original task.
        param_scales (mapping of str to float): ``c`` per parameter name (missing names: 1).
        loss_scale (float, optional): ``s``. (default: 1.0)

    Example:
        >>> from compiledopt.tasks import RegressionFamily
        >>> task = RegressionFamily(seed=0).sample(0)
        >>> augmented = AugmentedTask(task, {"0.weight": 10.0}, loss_scale=0.1)
        >>> params = augmented.init_params()  # "0.weight" is the original's divided by 10
    """

    def __init__(
        self, task: Task, param_scales: Mapping[str, float], loss_scale: float = 1.0
    ) -> None:
        names = dict(task.model.named_parameters())
        unknown = sorted(set(param_scales) - set(names))
        if unknown:
            raise ValueError(f"param_scales names no parameter of the task: {unknown}")
        self.task = task
        self.scales: Dict[str, float] = {
            name: _check_scale(param_scales.get(name, 1.0), f"scale of parameter {name!r}")
            for name in names
        }
        self.loss_scale = _check_scale(loss_scale, "loss_scale")
        super().__init__(task.seed, task.model, task.device)

    def original(self, params: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The original task's parameters ``c ⊙ p'`` for the augmented ``params``."""
        return {name: value * self.scales[name] for name, value in params.items()}

    def init_params(self) -> Dict[str, Tensor]:
        return {n: p / self.scales[n] for n, p in self.task.init_params().items()}

    def batch(self, step: int) -> Batch:
        return self.task.batch(step)

    def validation_batch(self, step: int) -> Batch:
        """The original task's ``validation_batch(step)``, for tasks that have one."""
        validation_batch = getattr(self.task, "validation_batch", None)
        if validation_batch is None:
            raise AttributeError(f"{type(self.task).__name__} has no validation_batch")
        return validation_batch(step)

    def evaluation_batch(self) -> Batch:
        return self.task.evaluation_batch()

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return self.loss_scale * self.task.criterion(output, target)

    def loss(self, params: Dict[str, Tensor], batch: Batch) -> Tensor:
        """``s · L(c ⊙ p')``: the loss the optimizer minimises."""
        return self.loss_scale * self.task.loss(self.original(params), batch)

    def unscaled_loss(self, params: Dict[str, Tensor], batch: Batch) -> Tensor:
        """``L(c ⊙ p')``: the original task's loss, for reporting."""
        return self.task.loss(self.original(params), batch)


class AugmentedFamily(TaskFamily):
    """A family whose training tasks are augmented, each by its own draw.

    Every parameter tensor's scale ``c`` and the loss scale ``s`` are log-uniform in
    ``[1 / r, r]`` for ``r = max_param_scale`` and ``max_loss_scale``, drawn from the task's seed.

    Args:
        family (TaskFamily): the family of original tasks.
        max_param_scale (float, optional): ``r`` of the parameter scales (1: none). (default: 10.0)
        max_loss_scale (float, optional): ``r`` of the loss scale (1: none). (default: 10.0)
        augment_heldout (bool, optional): augment the held-out split too. (default: False)
    """

    def __init__(
        self,
        family: TaskFamily,
        max_param_scale: float = 10.0,
        max_loss_scale: float = 10.0,
        augment_heldout: bool = False,
    ) -> None:
        if not isinstance(family, TaskFamily):
            raise TypeError(f"AugmentedFamily wraps a TaskFamily, got {type(family).__name__}")
        for value, what in (
            (max_param_scale, "max_param_scale"),
            (max_loss_scale, "max_loss_scale"),
        ):
            if _check_scale(value, what) < 1.0:
                raise ValueError(f"Invalid {what}: {value!r} (at least 1)")
        super().__init__(family.seed, family.device)
        self.family = family
        self.name = f"augmented-{family.name}"
        self.max_param_scale = float(max_param_scale)
        self.max_loss_scale = float(max_loss_scale)
        self.augment_heldout = bool(augment_heldout)

    def sample(self, index: int, split: str = "train") -> Task:
        task = self.family.sample(index, split)
        if split != "train" and not self.augment_heldout:
            return task
        generator = torch.Generator().manual_seed(task.seed * 7_927 + 11)

        def draw(limit: float) -> float:
            unit = float(torch.rand((), generator=generator, dtype=torch.float64))
            return math.exp((2.0 * unit - 1.0) * math.log(limit))

        names = [name for name, _ in task.model.named_parameters()]
        scales = {name: draw(self.max_param_scale) for name in names}
        return AugmentedTask(task, scales, draw(self.max_loss_scale))

    def __repr__(self) -> str:
        return (
            f"AugmentedFamily({self.family!r}, max_param_scale={self.max_param_scale}, "
            f"max_loss_scale={self.max_loss_scale})"
        )


class AugmentableFamily(TaskFamily):
    """A family that augments its own training tasks, as :class:`AugmentedFamily` does, unless
    built with ``augment=False``; held-out tasks are never augmented. A subclass implements
    :meth:`make` and takes the same constructor arguments.

    Args:
        seed (int, optional): distinguishes task streams. (default: 0)
        device (str or torch.device, optional): device of the tasks. (default: "cpu")
        augment (bool, optional): augment the training tasks. (default: True)
        max_param_scale (float, optional): limit of the per-tensor scales. (default: 10.0)
        max_loss_scale (float, optional): limit of the loss scale. (default: 10.0)
    """

    def __init__(
        self,
        seed: int = 0,
        device: torch.device | str = "cpu",
        augment: bool = True,
        max_param_scale: float = 10.0,
        max_loss_scale: float = 10.0,
    ) -> None:
        self.prepare()
        super().__init__(seed, device)
        if not isinstance(augment, bool):
            raise ValueError(f"Invalid augment: {augment!r} (True or False)")
        self.augment = augment
        self.max_param_scale = max_param_scale
        self.max_loss_scale = max_loss_scale
        self._augmented: Optional[AugmentedFamily] = None
        if augment:
            plain = type(self)(seed, device, augment=False)
            self._augmented = AugmentedFamily(plain, max_param_scale, max_loss_scale)

    def prepare(self) -> None:
        """Called first by the constructor: where a subclass loads what all its tasks need (a
        missing dependency then shows when the family is built). Nothing here."""

    def sample(self, index: int, split: str = "train") -> Task:
        if self._augmented is not None:
            return self._augmented.sample(index, split)
        return super().sample(index, split)

    def __repr__(self) -> str:
        extra = ""
        if self.augment:
            extra = (
                f", max_param_scale={self.max_param_scale}, max_loss_scale={self.max_loss_scale}"
            )
        return (
            f"{type(self).__name__}(seed={self.seed}, device={str(self.device)!r}, "
            f"augment={self.augment}{extra})"
        )
