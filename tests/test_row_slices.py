"""Exported graphs run on a large tensor in slices of rows where the rule is pointwise: the same
values as one whole-tensor call, the whole call where the rule is not pointwise, and a rule that
breaks the promise refused."""

import copy
from typing import List

import pytest
import torch

import compiledopt
from compiledopt import pretrained
from compiledopt.learned import NormalizedMLP
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize
from compiledopt.runtime.buckets import plan
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


# --------------------------------------------------------------------------------------------
# Small parameters of one shape whose rule is pointwise share one call of the rank-1 graph
# --------------------------------------------------------------------------------------------

SHAPES_OF_A_MODEL = [(1024,)] * 9 + [(64,)] * 5 + [(6, 5)] * 3 + [(300,)] + [(70_000,)] * 2


def _steps(backend, flat, shapes=SHAPES_OF_A_MODEL, steps=3, bad=None, **options):
    """Parameters and optimizer after ``steps`` steps on fixed gradients; ``flat`` False runs
    every parameter in a call of its own (the reference); ``bad`` (index, step) gets a NaN."""
    from compiledopt.runtime.strategies import TensorStrategy

    original = TensorStrategy._flat_key
    calls: List[int] = []
    flat_step = TensorStrategy._flat

    def recording(self, members, *rest):
        calls.append(len(members))
        return flat_step(self, members, *rest)

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    groups = [{"params": params[: len(params) // 2]}, {"params": params[len(params) // 2 :]}]
    try:
        if not flat:
            TensorStrategy._flat_key = lambda self, param, step: None
        TensorStrategy._flat = recording
        optimizer = compiledopt.FrozenOptimizer(
            groups, "normalized-mlp", lr=1e-2, backend=backend, **options
        )
        for k in range(steps):
            for j, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=generator)
                if bad == (j, k):
                    p.grad.view(-1)[3] = float("nan")
            optimizer.step()
    finally:
        TensorStrategy._flat_key = original
        TensorStrategy._flat = flat_step
    return params, optimizer, calls


def _assert_same(got, want):
    (params, optimizer, _), (ref_params, ref_optimizer, _) = got, want
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == ref_optimizer.state[q].keys()
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, ref_optimizer.state[q][key]), key
            assert value.shape == ref_optimizer.state[q][key].shape


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_small_pointwise_parameters_share_one_call_with_the_same_values(backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    got = _steps(backend, flat=True)
    # Per step: the nine 1,024-vectors, the five 64-vectors and the two 70,000-vectors (3 fit
    # a call); the matrices (Newton–Schulz is not pointwise) and the lone 300-vector go alone.
    assert got[2] == [9, 5, 2] * 3
    _assert_same(got, _steps(backend, flat=False))


def test_a_nonfinite_member_skips_its_own_group_only():
    pytest.importorskip("onnxruntime")
    # Member 12 (a 64-vector in the second param group) shares its call with members of the
    # first group: only the second group skips that step, as with a call each.
    got = _steps("onnx", flat=True, bad=(12, 1))
    want = _steps("onnx", flat=False, bad=(12, 1))
    assert [g.get("skipped_steps", 0) for g in got[1].param_groups] == [0, 1]
    assert [g.get("skipped_steps", 0) for g in want[1].param_groups] == [0, 1]
    _assert_same(got, want)


def test_a_saved_state_continues_the_same():
    pytest.importorskip("onnxruntime")
    params, optimizer, _ = _steps("onnx", flat=True, steps=2)
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    half = len(copies) // 2
    again = compiledopt.FrozenOptimizer(
        [{"params": copies[:half]}, {"params": copies[half:]}],
        "normalized-mlp",
        lr=1e-2,
        backend="onnx",
    )
    again.load_state_dict(saved)
    generator = torch.Generator().manual_seed(5)
    for p, q in zip(params, copies):
        p.grad = torch.randn(p.shape, generator=generator)
        q.grad = p.grad.clone()
    optimizer.step()
    again.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_bfloat16_state_is_not_flattened():
    """A state stored in bfloat16 is rounded with bits drawn per parameter: no shared call."""
    pytest.importorskip("onnxruntime")
    *_, calls = _steps("onnx", flat=True, steps=1, state_dtype=torch.bfloat16)
    assert calls == []


def test_flat_buckets_by_key_within_a_slice():
    """The exported backends' buckets (``plan`` with members up to a slice's size)."""
    sizes = [1024, 1024, 1024, 1024, 100_000, 100_000, 100_000, 1024]
    params = [torch.zeros(n) for n in sizes]
    rests = {0: "a", 1: None, 2: "a", 3: "b", 4: "a", 5: "a", 6: "a", 7: "a"}

    def key(i):
        return None if rests[i] is None else ((sizes[i],), rests[i])

    buckets = plan(params, range(8), key, SLICE_ELEMENTS, max_member=SLICE_ELEMENTS)
    groups = [b.members for b in buckets if b.view is not None]
    alone = [b.members[0] for b in buckets if b.view is None]
    # 1,024-element members of key "a" together; 100,000-element ones two to a call (a slice
    # holds 262,144 elements), the third alone; a key of one member alone.
    assert groups == [(0, 2, 7), (4, 5)]
    assert alone == [1, 3, 6]
