"""The optional hooks of the transform contract have defaults in the base class: ``fusable``
(a second formulation switched on by ``fused``, for Inductor) and ``update_blocked`` (the update
in bounded memory, which the eager runtime calls for large tensors)."""

from typing import List, Tuple

import torch
from torch import Tensor

from compiledopt.export import freeze_transform
from compiledopt.learned.catalog import CATALOG
from compiledopt.runtime.buckets import MAX_MEMBER
from compiledopt.runtime.builtins import EagerUpdate
from compiledopt.transforms.base import Transform


class Doubling(Transform):
    """``d = 2g``; it has a ``fused`` attribute of its own meaning, and is not fusable."""

    shape_agnostic = True

    def __init__(self) -> None:
        super().__init__()
        self.fused = False
        self.blocked_calls = 0

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return 2 * grad, state


class Blocked(Doubling):
    def update_blocked(self, grad, param, state, step):
        self.blocked_calls += 1
        return self.update(grad, param, state, step)


def test_only_fusable_transforms_are_switched_to_their_fused_form():
    assert freeze_transform(Doubling(), fused=True).fused is False
    fusable = [name for name, entry in CATALOG.items() if entry.build().fusable]
    assert fusable == ["coordinate-mlp", "normalized-mlp"]
    for name in fusable:
        assert freeze_transform(CATALOG[name].build(), fused=True).fused is True
        assert freeze_transform(CATALOG[name].build(), fused=False).fused is False


def test_update_blocked_defaults_to_update():
    grad = torch.randn(7)
    direction, state = Doubling().update_blocked(grad, grad, [], torch.tensor(0))
    torch.testing.assert_close(direction, 2 * grad)
    assert state == []


def test_the_eager_runtime_calls_update_blocked_for_large_tensors_only():
    transform = Blocked()
    step = EagerUpdate(transform)
    small, large = torch.randn(MAX_MEMBER), torch.randn(MAX_MEMBER + 1)
    for grad, calls in ((small, 0), (large, 1)):
        direction, _ = step(grad, grad, [], torch.tensor(0))
        torch.testing.assert_close(direction, 2 * grad)
        assert transform.blocked_calls == calls
