"""The compiled runner of shape-agnostic rules: dynamic sizes, at most two graphs per transform,
results equal to the eager transform; and the ``view_invariant`` property it relies on."""

from typing import List

import pytest
import torch
from registry import REGISTRY, SHAPES, Entry
from torch import Tensor
from torch._dynamo.utils import counters

from compiledopt.runtime.compiled import SMALL_VECTOR, CompiledTensorRule, canonical_shape

AGNOSTIC = [e for e in REGISTRY if e.spec is not None and e.spec.get("kind") == "shape_agnostic"]


def _inputs(transform, shape, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def rand(s) -> Tensor:
        return torch.randn(s, generator=generator, dtype=torch.float64)

    param = rand(shape)
    state = [rand(s.shape).abs() for s in transform.init_state(param)]
    return rand(shape), param, state


def _viewed_update(transform, grad, param, state, step):
    """The update computed on the canonical view, reshaped back (a plain reference)."""
    view = canonical_shape(param.shape)
    same = [s.shape == param.shape for s in state]
    direction, new = transform.update(
        grad.reshape(view),
        param.reshape(view),
        [s.reshape(view) if k else s for s, k in zip(state, same)],
        step,
    )
    return direction.reshape(param.shape), [
        n.reshape(param.shape) if k else n for n, k in zip(new, same)
    ]


# Celo2 normalises and orthogonalises over the last two axes of a rank >= 3 tensor (a convolution
# weight's kernel windows), so its update depends on the shape, not only on the values.
NOT_VIEW_INVARIANT = {"celo2"}


@pytest.mark.parametrize("entry", AGNOSTIC, ids=[e.name for e in AGNOSTIC])
def test_view_invariant_transforms_are_invariant(entry: Entry) -> None:
    if entry.name in NOT_VIEW_INVARIANT:
        assert not entry.build(torch.zeros(3, 4)).view_invariant
        return
    for rank, shape in SHAPES.items():
        transform = entry.build(torch.zeros(shape, dtype=torch.float64)).double()
        assert transform.view_invariant
        grad, param, state = _inputs(transform, shape, seed=rank)
        step = torch.tensor(3)
        expected = transform.update(grad, param, state, step)
        actual = _viewed_update(transform, grad, param, state, step)
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-14)
        for a, b in zip(actual[1], expected[1]):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _entry(name: str) -> Entry:
    return next(e for e in REGISTRY if e.name == name)


# Shapes of every rank, sizes of 1 included, and equal sizes (which must not be specialised).
MODEL_SHAPES: List[tuple] = [
    (6, 6),
    (4, 3, 3, 3),
    (1, 5),
    (7,),
    (1,),
    (),
    (3, 1, 1, 1),
    (2, 3, 1, 2, 2),
]


def _float32(transform, shape, seed):
    grad, param, state = _inputs(transform, shape, seed)
    return grad.float(), param.float(), [s.float() for s in state]


def _check_call(rule, transform, shape, seed) -> None:
    grad, param, state = _float32(transform, shape, seed)
    step = torch.tensor(seed)
    direction, new_state = rule(grad, param, state, step)
    expected, expected_state = transform.update(grad, param, state, step)
    torch.testing.assert_close(direction, expected, rtol=2e-5, atol=1e-9)
    for a, b in zip(new_state, expected_state):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-9)


@pytest.mark.slow
def test_compiled_tensor_rule_graphs_do_not_grow_with_the_model() -> None:
    torch._dynamo.reset()
    transform = _entry("coordinate_mlp").build(torch.zeros(()))
    rule = CompiledTensorRule(transform)
    graphs = counters["stats"]["unique_graphs"]
    for i, shape in enumerate(MODEL_SHAPES):
        _check_call(rule, transform, shape, seed=i)
    # one for matrices, one for (small) vectors
    assert counters["stats"]["unique_graphs"] - graphs == 2
    _check_call(rule, transform, (SMALL_VECTOR,), seed=9)  # a large vector: fused formulation
    assert counters["stats"]["unique_graphs"] - graphs == 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        # a later model reuses the graphs
        for shape in [(9, 2, 3), (11,), (1, 1), (2 * SMALL_VECTOR + 3,)]:
            rule(*_float32(transform, shape, seed=0), torch.tensor(0))


def test_shape_bound_transform_is_refused() -> None:
    transform = _entry("kronecker_linear").build(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="shape-bound"):
        CompiledTensorRule(transform)


@pytest.mark.parametrize("shape", [(), (5,), (4, 3), (2, 3, 4), (2, 1, 3, 3), (2, 2, 1, 2, 2)])
def test_canonical_shape(shape) -> None:
    view = canonical_shape(shape)
    assert len(view) == (1 if len(shape) <= 1 else 2)
    assert torch.zeros(shape).reshape(view).numel() == torch.zeros(shape).numel()
    if len(shape) >= 2:
        assert view[0] == shape[0]
