"""Guards for rebuilding a transform from an artifact's spec: a budget that stops a build
registering more tensors than the weights hold, and the global RNG left as it was."""

import contextlib
import threading
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["BUDGET_FACTOR", "BUDGET_SLACK", "BuildBudget", "OverBudgetError", "untouched_rng"]

#: How far a build may go past the tensors (count, elements) the weights hold before it is
#: stopped: room for a constructor's temporaries; a spec is compared exactly once built.
BUDGET_FACTOR, BUDGET_SLACK = 2, 64


class OverBudgetError(Exception):
    """A build registered more tensors (or elements) than the weights hold."""


class BuildBudget:
    """Counts the parameters and buffers that modules register on this thread while it is
    active, and stops the build (:class:`OverBudgetError`) once they exceed what the weights hold
    (with :data:`BUDGET_FACTOR` and :data:`BUDGET_SLACK` of room)."""

    def __init__(self, tensors: int, elements: int, where: Path) -> None:
        self.where, self.held = where, (tensors, elements)
        self.tensors = BUDGET_FACTOR * tensors + BUDGET_SLACK
        self.elements = BUDGET_FACTOR * elements + BUDGET_SLACK
        self.count = self.numel = 0
        self.thread = threading.get_ident()
        self.handles: List[Any] = []

    def _registered(self, module: nn.Module, name: str, tensor: Optional[Tensor]) -> None:
        if tensor is None or threading.get_ident() != self.thread:
            return
        self.count += 1
        self.numel += tensor.numel()
        if self.count > self.tensors or self.numel > self.elements:
            raise OverBudgetError(
                f"the spec implies more than the {self.held[0]} tensors of {self.held[1]} "
                f"elements {self.where} holds (stopped at {self.count} tensors of {self.numel} "
                f"elements, {type(module).__name__}.{name})"
            )

    def __enter__(self) -> "BuildBudget":
        hooks = torch.nn.modules.module
        self.handles = [
            hooks.register_module_parameter_registration_hook(self._registered),
            hooks.register_module_buffer_registration_hook(self._registered),
        ]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def untouched_rng():
    """The global CPU generator (and every CUDA device's, where CUDA is initialised) restored
    on exit: what runs inside may draw from them without changing a seeded run."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        yield
