"""Multi-tensor steps: small parameters of one shape share one rule call (a vmapped batch),
and the result equals the rule applied to each parameter on its own."""

import io
import logging

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.pretrained import load
from compiledopt.runtime import strategies
from compiledopt.runtime.buckets import MAX_MEMBER, Bucket, finite_rows, plan
from compiledopt.runtime.skips import groups_to_skip

PACKAGED = "normalized-mlp"
# Shapes that bucket together (same shape, or the same canonical view: (4, 3, 2) and (4, 6)),
# alone (a single (5, 7), a scalar-like (1,)), and one too large to batch.
SHAPES = [(16,)] * 7 + [(4, 3, 2), (4, 6), (4, 6), (5, 7), (1,), (MAX_MEMBER + 5,)]


def _params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _grads(params, seed, skip=()):
    generator = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=generator)
        p.grad = None if i in skip else g


def _reference(params, steps, lr, weight_decay, skips):
    """The rule's own ``update`` called on every parameter in a for-loop, ``p ← p(1 − lr·wd) −
    lr·d``: the independent reference of a step."""
    transform = load(PACKAGED).transforms()[0]
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


def _run(optimizer, params, steps, skips):
    for t in range(steps):
        _grads(params, t, skips.get(t, ()))
        optimizer.step()


# Parameters 0 and 8 miss a step: their counts fall behind, and they leave their buckets.
SKIPS = {1: (0, 8), 2: (3,)}
# Distinct shapes, zero-padded into shared buckets: vectors, matrices, conv kernels (computed as
# (out, in·3·3)), and a scalar and a (1,) vector (one-element tensors join the smallest ones).
DISTINCT = [
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
DISTINCT_SKIPS = {1: (0, 4), 2: (9,)}
SHAPE_SETS = pytest.mark.parametrize(
    ("shapes", "skips"), [(SHAPES, SKIPS), (DISTINCT, DISTINCT_SKIPS)], ids=["same", "distinct"]
)


@SHAPE_SETS
def test_bucketed_eager_step_equals_the_rule_per_parameter(shapes, skips):
    ours, theirs = _params(shapes), _params(shapes)
    optimizer = co.FrozenOptimizer(ours, PACKAGED, lr=0.01, backend="eager", weight_decay=0.1)
    _run(optimizer, ours, 4, skips)
    states = _reference(theirs, 4, 0.01, 0.1, skips)
    names = ["momentum_fast", "momentum_slow", "abs_moment"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        step, state = states[i]
        assert int(optimizer.state[a]["step"]) == step
        for name, value in zip(names, state):
            assert optimizer.state[a][name].shape == a.shape
            torch.testing.assert_close(optimizer.state[a][name], value, rtol=1e-6, atol=1e-7)


def test_one_rule_call_per_bucket(monkeypatch):
    calls = []
    original = NormalizedMLP.update

    def counted(self, grad, param, state, step):
        calls.append(tuple(grad.shape))
        return original(self, grad, param, state, step)

    def counted_blocked(self, grad, param, state, step):
        calls.append(("blocked", *grad.shape))
        return blocked(self, grad, param, state, step)

    blocked = NormalizedMLP.update_blocked
    monkeypatch.setattr(NormalizedMLP, "update", counted)
    monkeypatch.setattr(NormalizedMLP, "update_blocked", counted_blocked)
    params = _params([(8,)] * 300 + [(3, 4)] * 2 + [(MAX_MEMBER + 1,)])
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    _grads(params, 0)
    optimizer.step()
    # Inside vmap each call sees one member's shape: one call for the 300 vectors (2,400
    # elements, one block), one for the two matrices; the large vector alone, in blocks.
    assert sorted(calls, key=str) == sorted([(8,), (3, 4), ("blocked", MAX_MEMBER + 1)], key=str)


def test_plan_splits_buckets_by_size_step_and_device_keys():
    params = _params([(10,)] * 5 + [(20,)])
    keys = {0: "a", 1: "a", 2: "b", 3: "a", 4: "a", 5: "a"}
    buckets = plan(params, range(6), lambda i: ((10,), keys[i]), max_elements=25)
    # "a" holds 0, 1, 3, 4, 5: at most 2 members of 10 elements per call; "b" is alone.
    assert [b.members for b in buckets] == [(0, 1), (3, 4), (5,), (2,)]
    assert [b.view for b in buckets] == [(10,), (10,), None, None]
    assert plan(params, [0, 1], lambda i: None, 100) == [Bucket((0,), None), Bucket((1,), None)]


def test_bfloat16_state_rounds_as_each_parameter_alone(monkeypatch):
    def run(batched):
        params = _params(SHAPES[:10])
        if not batched:
            monkeypatch.setitem(strategies.MAX_ELEMENTS, "eager", 0)
        optimizer = co.FrozenOptimizer(
            params, PACKAGED, backend="eager", state_dtype=torch.bfloat16
        )
        _run(optimizer, params, 3, SKIPS)
        monkeypatch.undo()
        return params, optimizer

    (batched, a), (alone, b) = run(True), run(False)
    for p, q in zip(batched, alone):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in a.state[p].items():
            other = b.state[q][key]
            assert value.dtype == other.dtype
            # The same seeds per parameter and step: the same bits, up to the rare value whose
            # float32 input differs by an ulp between the batched and the lone reduction.
            if key != "step":
                close = (value.float() - other.float()).abs() <= 1e-2 * other.float().abs()
                assert bool(close.all())


def test_finite_rows_flag_every_nonfinite_member_as_a_per_member_loop_finds_them():
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(6, 3, 4, generator=generator),
        torch.randn(6, generator=generator),
        torch.randn(6, 2, generator=generator).to(torch.bfloat16),
        torch.arange(6),  # not floating point: not checked
    ]
    tensors[0][1, 2, 3] = float("inf")
    tensors[1][3] = float("nan")
    tensors[2][4, 0] = float("-inf")
    tensors[0][5, 0, :2] = 3e38  # finite, but its sum overflows: flagged, to be looked at again
    exact = [
        all(bool(torch.isfinite(t[j]).all()) for t in tensors if t.is_floating_point())
        for j in range(6)
    ]
    assert exact == [True, False, True, False, False, True]
    assert finite_rows(tensors).tolist() == [True, False, True, False, False, False]


def test_flags_taken_by_a_rule_name_each_members_first_nonfinite_tensor(caplog):
    grads, directions, state = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    directions[1, 0] = float("nan")
    state[1, 2] = float("inf")
    state[2, 1] = float("inf")
    grads[3, :2] = 3e38  # flagged by an overflowing sum, all finite: not skipped
    named = ((grads, "gradient"), (directions, "direction"), (state, "new state 'm'"))
    flags = finite_rows([grads, directions, state])
    assert flags.tolist() == [True, False, False, False]
    checks = [(flags, (4, 5, 6, 7), named)]
    groups = [({}, (4,)), ({}, (5,)), ({}, (6,)), ({}, (7,))]
    labels = [f"parameter {i}" for i in range(8)]
    with caplog.at_level(logging.DEBUG, logger="compiledopt"):
        skipped, warned = groups_to_skip(groups, checks, labels, "skip", False)
    assert skipped == {1, 2} and warned
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "parameter 5: non-finite direction" in messages[0]
    assert "parameter 6: non-finite new state 'm'" in messages[1]
    with pytest.raises(FloatingPointError, match="non-finite direction for parameter 5"):
        groups_to_skip(groups, checks, labels, "raise", False)


def test_a_nonfinite_member_skips_only_its_group():
    params = _params([(6,)] * 4)
    optimizer = co.FrozenOptimizer(
        [{"params": params[:2]}, {"params": params[2:]}], PACKAGED, backend="eager"
    )
    _grads(params, 0)
    params[1].grad[3] = float("nan")
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params[:2], before[:2]))
    assert all(p not in optimizer.state for p in params[:2])
    reference = _params([(6,)] * 4)
    _reference(reference, 1, optimizer.defaults["lr"], 0.0, {})
    for p, q in zip(params[2:], reference[2:]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_bad_batched_result_is_refused_before_anything_is_written(monkeypatch):
    params = _params([(6,)] * 3)
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    rules = optimizer._schema_strategy.rules(torch.device("cpu"))

    def truncated(grads, inputs, stored, step, seeds):
        directions, values, finite = rules.batched(grads, inputs, stored, step, seeds)
        return directions[:, :5], values, finite

    monkeypatch.setattr(
        optimizer._schema_strategy, "rules", lambda device: rules._replace(batched=truncated)
    )
    _grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameter 0 \(and the parameters batched with it\)"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not optimizer.state


@pytest.mark.parametrize("shapes", [[(5,)] * 6, DISTINCT], ids=["same", "distinct"])
def test_bucketed_state_saves_loads_and_continues_exactly(shapes):
    def make():
        params = _params(shapes)
        return params, co.FrozenOptimizer(params, PACKAGED, backend="eager")

    params, optimizer = make()
    _run(optimizer, params, 2, {})
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
    optimizer.state[params[0]]["momentum_fast"].fill_(7.0)
    assert not bool((optimizer.state[params[1]]["momentum_fast"] == 7.0).any())


@pytest.mark.slow
@SHAPE_SETS
def test_bucketed_compiled_step_matches_eager(shapes, skips):
    def run(backend):
        params = _params(shapes)
        optimizer = co.FrozenOptimizer(params, PACKAGED, backend=backend)
        _run(optimizer, params, 3, skips)
        return params, optimizer

    (eager, a), (compiled, b) = run("eager"), run("compiled")
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key, value in a.state[p].items():
            torch.testing.assert_close(b.state[q][key], value, rtol=1e-5, atol=1e-6)


def test_a_state_replaced_after_a_step_is_checked_again():
    params = _params([(6,)] * 3)
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    _grads(params, 0)
    optimizer.step()
    optimizer.state[params[1]]["momentum_slow"] = torch.zeros(7)
    _grads(params, 1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameter 1: state 'momentum_slow' has shape \(7,\)"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_nonfinite_ignore_never_synchronises_and_writes_as_computed(host_reads, monkeypatch):
    params = _params([(6,)] * 3 + [(4, 5)])
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager", nonfinite="ignore")
    _grads(params, 0)
    optimizer.step()
    params[0].grad[2] = float("nan")
    optimizer.step()
    assert host_reads == []
    monkeypatch.undo()
    assert optimizer.skipped_steps == 0
    assert bool(params[0].isnan().any())  # as torch.optim would: the NaN is applied
    assert bool(params[1].isfinite().all())


def test_a_bucket_state_is_updated_in_place_and_not_copied_in_again(foreach_copies):
    params = _params([(6,)] * 7)
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    copies = foreach_copies
    _grads(params, 0)
    optimizer.step()
    assert copies == [7, 7, 7, 7, 7]  # gradients, the three initial states, parameters
    kept = dict(optimizer.state[params[3]])
    copies.clear()
    _grads(params, 1)
    optimizer.step()
    assert copies == [7, 7]  # gradients and parameters only: the states are the bucket's own
    # The same tensors, updated in place (as torch.optim's state is).
    assert all(optimizer.state[params[3]][k] is v for k, v in kept.items())
    assert all(int(optimizer.state[p]["step"]) == 2 for p in params)


def test_a_state_replaced_or_edited_between_steps_is_what_the_next_step_reads():
    """A bucket's stacked state is reused only while every member holds the view the last step
    gave it: a replaced entry (load_state_dict, assignment) is stacked again, and an in-place
    edit of a member's view is part of the stacked tensor; both as per-parameter calls see it."""

    def run(batched: bool):
        params = _params([(6,)] * 4)
        optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
        if not batched:
            optimizer._schema_strategy.max_elements = 0  # every parameter in its own call
        for t in range(4):
            _grads(params, t)
            optimizer.step()
            if t == 0:
                optimizer.state[params[1]]["momentum_slow"] = torch.full((6,), 0.5)
            if t == 1:
                optimizer.state[params[2]]["abs_moment"].mul_(3.0)
        return params, optimizer

    (ours, a), (theirs, b) = run(True), run(False)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in b.state[q].items():
            torch.testing.assert_close(a.state[p][key], value, rtol=1e-6, atol=1e-7)


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
