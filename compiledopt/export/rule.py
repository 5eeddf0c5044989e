"""Frozen update rules: the graphs that artifacts export.

* :class:`ModelRule` — a whole-model rule: one module mapping the gradients, parameters and
  (flattened) states of *all* bound parameters and the step count to all update directions and
  new states, so that an optimizer step is one call.
* :class:`TensorRule` — a shape-agnostic transform on one tensor of any size (exported per rank
  with dynamic sizes, so it applies to parameters of any model).

Freezing detaches every weight, switches off autograd, and folds constants: a positive
semi-definite Kronecker layer stores ``LᵀL`` and ``RᵀR`` once instead of recomputing them on every
call. The caller applies ``p <- p - lr · direction``.
"""

import copy
import functools
import logging
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor, nn

from compiledopt._identity import unique_by_identity
from compiledopt.nn.kronecker import KroneckerLinear
from compiledopt.transforms.base import Transform

M = TypeVar("M", bound=nn.Module)

logger = logging.getLogger(__name__)

#: Inductor settings of every graph this library compiles itself (the runtime's ``compiled``
#: backend and AOTInductor packages). Inductor's defaults materialise a pointwise expression into a
#: buffer once it exceeds ~50 operations or 12 reads, and stop fusing at 64 nodes;
#: ``CoordinateMLP``'s unrolled network (≈1,000 operations per coordinate) then splits into several
#: loops that write and re-read ``(N,)`` partial sums. Raising the limits keeps the whole
#: per-coordinate network in one loop over the coordinates, with the partial sums in registers
#: (on a 1M-coordinate tensor: 35 ms → 24 ms per call on one core).
INDUCTOR_OPTIONS = {
    "realize_cpu_opcount_threshold": 100_000,
    "realize_cpu_acc_reads_threshold": 100_000,
    "max_fusion_size": 100_000,
}

#: The names an older Inductor knows a setting of :data:`INDUCTOR_OPTIONS` by: before the
#: CPU-specific thresholds (torch 2.11 has them for every device).
_OLDER_NAMES = {
    "realize_cpu_opcount_threshold": "realize_opcount_threshold",
    "realize_cpu_acc_reads_threshold": "realize_acc_reads_threshold",
}


def inductor_configs(
    options: Mapping[str, Any], known: Optional[FrozenSet[str]] = None
) -> Dict[str, Any]:
    """``options`` as the installed Inductor names its settings (``known``: its setting names,
    read from ``torch._inductor.config`` by default), for ``torch.compile(options=...)`` and
    AOTInductor's ``inductor_configs``.

    A setting it does not know takes its older name where it has one, and is otherwise left out
    with a DEBUG log line: a tuning setting that a torch release renames or drops then changes
    how a rule's loops are fused, not whether it compiles (``torch.compile`` refuses an option
    it does not know). Everything else passes unchanged.
    """
    names = _inductor_setting_names() if known is None else known
    result: Dict[str, Any] = {}
    for name, value in options.items():
        older = _OLDER_NAMES.get(name)
        if name in names:
            result[name] = value
        elif older is not None and older in names:
            result[older] = value
        else:
            logger.debug("Inductor has no setting %r here; compiling without it", name)
    return result


@functools.lru_cache(maxsize=1)
def _inductor_setting_names() -> FrozenSet[str]:
    from torch._inductor import config  # imported when a rule is compiled, not before

    return frozenset(config.get_config_copy())


def freeze_transform(transform: M, fused: bool = False) -> M:
    """A frozen copy of ``transform``: detached weights, no grad, eval mode, constants folded.

    With ``fused``, transforms that have a compiler-friendly formulation (``CoordinateMLP``'s
    unrolled hidden units) switch to it: for Inductor (``torch.compile``, AOTInductor), not for
    TorchScript or ONNX, which run the matmul form faster.
    """
    frozen = copy.deepcopy(transform)
    for module in frozen.modules():
        if fused and isinstance(module, Transform) and module.fusable:
            module.fused = True
    with torch.no_grad():
        for module in frozen.modules():
            if isinstance(module, KroneckerLinear) and module.psd:
                left, right = module.factors()
                module.left.copy_(left)
                module.right.copy_(right)
                module.psd = False
    frozen.requires_grad_(False)
    return frozen.eval()


class ModelRule(nn.Module):
    """All parameters' updates in one call.

    ``forward(grads, params, states, step) -> (directions, new_states)``: ``grads``, ``params`` and
    ``directions`` hold one tensor per bound parameter; ``states`` is the concatenation of every
    parameter's state list, in binding order (``state_counts[i]`` tensors for parameter ``i``).

    Args:
        transforms (sequence of Transform): one per parameter (the same module may repeat).
        state_counts (sequence of int): how many state tensors each transform carries.
    """

    state_counts: List[int]

    def __init__(
        self, transforms: Sequence[Transform], state_counts: Sequence[int], fused: bool = False
    ) -> None:
        super().__init__()
        if len(transforms) != len(state_counts):
            raise ValueError(f"{len(transforms)} transforms but {len(state_counts)} state counts")
        unique, index = unique_by_identity(transforms)
        self.transforms = nn.ModuleList([freeze_transform(t, fused) for t in unique])
        self.index: List[int] = index
        self.state_counts = [int(c) for c in state_counts]
        self.eval()

    def forward(
        self, grads: List[Tensor], params: List[Tensor], states: List[Tensor], step: Tensor
    ) -> Tuple[List[Tensor], List[Tensor]]:
        directions: List[Tensor] = []
        new_states: List[Tensor] = []
        offset = 0
        for i in range(len(self.index)):
            count = self.state_counts[i]
            direction, state = self._update(
                self.index[i], grads[i], params[i], states[offset : offset + count], step
            )
            directions.append(direction)
            new_states.extend(state)
            offset += count
        return directions, new_states

    def _update(
        self, which: int, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        # TorchScript calls submodules of a ModuleList only in a loop over the list itself.
        out = (grad, state)
        for j, transform in enumerate(self.transforms):
            if j == which:
                out = transform.update(grad, param, state, step)  # type: ignore[operator]
        return out


class TensorRule(nn.Module):
    """A frozen shape-agnostic transform on one tensor: ``forward(grad, param, state, step)``."""

    def __init__(self, transform: Transform, fused: bool = False) -> None:
        super().__init__()
        if not transform.shape_agnostic:
            raise ValueError(f"{type(transform).__name__} is shape-bound: use ModelRule")
        self.transform = freeze_transform(transform, fused)
        self.eval()

    def forward(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return self.transform.update(grad, param, state, step)
