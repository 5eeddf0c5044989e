"""Parameters of different shapes share one rule call, each zero-padded to the bucket's shape:
the result equals the rule applied to each parameter on its own."""

import io

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.pretrained import load
from compiledopt.runtime import strategies
from compiledopt.runtime.buckets import PAD_RATIO, Bucket, padding_cell, plan
from compiledopt.transforms import SGD

PACKAGED = "normalized-mlp"
# Distinct shapes: vectors, matrices, conv kernels (computed as (out, in·3·3)), a scalar and a
# (1,) vector (both computed on their own), every one of them different.
SHAPES = [
    (9,),
    (13,),
    (15,),
    (3, 5),
    (4, 7),
    (6, 5),
    (2, 3, 3, 3),
    (3, 2, 3, 3),
    (11,),
    (40,),
    (33,),
    (7, 9),
    (5, 12),
    (),
    (1,),
    (21, 2),
]
NAMES = ["momentum_fast", "momentum_slow", "abs_moment"]


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


def _reference(params, steps, lr, weight_decay, skips):
    """The rule's own ``update`` on every parameter in a for-loop (float64 or as given)."""
    transform = load(PACKAGED).transforms()[0].to(params[0].dtype)
    states = {}
    for t in range(steps):
        _grads(params, t, skips.get(t, ()))
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is None:
                    continue
                step, state = states.get(i, (0, transform.init_state(p)))
                direction, new = transform.update(p.grad, p.detach(), state, torch.tensor(step))
                states[i] = (step + 1, new)
                p.mul_(1 - lr * weight_decay).add_(direction, alpha=-lr)
    return states


SKIPS = {1: (0, 4), 2: (9,)}


def test_distinct_shapes_step_as_the_rule_per_parameter():
    ours, theirs = _params(SHAPES), _params(SHAPES)
    optimizer = co.FrozenOptimizer(ours, PACKAGED, lr=0.01, backend="eager", weight_decay=0.1)
    for t in range(4):
        _grads(ours, t, SKIPS.get(t, ()))
        optimizer.step()
    states = _reference(theirs, 4, 0.01, 0.1, SKIPS)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        step, state = states[i]
        assert int(optimizer.state[a]["step"]) == step
        for name, value in zip(NAMES, state):
            assert optimizer.state[a][name].shape == a.shape
            torch.testing.assert_close(optimizer.state[a][name], value, rtol=1e-6, atol=1e-7)


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


def test_padded_state_saves_loads_and_continues_exactly():
    def make():
        params = _params(SHAPES)
        return params, co.FrozenOptimizer(params, PACKAGED, backend="eager")

    params, optimizer = make()
    for t in range(2):
        _grads(params, t)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"p": [p.detach() for p in params], "o": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, other = make()
    with torch.no_grad():
        for p, value in zip(resumed, saved["p"]):
            p.copy_(value)
    other.load_state_dict(saved["o"])
    for t in (2, 3):
        for ps, opt in ((params, optimizer), (resumed, other)):
            _grads(ps, t)
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))
    # Each parameter's state is its own: writing one leaves the others as they were.
    optimizer.state[params[3]]["momentum_fast"].fill_(7.0)
    assert not bool((optimizer.state[params[4]]["momentum_fast"] == 7.0).any())


def test_bfloat16_state_rounds_as_each_parameter_alone(monkeypatch):
    def run(batched):
        params = _params(SHAPES)
        if not batched:
            monkeypatch.setitem(strategies.MAX_ELEMENTS, "eager", 0)
        optimizer = co.FrozenOptimizer(
            params, PACKAGED, backend="eager", state_dtype=torch.bfloat16
        )
        for t in range(3):
            _grads(params, t, SKIPS.get(t, ()))
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


@pytest.mark.slow
def test_compiled_padded_buckets_match_eager():
    def run(backend):
        params = _params(SHAPES)
        optimizer = co.FrozenOptimizer(params, PACKAGED, backend=backend)
        for t in range(3):
            _grads(params, t, SKIPS.get(t, ()))
            optimizer.step()
        return params, optimizer

    (eager, a), (compiled, b) = run("eager"), run("compiled")
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key, value in a.state[p].items():
            torch.testing.assert_close(b.state[q][key], value, rtol=1e-5, atol=1e-6)


def test_a_skipped_group_keeps_its_state_in_a_bucket_shared_with_another_group():
    shapes = [(5,), (6,), (7,), (4, 5), (5, 4)]
    params = _params(shapes)
    groups = [{"params": [params[0], params[3]]}, {"params": [params[1], params[2], params[4]]}]
    optimizer = co.FrozenOptimizer(groups, PACKAGED, backend="eager")
    _grads(params, 0)
    optimizer.step()
    before = {
        i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params)
    }
    kept = [p.detach().clone() for p in params]
    _grads(params, 1)
    params[3].grad[0, 0] = float("nan")  # the first group skips this step
    optimizer.step()
    assert optimizer.skipped_steps == 1
    for i in (0, 3):  # untouched: values, step counts, parameters
        assert torch.equal(params[i], kept[i])
        for key, value in before[i].items():
            assert torch.equal(optimizer.state[params[i]][key], value), (i, key)
    reference = _params(shapes)
    states = _reference(reference, 2, optimizer.defaults["lr"], 0.0, {})
    for i in (1, 2, 4):  # stepped twice, as the rule alone would
        torch.testing.assert_close(params[i], reference[i], rtol=1e-6, atol=1e-7)
        assert int(optimizer.state[params[i]]["step"]) == 2 == states[i][0]
