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

Tensors of *different* shapes share a call when the rule can compute zero-padded tensors
(:attr:`~compiledopt.transforms.Transform.paddable`): :func:`padding_cell` groups computed shapes
whose every side lies within a factor :data:`PAD_RATIO` of the others', and the bucket's shape is
the largest side of its members along each axis; each member is zero-padded to it at the end of
each axis, and the rule is told each member's element count. So a model of a thousand distinct
shapes costs a few dozen calls instead of a thousand, for at most ``PAD_RATIO`` more arithmetic
per axis.
"""

import math
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from compiledopt.runtime.distributed import row_sums

__all__ = [
    "MAX_MEMBER",
    "PAD_RATIO",
    "BatchedRule",
    "Bucket",
    "finite_rows",
    "padding_cell",
    "plan",
]

#: Tensors with more elements than this are computed one by one.
MAX_MEMBER = 1 << 16
#: Sides within this factor of each other may be padded to one size (:func:`padding_cell`).
PAD_RATIO = 2.0


class Bucket(NamedTuple):
    """Parameters computed in one call: their indices, in the optimizer's order, and the shape
    each is computed on (``None`` for a parameter computed on its own, in its own shape).
    ``padded``: the members' own computed shapes, each zero-padded to ``view`` (``None`` when
    every member has the shape ``view``)."""

    members: Tuple[int, ...]
    view: Optional[Tuple[int, ...]]
    padded: Optional[Tuple[Tuple[int, ...], ...]] = None


def padding_cell(view: Tuple[int, ...]) -> Tuple[int, ...]:
    """The cell of computed shapes padded together with ``view``: per axis, the index of the
    interval ``[PAD_RATIO^k, PAD_RATIO^(k+1))`` its side lies in (so two sides in one cell
    differ by less than a factor ``PAD_RATIO``); a side of 1 counts as 2 (a one-element tensor
    joins the smallest ones, see :func:`plan`)."""
    return tuple(math.floor(math.log(max(2, side)) / math.log(PAD_RATIO)) for side in view)


def plan(
    params: Sequence[Tensor],
    active: Sequence[int],
    key: Callable[[int], Optional[Tuple[Tuple[int, ...], Hashable]]],
    max_elements: int,
    pad: bool = False,
    max_member: int = MAX_MEMBER,
) -> List[Bucket]:
    """The buckets of one step.

    Args:
        params: every parameter of the optimizer.
        active: the indices of those that step.
        key: for parameter ``i``, its computed shape and whatever else must match within a
            bucket (device, step count, state shapes), or ``None`` to compute it on its own.
        max_elements: the most elements (of one tensor kind, summed over members, padding
            included) in one call; a bucket that would hold more is split.
        pad: whether computed shapes of one :func:`padding_cell` share buckets (the rule
            computes zero-padded tensors); else only equal shapes do.
        max_member: the most elements of a parameter that shares a bucket (larger ones are
            computed on their own).

    Single-member buckets have ``view=None``; the order of the buckets follows the first
    appearance of each key, and members keep the optimizer's order. One-element tensors are
    computed on their own unless ``pad``; then a padded bucket's sides are at least 2 where
    all its members have one element (a compiled graph's size-1 special cases never arise).
    """
    smallest = 1 if pad else 2
    groups: Dict[Hashable, List[Tuple[int, Tuple[int, ...]]]] = {}
    for i in active:
        found = key(i) if smallest <= params[i].numel() <= max_member else None
        if found is None:
            groups[("single", i)] = [(i, ())]
            continue
        view, rest = found
        groups.setdefault((padding_cell(view) if pad else view, len(view), rest), []).append(
            (i, view)
        )
    buckets = []
    for members in groups.values():
        if len(members) == 1:
            buckets.append(Bucket((members[0][0],), None))
            continue
        start = 0
        while start < len(members):
            end, view = _chunk(members, start, max_elements)
            chunk = members[start:end]
            start = end
            if len(chunk) == 1:
                buckets.append(Bucket((chunk[0][0],), None))
                continue
            own = tuple(v for _, v in chunk)
            if math.prod(view) == 1:
                view = (2,) * len(view)
            padded = None if all(v == view for v in own) else own
            buckets.append(Bucket(tuple(i for i, _ in chunk), view, padded))
    return buckets


def _chunk(
    members: List[Tuple[int, Tuple[int, ...]]], start: int, max_elements: int
) -> Tuple[int, Tuple[int, ...]]:
    """The end of the call that starts at ``members[start]`` (at least one member, at most
    ``max_elements`` padded elements in all) and the shape its members are padded to."""
    view = members[start][1]
    end = start + 1
    while end < len(members):
        wider = tuple(max(a, b) for a, b in zip(view, members[end][1]))
        if (end - start + 1) * math.prod(wider) > max_elements:
            break
        view, end = wider, end + 1
    return end, view


class BatchedRule(nn.Module):
    """``rule`` mapped over a leading batch dimension of stacked tensors.

    ``forward(grads, params, states, step, seeds) -> (directions, new_states, finite)``:
    ``grads``, ``params``, every state tensor and ``seeds`` carry one entry per member along
    dimension 0; ``step`` is shared; ``finite[j]`` is ``False`` where member ``j``'s gradient,
    direction or new state may not be all finite (:func:`finite_rows`). ``rule(grad, param, state,
    step, seed)`` sees one member at a time, so every reduction it makes stays within that
    member. With ``sides`` (members zero-padded to a common shape: row ``j`` holds the sides of
    member ``j``'s own shape), ``rule(grad, param, state, step, seed, sides)``.

    With ``max_elements``, a batch of more elements (of one tensor kind) is computed in slices
    of whole members holding at most that many (at least one member each), and the results are
    concatenated: an eager rule materialises its intermediates a slice at a time, so they stay
    cache-sized whatever the bucket (a compiled rule fuses them away and takes whole buckets).
    """

    def __init__(self, rule: Callable, max_elements: Optional[int] = None) -> None:
        super().__init__()
        self.rule = rule
        self.max_elements = max_elements

    def forward(
        self,
        grads: Tensor,
        params: Tensor,
        states: List[Tensor],
        step: Tensor,
        seeds: Tensor,
        sides: Optional[Tensor] = None,
    ) -> Tuple[Tensor, List[Tensor], Tensor]:
        directions, new_states = self._computed(grads, params, states, step, seeds, sides)
        return directions, new_states, finite_rows([grads, directions, *new_states])

    def _computed(
        self,
        grads: Tensor,
        params: Tensor,
        states: List[Tensor],
        step: Tensor,
        seeds: Tensor,
        sides: Optional[Tensor],
    ) -> Tuple[Tensor, List[Tensor]]:
        if self.max_elements is None or grads.numel() <= self.max_elements:
            return self._mapped(grads, params, states, step, seeds, sides)
        rows, per_slice = grads.shape[0], self.max_elements // grads[0].numel()
        parts = []
        for begin, end in _slices(rows, max(1, per_slice)):
            # A one-member slice calls the rule itself (vmap's dispatch would cost more).
            compute = self._single if end - begin == 1 else self._mapped
            cut = slice(begin, end)
            parts.append(
                compute(
                    grads[cut],
                    params[cut],
                    [s[cut] for s in states],
                    step,
                    seeds[cut],
                    None if sides is None else sides[cut],
                )
            )
        directions = torch.cat([d for d, _ in parts])
        return directions, [torch.cat(column) for column in zip(*(s for _, s in parts))]

    def _mapped(
        self,
        grads: Tensor,
        params: Tensor,
        states: List[Tensor],
        step: Tensor,
        seeds: Tensor,
        sides: Optional[Tensor],
    ) -> Tuple[Tensor, List[Tensor]]:
        if sides is None:
            mapped = torch.func.vmap(self._one, in_dims=(0, 0, 0, None, 0))
            return mapped(grads, params, states, step, seeds)
        mapped = torch.func.vmap(self._one, in_dims=(0, 0, 0, None, 0, 0))
        return mapped(grads, params, states, step, seeds, sides)

    def _single(
        self,
        grads: Tensor,
        params: Tensor,
        states: List[Tensor],
        step: Tensor,
        seeds: Tensor,
        sides: Optional[Tensor],
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`_mapped` of a batch of one member, without ``vmap``."""
        extra = () if sides is None else (sides[0],)
        direction, new_state = self._one(
            grads[0], params[0], [s[0] for s in states], step, seeds[0], *extra
        )
        return direction.unsqueeze(0), [s.unsqueeze(0) for s in new_state]

    def _one(self, grad, param, state, step, seed, *sides):
        direction, new_state = self.rule(grad, param, state, step, seed, *sides)
        return direction, list(new_state)


def finite_rows(tensors: List[Tensor]) -> Tensor:
    """Whether each member of a batch (a row along the first dimension) may be all finite in
    every floating-point tensor of ``tensors`` (stacks of as many members): one boolean per
    member, ``False`` for every member that holds a NaN or an infinity.

    Taken on the sum of each member's values (an infinity is never cancelled by finite values,
    and opposite infinities make NaN), so a member whose finite values overflow the sum (values
    near the dtype's largest) is ``False`` too: whoever reads a ``False`` looks again exactly
    (see :func:`~compiledopt.runtime.skips.groups_to_skip`). A sum is one vectorised pass, fused
    by Inductor into the loops that write a compiled rule's outputs; ``isfinite(x).all(1)``
    takes ten to twenty times as long eagerly. Half-precision values are summed in float32."""
    rows = tensors[0].shape[0]
    total = torch.zeros(rows, dtype=torch.float32, device=tensors[0].device)
    for tensor in tensors:
        if tensor.is_floating_point():
            total = total + row_sums(tensor, rows)
    return torch.isfinite(total)


def _slices(rows: int, size: int) -> List[Tuple[int, int]]:
    return [(begin, min(begin + size, rows)) for begin in range(0, rows, size)]
