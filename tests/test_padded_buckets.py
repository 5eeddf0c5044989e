"""Parameters of different shapes share one rule call, each zero-padded to the bucket's shape:
the result equals the rule applied to each parameter on its own."""

import pytest
import torch
from test_multi_tensor import DISTINCT, DISTINCT_SKIPS
from torch import nn

import compiledopt as co
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.pretrained import load
from compiledopt.runtime import strategies
from compiledopt.runtime.buckets import PAD_RATIO, Bucket, padding_cell, plan
from compiledopt.transforms import SGD

PACKAGED = "normalized-mlp"


def _params(shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in shapes]


def _grads(params, seed, skip=()):
    generator = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        p.grad = None if i in skip else g


def _pad(x, shape):
    out = x.new_zeros(shape)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def _variants():
    transform = load(PACKAGED).transforms()[0]
    return [(rule, transform.routed(rule)) for rule in transform.rules()]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rule", ["artifact", "learned", "orthogonal", "adam"])
@pytest.mark.parametrize("own, padded", [((7,), (12,)), ((5, 9), (8, 11)), ((9, 4), (10, 13))])
def test_update_padded_equals_update_on_the_unpadded_tensor(rule, fused, own, padded):
    transform = dict(_variants())[rule].double()
    transform.fused = fused
    count = torch.tensor(torch.Size(own).numel())
    generator = torch.Generator().manual_seed(3)
    state = transform.init_state(torch.zeros(own, dtype=torch.float64))
    state_padded = [_pad(s, padded) for s in state]
    for step in range(3):
        grad = torch.randn(own, generator=generator, dtype=torch.float64)
        t = torch.tensor(step)
        with torch.no_grad():
            want, state = transform.update(grad, grad, state, t)
            got, state_padded = transform.update_padded(
                _pad(grad, padded), _pad(grad, padded), state_padded, t, count
            )
        region = tuple(slice(0, n) for n in own)
        padding = torch.ones(padded, dtype=torch.bool)
        padding[region] = False
        torch.testing.assert_close(got[region], want, rtol=1e-10, atol=1e-12)
        assert bool((got[padding] == 0).all())
        for new_padded, new in zip(state_padded, state):
            torch.testing.assert_close(new_padded[region], new, rtol=1e-12, atol=0.0)
            assert bool((new_padded[padding] == 0).all())


def test_a_transform_that_is_not_paddable_says_so():
    transform = SGD()
    assert not transform.paddable
    with pytest.raises(NotImplementedError, match="SGD cannot compute zero-padded tensors"):
        transform.update_padded(torch.zeros(3), torch.zeros(3), [], torch.tensor(0), 3)


def test_padding_cell_groups_sides_within_the_ratio():
    assert PAD_RATIO == 2.0
    assert padding_cell((8,)) == padding_cell((15,)) != padding_cell((16,))
    assert padding_cell((5, 9)) == padding_cell((7, 15)) != padding_cell((5, 16))
    assert padding_cell((1,)) == padding_cell((3,)) == (1,)  # one element joins the smallest


def test_plan_pads_one_element_tensors_only_when_padding():
    params = _params([(1,), (), (1,), (3,), (1, 1)])
    views = {0: (1,), 1: (1,), 2: (1,), 3: (3,), 4: (1, 1)}
    key = lambda i: (views[i], "same")  # noqa: E731
    assert plan(params, range(5), key, 1000, pad=True) == [
        Bucket((0, 1, 2, 3), (3,), ((1,), (1,), (1,), (3,))),
        Bucket((4,), None),
    ]
    # One-element members alone are padded to 2 (no size-1 side in a batched graph).
    assert plan(params, [0, 1], key, 1000, pad=True) == [Bucket((0, 1), (2,), ((1,), (1,)))]
    assert [b.members for b in plan(params, range(5), key, 1000)] == [(0,), (1,), (2,), (3,), (4,)]


def test_plan_pads_the_shapes_of_one_cell_to_their_largest_sides():
    params = _params([(10,), (12,), (15,), (16,), (5, 7), (6, 6), (6, 6), (6, 6)])
    views = {i: tuple(p.shape) for i, p in enumerate(params)}
    buckets = plan(params, range(8), lambda i: (views[i], "same"), max_elements=1000, pad=True)
    assert buckets == [
        Bucket((0, 1, 2), (15,), ((10,), (12,), (15,))),
        Bucket((3,), None),
        Bucket((4, 5, 6, 7), (6, 7), ((5, 7), (6, 6), (6, 6), (6, 6))),
    ]
    # Equal shapes need no padding; without pad only equal shapes share a call.
    same = plan(params, [5, 6, 7], lambda i: (views[i], "same"), 1000, pad=True)
    assert same == [Bucket((5, 6, 7), (6, 6), None)]
    unpadded = plan(params, range(8), lambda i: (views[i], "same"), 1000)
    assert [b.members for b in unpadded] == [(0,), (1,), (2,), (3,), (4,), (5, 6, 7)]
    # max_elements counts the padded elements: 2 members of (6, 7) fit in 84, not 3.
    split = plan(params, [4, 5, 6, 7], lambda i: (views[i], "same"), 84, pad=True)
    assert split == [
        Bucket((4, 5), (6, 7), ((5, 7), (6, 6))),
        Bucket((6, 7), (6, 6), None),
    ]


def test_distinct_shapes_share_a_few_rule_calls(monkeypatch):
    calls = {"update": 0, "update_padded": 0}
    for name in calls:
        original = getattr(NormalizedMLP, name)

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(NormalizedMLP, name, counted)
    # 200 vectors of 200 different lengths from 2 to 201: cells [2, 4), [4, 8), ..., [128, 256).
    params = _params([(n,) for n in range(2, 202)])
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    _grads(params, 0)
    optimizer.step()
    assert calls == {"update": 0, "update_padded": 7}


def test_a_padded_state_is_updated_in_place_and_not_copied_in_again(foreach_copies):
    params = _params([(5, 7), (6, 6), (7, 5)])
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    _grads(params, 0)
    optimizer.step()
    kept = dict(optimizer.state[params[0]])
    copies = foreach_copies
    copies.clear()
    _grads(params, 1)
    optimizer.step()
    assert copies == [3, 3]  # gradients and parameters only: the states are the bucket's own
    assert all(optimizer.state[params[0]][k] is v for k, v in kept.items())
    assert kept["momentum_fast"].shape == (5, 7) and kept["momentum_fast"]._base is not None
    # A state replaced by the user is what the next step reads (copied into the bucket).
    optimizer.state[params[1]]["momentum_fast"] = torch.zeros(6, 6)
    copies.clear()
    _grads(params, 2)
    optimizer.step()
    assert copies == [3, 3, 3]  # gradients, the replaced state, parameters


def test_bfloat16_state_rounds_as_each_parameter_alone(monkeypatch):
    def run(batched):
        params = _params(DISTINCT)
        if not batched:
            monkeypatch.setitem(strategies.MAX_ELEMENTS, "eager", 0)
        optimizer = co.FrozenOptimizer(
            params, PACKAGED, backend="eager", state_dtype=torch.bfloat16
        )
        for t in range(3):
            _grads(params, t, DISTINCT_SKIPS.get(t, ()))
            optimizer.step()
        monkeypatch.undo()
        return params, optimizer

    (batched, a), (alone, b) = run(True), run(False)
    for p, q in zip(batched, alone):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in a.state[p].items():
            other = b.state[q][key]
            assert value.dtype == other.dtype
            # The state is elementwise in the gradients, and a padded member draws the
            # rounding bits of its own place: the same bits as alone.
            assert torch.equal(value, other), key
