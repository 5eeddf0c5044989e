"""Matrix updates scaled by a measure of the parameter's size: an experiment on lr semantics.

A learned optimizer of the package gives every tensor an update of unit RMS, so its lr is an
absolute step: each matrix moves by ``lr`` (RMS) a step whatever its own scale. AdamW's step is
also absolute. Optimizers whose step is relative to the weight (LARS, LAMB, Adafactor's
``scale_parameter``) promise an lr that transfers between models whose weights have different
scales. ``--matrix-scale MODE`` measures that promise here: it multiplies the whole step of every
parameter of rank ≥ 2 (weight decay included) by

* ``rms``: ``max(RMS(p), FLOOR) / REFERENCE``, ``p`` the parameter before this step;
* ``initial-rms``: ``max(RMS(p₀), FLOOR) / REFERENCE``, ``p₀`` the parameter before its first
  step (a constant per parameter, so the step does not grow with the weight);
* ``fan-in``: ``(1 / √(3·fan_in)) / REFERENCE``, the RMS of a default-initialised ``nn.Linear``
  or ``nn.Conv`` weight of that shape (``fan_in`` = the product of all but the first dimension);
* ``grown``: ``max(1, RMS(p₀) / (1 / √(3·fan_in)))``: a weight that starts larger than a
  default-initialised one of its shape (a pre-trained weight, typically) takes a step that much
  larger, any other keeps the optimizer's own step; embeddings (a parameter group whose
  ``role`` is ``embedding``: their default initialisation is N(0, 1)) are left alone.

``REFERENCE`` (0.1) is near the RMS of a default-initialised 64-wide layer, so for the small
MLPs of the classic suite the lr keeps about its usual size; ``rms`` and the other modes differ
from each other in how the scale follows the weight. Vectors (rank < 2) keep the optimizer's own
step. Hooks on the optimizer (``register_step_pre_hook`` / ``register_step_post_hook``) keep a
copy of each matrix across its step and rescale the difference; the optimizer itself is not
changed, so any optimizer can be scaled.
"""

import math
from typing import Any, Dict, List, Tuple

import torch
from torch.optim import Optimizer

#: ``none`` leaves the optimizer as it is.
MODES = ("none", "rms", "initial-rms", "fan-in", "grown")
REFERENCE = 0.1
FLOOR = 1e-2


def rms(tensor: torch.Tensor) -> float:
    """The root mean square of ``tensor``'s entries (in float64)."""
    return float(tensor.detach().double().pow(2).mean().sqrt())


def fan_in_rms(shape: torch.Size) -> float:
    """The RMS of a default-initialised layer weight of ``shape`` (uniform in ±1/√fan_in)."""
    return 1.0 / math.sqrt(3.0 * math.prod(shape[1:]))


def attach(optimizer: Optimizer, mode: str) -> Optimizer:
    """``optimizer`` with its matrices' steps scaled by ``mode`` (see the module); returned for
    chaining. ``none`` attaches nothing."""
    if mode not in MODES:
        raise ValueError(f"Unknown matrix scale: {mode!r} (one of {MODES})")
    if mode == "none":
        return optimizer
    initial: Dict[int, float] = {}
    held: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def scale(param: torch.Tensor, before: torch.Tensor) -> float:
        if mode == "fan-in":
            return fan_in_rms(param.shape) / REFERENCE
        if mode == "grown":
            return initial.setdefault(id(param), max(1.0, rms(before) / fan_in_rms(param.shape)))
        if mode == "initial-rms":
            size = initial.setdefault(id(param), max(rms(before), FLOOR))
        else:
            size = max(rms(before), FLOOR)
        return size / REFERENCE

    def before_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
        held.clear()
        for group in opt.param_groups:
            if mode == "grown" and group.get("role") == "embedding":
                continue
            for param in group["params"]:
                if param.dim() >= 2 and param.grad is not None:
                    held.append((param, param.detach().clone()))

    @torch.no_grad()
    def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for param, before in held:
            param.sub_(before).mul_(scale(param, before)).add_(before)
        held.clear()

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    return optimizer
