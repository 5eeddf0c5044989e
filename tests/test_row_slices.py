"""Exported graphs run on a large tensor in slices of rows where the rule is pointwise: the same
values as one whole-tensor call, the whole call where the rule is not pointwise, and a rule that
breaks the promise refused."""

from typing import List

import pytest
import torch

import compiledopt
from compiledopt import pretrained
from compiledopt.learned import NormalizedMLP
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize
from compiledopt.runtime.slices import SLICE_ELEMENTS, RowSlices
from compiledopt.transforms.baselines import SGD, Adam, AdamW


class Spy:
    """A rule that records the shape of each gradient it is called with."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.shapes: List[tuple] = []

    def __call__(self, grad, param, state, step):
        self.shapes.append(tuple(grad.shape))
        return self.rule(grad, param, state, step)


def _inputs(transform, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=generator)
    grad = torch.randn(shape, generator=generator)
    state = transform.init_state(param)
    # A state that is not all zeros, so every state tensor enters the result.
    state = [s + torch.rand(s.shape, generator=generator) for s in state]
    return grad, param, state, torch.tensor(3)


POINTWISE = {
    "adam": lambda: Adam(betas=(0.8, 0.9), weight_decay=0.1),
    "adamw": lambda: AdamW(weight_decay=0.1),
    "sgd-momentum": lambda: SGD(momentum=0.9, nesterov=True),
    "normalized-adam-vectors": lambda: NormalizedMLP(adam_vectors=True),
    "normalized-elementwise": lambda: NormalizedMLP(elementwise=True),
    "shared-step-size": lambda: LearnedStepSize(0.3),
    "idbd": lambda: IDBD(),
    "hypergradient-per-element": lambda: HypergradientDescent(per_element=True),
}


SHAPES = [(1000,), (37, 30), (9, 4, 5, 6)]


@pytest.mark.parametrize(
    "name, shape",
    [(n, s) for n in sorted(POINTWISE) for s in SHAPES if POINTWISE[n]().pointwise(len(s))],
)
def test_slices_of_a_pointwise_rule_equal_the_whole_call(name, shape):
    transform = POINTWISE[name]()
    grad, param, state, step = _inputs(transform, shape)
    want_direction, want_state = transform.update(grad, param, state, step)
    spy = Spy(transform.update)
    got_direction, got_state = RowSlices(spy, transform, elements=128)(grad, param, state, step)
    assert len(spy.shapes) > 1, "a tensor over the slice size was computed whole"
    assert all(torch.Size(s).numel() <= max(128, grad[0].numel()) for s in spy.shapes)
    assert sum(s[0] for s in spy.shapes) == shape[0]
    assert torch.equal(got_direction, want_direction)
    assert len(got_state) == len(want_state)
    for got, want in zip(got_state, want_state):
        assert torch.equal(got, want)


def test_which_transforms_say_they_are_pointwise():
    harness = NormalizedMLP(orthogonalize=True, adam_vectors=True)
    assert [harness.pointwise(r) for r in range(4)] == [True, True, False, False]
    assert not any(NormalizedMLP().pointwise(r) for r in range(4))
    assert all(NormalizedMLP(elementwise=True).pointwise(r) for r in range(4))
    assert all(Adam().pointwise(r) and SGD().pointwise(r) for r in range(4))
    per_element = LearnedStepSize.per_element(torch.zeros(3, 2))
    assert LearnedStepSize().pointwise(1) and not per_element.pointwise(2)
    assert not HypergradientDescent().pointwise(1)  # one shared α sums over the tensor
    assert not compiledopt.transforms.Transform().pointwise(1)


def test_a_rule_that_is_not_pointwise_is_called_whole():
    transform = NormalizedMLP(orthogonalize=True, adam_vectors=True)
    grad, param, state, step = _inputs(transform, (64, 40))
    spy = Spy(transform.update)
    got, _ = RowSlices(spy, transform, elements=128)(grad, param, state, step)
    assert spy.shapes == [(64, 40)]
    assert torch.equal(got, transform.update(grad, param, state, step)[0])


def test_small_tensors_scalars_and_foreign_state_shapes_are_called_whole():
    transform = Adam()
    spy = Spy(lambda grad, param, state, step: (grad, state))
    sliced = RowSlices(spy, transform, elements=128)
    for shape in [(128,), ()]:
        sliced(*_inputs(transform, shape))
    grad, param, state, step = _inputs(transform, (300,))
    sliced(grad, param, [state[0], state[1][:299]], step)
    assert spy.shapes == [(128,), (), (300,)]


def test_a_rule_that_breaks_its_promise_is_refused():
    transform = Adam()

    def broadcasting(grad, param, state, step):  # one value a slice: copy_ would broadcast it
        direction, new_state = transform.update(grad, param, state, step)
        return direction[:1], new_state

    def losing_state(grad, param, state, step):
        direction, new_state = transform.update(grad, param, state, step)
        return direction, new_state[: 1 + (grad.shape[0] < 128)]

    grad, param, state, step = _inputs(transform, (300,))
    with pytest.raises(RuntimeError, match=r"direction of shape \(1,\) for rows 0:128"):
        RowSlices(broadcasting, transform, elements=128)(grad, param, state, step)
    with pytest.raises(RuntimeError, match="returned 2 state tensors for rows 256:300, 1"):
        RowSlices(losing_state, transform, elements=128)(grad, param, state, step)


def test_the_packaged_onnx_graph_runs_a_large_vector_in_slices(monkeypatch):
    pytest.importorskip("onnxruntime")
    artifact = pretrained.load("normalized-mlp")
    transform = artifact.transforms()[0]
    runner = artifact.runner("onnx")
    size = 2 * SLICE_ELEMENTS + 1000
    grad, param, state, step = _inputs(transform, (size,))
    want_direction, want_state = runner(grad, param, state, step)
    spy = Spy(runner)
    got_direction, got_state = RowSlices(spy, transform)(grad, param, state, step)
    assert spy.shapes == [(SLICE_ELEMENTS,), (SLICE_ELEMENTS,), (1000,)]
    assert torch.equal(got_direction, want_direction)
    for got, want in zip(got_state, want_state):
        assert torch.equal(got, want)
    # And the optimizer's onnx backend goes through the slices.
    calls: List[tuple] = []
    original = RowSlices.__call__

    def recording(self, grad, *rest):
        calls.append(tuple(grad.shape))
        return original(self, grad, *rest)

    monkeypatch.setattr(RowSlices, "__call__", recording)
    weight = torch.nn.Parameter(param.clone())
    optimizer = compiledopt.FrozenOptimizer([weight], "normalized-mlp", lr=1e-3, backend="onnx")
    weight.grad = grad.clone()
    optimizer.step()
    assert calls == [(size,)]
    assert torch.isfinite(weight).all()
