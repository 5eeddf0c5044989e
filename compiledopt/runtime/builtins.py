"""The runtime's built-in backends, ``eager`` and ``compiled``, as descriptors in one registry.

They need no graph in the artifact: each rebuilds the rule from the artifact's transform. A
:class:`BuiltIn` says how, for both artifact kinds: :attr:`~BuiltIn.tensor_rules` gives a
shape-agnostic rule's callables on one device, :attr:`~BuiltIn.model_rule` a bound artifact's
whole-model rule, and :attr:`~BuiltIn.max_elements` how many elements one batched call may take.
The strategies look a backend up in :data:`BUILT_INS` and run an artifact's exported graphs for
any other (:meth:`compiledopt.export.Artifact.runner`).
"""

from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from compiledopt.export.rule import INDUCTOR_OPTIONS, ModelRule, inductor_configs
from compiledopt.runtime.buckets import MAX_MEMBER, BatchedRule
from compiledopt.runtime.compiled import CompiledBatchedRule, CompiledTensorRule, StoredStateRule
from compiledopt.runtime.distributed import is_distributed
from compiledopt.runtime.warming import EagerClock, Warming
from compiledopt.transforms.base import Transform

__all__ = ["BUILT_INS", "BuiltIn", "EagerModelRule", "EagerUpdate", "TensorRules", "pads"]


class TensorRules(NamedTuple):
    """A tensor strategy's callables on one device: ``single(grad, param, state, step, seed)``
    for one parameter, ``batched(grads, params, states, step, seeds)`` for a bucket of stacked
    same-shape parameters (``None``: every parameter is computed on its own) and
    ``padded(grads, params, states, step, seeds, counts)`` for a bucket of parameters of
    different shapes, each zero-padded to one shape (``None``: the rule cannot, see
    :attr:`~compiledopt.transforms.Transform.paddable`). All take and return the state in its
    storage dtype; the two batched forms also return a flag per member, ``False`` where it may not
    be all finite (:class:`~compiledopt.runtime.buckets.BatchedRule`)."""

    single: Callable
    batched: Optional[Callable]
    padded: Optional[Callable] = None


class BuiltIn(NamedTuple):
    """A built-in runtime backend.

    Attributes:
        name: the name ``FrozenOptimizer(backend=...)`` takes.
        max_elements: the most elements of one tensor kind in one batched call.
        tensor_rules: ``tensor_rules(transform, dtype, state_dtype, clock)``, the
            :class:`TensorRules` of a shape-agnostic ``transform`` (already on its device)
            computing in ``dtype`` with the state stored in ``state_dtype``; with an
            :class:`~compiledopt.runtime.warming.EagerClock` ``clock``, a compile runs in the
            background, once the clock is due, while the eager rule answers.
        model_rule: ``model_rule(transforms, counts)``, a bound artifact's whole-model rule,
            ``rule(grads, params, states, step) -> (directions, new_states)``.
    """

    name: str
    max_elements: int
    tensor_rules: Callable[[Transform, torch.dtype, torch.dtype, Optional[EagerClock]], TensorRules]
    model_rule: Callable[[List[Transform], List[int]], Callable]


class EagerUpdate:
    """A transform's ``update`` for one tensor on the eager backend: a large tensor goes through
    the transform's ``update_blocked`` (the same maths in cache-sized blocks where the transform
    has such a version, so temporary memory stays bounded whatever the tensor's size)."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, grad, param, state, step):
        if grad.numel() > MAX_MEMBER and not is_distributed(grad):
            return self.transform.update_blocked(grad, param, state, step)
        return self.transform.update(grad, param, state, step)


class EagerModelRule:
    """The eager reference of a bound rule: one transform call per parameter."""

    def __init__(self, transforms: List[Transform], counts: List[int]) -> None:
        self.transforms = transforms
        self.counts = counts

    def __call__(self, grads, params, states, step):
        directions, new_states, offset = [], [], 0
        for transform, grad, param, count in zip(self.transforms, grads, params, self.counts):
            direction, state = transform.update(grad, param, states[offset : offset + count], step)
            directions.append(direction)
            new_states.extend(state)
            offset += count
        return directions, new_states


def _eager_single(transform: Transform, stored: torch.dtype) -> Callable:
    return StoredStateRule(EagerUpdate(transform), stored)


#: The most elements of one tensor kind an eager rule call takes (its intermediates are
#: materialised, so they stay cache-sized): the eager backend's bucket limit, and the slice size
#: in which a warming compiled backend's eager rule computes the compiled backend's buckets.
EAGER_ELEMENTS = 1 << 16


def _eager_batched(transform: Transform, stored: torch.dtype) -> Callable:
    return BatchedRule(StoredStateRule(transform.update, stored), EAGER_ELEMENTS)


def _eager_padded(transform: Transform, stored: torch.dtype) -> Optional[Callable]:
    if not pads(transform):
        return None
    return BatchedRule(StoredStateRule(transform.update_padded, stored), EAGER_ELEMENTS)


def pads(transform: Transform) -> bool:
    """Whether ``transform`` computes zero-padded canonical views (see
    :attr:`~compiledopt.transforms.Transform.paddable`)."""
    return transform.paddable and transform.view_invariant


def _eager_rules(
    transform: Transform,
    dtype: torch.dtype,
    stored: torch.dtype,
    clock: Optional[EagerClock] = None,
) -> TensorRules:
    return TensorRules(
        _eager_single(transform, stored),
        _eager_batched(transform, stored),
        _eager_padded(transform, stored),
    )


def _compiled_rules(
    transform: Transform,
    dtype: torch.dtype,
    stored: torch.dtype,
    clock: Optional[EagerClock] = None,
) -> TensorRules:
    # Dynamic sizes: the same two or three graphs (matrices, small vectors, large vectors) serve
    # every parameter, so compile time does not grow with the model.
    rule = CompiledTensorRule(transform, state_dtype=None if stored == dtype else stored)
    single = rule if rule.state_dtype else StoredStateRule(rule, stored)
    batched = CompiledBatchedRule(transform, stored)
    padded = CompiledBatchedRule(transform, stored, padded=True) if pads(transform) else None
    if clock is None:
        return TensorRules(single, batched, padded)
    what = f"FrozenOptimizer: the {type(transform).__name__} rule"
    eager_padded = _eager_padded(transform, stored)
    # One clock for the rule's three forms: one patience, one recorded compile time.
    return TensorRules(
        Warming(_eager_single(transform, stored), single, rule.kind, what, clock),
        Warming(_eager_batched(transform, stored), batched, batched.kind, what, clock),
        None
        if padded is None or eager_padded is None
        else Warming(eager_padded, padded, padded.kind, what, clock),
    )


def _compiled_model_rule(transforms: List[Transform], counts: List[int]) -> Callable:
    rule = ModelRule(transforms, counts, fused=True)
    return torch.compile(rule, fullgraph=True, options=inductor_configs(INDUCTOR_OPTIONS))


#: The built-in backends by name, in the order ``FrozenOptimizer`` lists them: eager calls work in
#: cache-sized blocks; a compiled call fuses a whole bucket into one loop.
BUILT_INS: Dict[str, BuiltIn] = {
    b.name: b
    for b in (
        BuiltIn("eager", EAGER_ELEMENTS, _eager_rules, EagerModelRule),
        BuiltIn("compiled", 1 << 22, _compiled_rules, _compiled_model_rule),
    )
}
