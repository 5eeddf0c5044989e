"""Multi-tensor steps: parameters of one shape share one rule call.

A model with many small tensors (biases, norm weights, the layers of a deep stack) would pay a
rule call, with its fixed cost of Python, dispatch and graph guards, per tensor. A shape-agnostic
rule computes each tensor independently (its per-tensor statistics, norms and means, are over
that tensor alone), so tensors of the same shape can be stacked into one batch and the rule
mapped over the batch with ``torch.func.vmap``: every statistic stays per tensor, and the step
costs one call per bucket instead of one per tensor.

:func:`plan` groups a step's parameters: tensors with the same computed shape (the canonical
view for a ``view_invariant`` rule, see :func:`~compiledopt.runtime.compiled.canonical_shape`),
device, step count and state shapes go into buckets of at most ``max_elements`` elements in all;
tensors larger than :data:`MAX_MEMBER` elements (whose call overhead is small next to their
arithmetic), single-element tensors and distributed tensors (``DTensor``) are computed one by one.
"""

from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["MAX_MEMBER", "BatchedRule", "Bucket", "plan"]

#: Tensors with more elements than this are computed one by one.
MAX_MEMBER = 1 << 16


class Bucket(NamedTuple):
    """Parameters computed in one call: their indices, in the optimizer's order, and the shape
    each is computed on (``None`` for a parameter computed on its own, in its own shape)."""

    members: Tuple[int, ...]
    view: Optional[Tuple[int, ...]]


def plan(
    params: Sequence[Tensor],
    active: Sequence[int],
    key: Callable[[int], Optional[Tuple[Tuple[int, ...], Hashable]]],
    max_elements: int,
) -> List[Bucket]:
    """The buckets of one step.

    Args:
        params: every parameter of the optimizer.
        active: the indices of those that step.
        key: for parameter ``i``, its computed shape and whatever else must match within a
            bucket (device, step count, state shapes), or ``None`` to compute it on its own.
        max_elements: the most elements (of one tensor kind, summed over members) in one call;
            a bucket that would hold more is split.

    Single-member buckets have ``view=None``; the order of the buckets follows the first
    appearance of each key.
    """
    groups: Dict[Hashable, List[int]] = {}
    views: Dict[Hashable, Tuple[int, ...]] = {}
    for i in active:
        found = key(i) if 1 < params[i].numel() <= MAX_MEMBER else None
        if found is None:
            groups[("single", i)] = [i]
            continue
        view, rest = found
        groups.setdefault((view, rest), []).append(i)
        views[(view, rest)] = view
    buckets = []
    for name, members in groups.items():
        if len(members) == 1:
            buckets.append(Bucket((members[0],), None))
            continue
        per_call = max(1, max_elements // max(1, params[members[0]].numel()))
        for start in range(0, len(members), per_call):
            chunk = tuple(members[start : start + per_call])
            buckets.append(Bucket(chunk, views[name] if len(chunk) > 1 else None))
    return buckets


class BatchedRule(nn.Module):
    """``rule`` mapped over a leading batch dimension of stacked tensors.

    ``forward(grads, params, states, step, seeds) -> (directions, new_states)``: ``grads``,
    ``params``, every state tensor and ``seeds`` carry one entry per member along dimension 0;
    ``step`` is shared. ``rule(grad, param, state, step, seed)`` sees one member at a time, so
    every reduction it makes stays within that member.
    """

    def __init__(self, rule: Callable) -> None:
        super().__init__()
        self.rule = rule

    def forward(
        self, grads: Tensor, params: Tensor, states: List[Tensor], step: Tensor, seeds: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        mapped = torch.func.vmap(self._one, in_dims=(0, 0, 0, None, 0))
        return mapped(grads, params, states, step, seeds)

    def _one(self, grad, param, state, step, seed):
        direction, new_state = self.rule(grad, param, state, step, seed)
        return direction, list(new_state)
