"""The learning-rate schedule the learned optimizers are meta-trained and evaluated with.

Linear warm-up from 0 over the first ``warmup_fraction`` of the steps, then cosine decay to 0 at
``total_steps``. :func:`warmup_cosine` is the multiplier (a plain function of the step, used by
meta-training's inner loop); :func:`warmup_cosine_lr` wraps it as a ``torch.optim`` scheduler for
training loops::

    optimizer = FrozenOptimizer(model.parameters(), "normalized-mlp")  # lr 1e-3
    scheduler = warmup_cosine_lr(optimizer, total_steps=10_000)
    for batch in loader:
        ...
        optimizer.step()
        scheduler.step()
"""

import math
import numbers

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_cosine_lr"]


def _check(total_steps: object, warmup_fraction: object) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (a positive integer)")
    if (
        isinstance(warmup_fraction, bool)
        or not isinstance(warmup_fraction, numbers.Real)
        or not 0.0 <= float(warmup_fraction) < 1.0
    ):
        raise ValueError(f"Invalid warmup_fraction: {warmup_fraction!r} (a number in [0, 1))")


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float = 0.05) -> float:
    """The lr multiplier at ``step`` (0-based) of a ``total_steps`` run, in ``[0, 1]``.

    Warm-up reaches 1 at step ``ceil(warmup_fraction · total_steps)``: step ``k`` of the warm-up
    gets ``(k + 1) / (warm-up steps + 1)``, so the first step already moves. Steps at or past
    ``total_steps`` get 0.
    """
    _check(total_steps, warmup_fraction)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid step: {step!r} (a non-negative integer)")
    warmup = math.ceil(float(warmup_fraction) * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= total_steps:
        return 0.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lr(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05
) -> LambdaLR:
    """A ``LambdaLR`` scheduler applying :func:`warmup_cosine` to every param group's lr."""
    _check(total_steps, warmup_fraction)
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup_fraction))
