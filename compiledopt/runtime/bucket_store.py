"""The stacked tensors a bucket of parameters keeps from one step to the next.

A bucket (see :mod:`~compiledopt.runtime.buckets`) is computed by one rule call on stacked
tensors: its members' gradients, states and directions, each zero-padded to the bucket's shape
where the members' shapes differ. Building those stacks and cutting the results back into one
tensor per member every step would cost several tensor objects per member and step, more than
the arithmetic of a small tensor. So a :class:`BucketStore` keeps them:

* one buffer per state tensor, holding the state itself: each member's ``optimizer.state[p]``
  entry is a view of its row (cut to the member's shape), the same tensor object every step, as
  ``torch.optim``'s in-place state is. The rule computes the new state into fresh tensors; only
  once the optimizer has checked everything does :meth:`BucketStore.commit` copy it in (rows of
  skipped members left as they were), so a step that fails or is skipped writes nothing;
* a buffer of step counts, one 0-d view per member, advanced on commit;
* a gradient buffer the members' gradients are copied into, and a direction buffer whose
  member views the optimizer applies; their padding stays zero as only member coordinates are
  written.

A state replaced or edited between steps is still read: a member whose entry is not the store's
view has it copied in before the rule runs; an entry edited in place is the store's memory.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BucketStore", "rows_of"]

STEP = "step"


def rows_of(
    stacked: Tensor, own: Sequence[Tuple[int, ...]], shapes: Sequence[torch.Size]
) -> List[Tensor]:
    """Each member's coordinates in a stack: row ``j`` cut to the member's own computed shape
    ``own[j]`` (a vector's first elements, a matrix's top-left block) and viewed in its shape
    ``shapes[j]``."""
    rows = stacked.unbind(0)
    out = []
    for row, sides, shape in zip(rows, own, shapes):
        for axis, side in enumerate(sides):
            if row.shape[axis] != side:
                row = row.narrow(axis, 0, side)
        out.append(row if row.shape == shape else row.view(shape))
    return out


class BucketStore:
    """The persistent stacks of one bucket (see the module doc).

    Args:
        members: the members' parameter indices.
        view: the shape every member is computed on (zero-padded to it).
        own: each member's own computed shape (``view`` for all when nothing is padded).
        shapes: each member's parameter shape.
        states: one member's state (``step`` and the rule's tensors by name): the dtypes and
            the shapes of the state tensors not of the parameter's shape (common to members).
        dtype: the compute dtype of gradients and directions.
    """

    def __init__(
        self,
        members: Tuple[int, ...],
        view: Tuple[int, ...],
        own: Sequence[Tuple[int, ...]],
        shapes: Sequence[torch.Size],
        keys: Sequence[str],
        state: Dict[str, Tensor],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.members = members
        self.signature = (view, tuple(own), tuple(shapes), dtype, device)
        count = len(members)
        self.grads, self.grad_rows = self._stack((count, *view), dtype, device, own, shapes)
        self.directions, self.direction_rows = self._stack(
            (count, *view), dtype, device, own, shapes
        )
        self.keys = list(keys)
        self.buffers: List[Tensor] = []
        self.rows: List[List[Tensor]] = []
        first = tuple(shapes[0])
        for key in self.keys:
            value = state[key]
            if tuple(value.shape) == first:
                buffer, rows = self._stack((count, *view), value.dtype, device, own, shapes)
            else:  # a state of its own shape (not padded: such a rule is never padded)
                buffer, rows = self._stack(
                    (count, *value.shape),
                    value.dtype,
                    device,
                    [tuple(value.shape)] * count,
                    [value.shape] * count,
                )
            self.buffers.append(buffer)
            self.rows.append(rows)
        self.steps = torch.zeros(count, dtype=torch.int64)
        self.step_rows = list(self.steps.unbind(0))
        self.results = [
            {STEP: self.step_rows[j], **{k: r[j] for k, r in zip(self.keys, self.rows)}}
            for j in range(count)
        ]
        self.sides = torch.tensor(list(own), dtype=torch.int64, device=device)
        self.indices = torch.tensor(members, dtype=torch.int64)
        self._own_shapes = (own, shapes)
        self.params: Optional[Tensor] = None
        self.param_rows: List[Tensor] = []

    @staticmethod
    def _stack(shape, dtype, device, own, shapes) -> Tuple[Tensor, List[Tensor]]:
        buffer = torch.zeros(shape, dtype=dtype, device=device)
        return buffer, rows_of(buffer, own, shapes)

    def fits(self, signature: tuple, keys: Sequence[str]) -> bool:
        """Whether this store serves a bucket of this signature and these state names."""
        return self.signature == signature and self.keys == list(keys)

    def load(
        self, grads: List[Tensor], states: Sequence[Dict[str, Tensor]]
    ) -> Tuple[Tensor, List[Tensor]]:
        """The stacked gradients and states of this step: the gradients copied in, and any
        member's state entry (its step count included, into :attr:`steps`) that is not the
        store's own view (a first step, a loaded or replaced state) copied into its row."""
        torch._foreach_copy_(self.grad_rows, grads)
        for key, buffer, rows in zip(self.keys, self.buffers, self.rows):
            entries = [s[key] for s in states]
            if any(e is not r for e, r in zip(entries, rows)):
                # An entry may share this buffer's memory (another member's view): copy
                # from copies, never from memory being written.
                shared = buffer.untyped_storage().data_ptr()
                entries = [
                    e.clone() if e.untyped_storage().data_ptr() == shared else e for e in entries
                ]
                torch._foreach_copy_(rows, entries)
        counts = [s[STEP] for s in states]
        if not all(c is r for c, r in zip(counts, self.step_rows)):
            self.steps.copy_(torch.stack([c.detach().clone() for c in counts]))
        return self.grads, self.buffers

    def load_params(self, params: List[Tensor]) -> Tensor:
        """The members' parameters stacked (the rule's own input, never the gradients' buffer)."""
        if self.params is None:
            self.params, self.param_rows = self._stack(
                tuple(self.grads.shape), self.grads.dtype, self.grads.device, *self._own_shapes
            )
        torch._foreach_copy_(self.param_rows, params)
        return self.params

    def commit(self, values: Sequence[Tensor], rows: Optional[Sequence[int]] = None) -> None:
        """Write the new state ``values`` (stacked, the rule's order of :attr:`keys`) and
        advance the step counts: of every member, or of the members at ``rows`` only."""
        if rows is None or len(rows) == len(self.members):
            for buffer, value in zip(self.buffers, values):
                buffer.copy_(value)
            self.steps.add_(1)
            return
        for j in rows:
            for buffer, value in zip(self.buffers, values):
                buffer[j].copy_(value[j])
            self.steps[j].add_(1)
