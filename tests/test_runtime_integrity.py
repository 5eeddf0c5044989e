"""FrozenOptimizer keeps its promises: code graphs only when trusted, steps that are all or
nothing, state read by name and checked when loaded, torch.optim's contract (tensor lr, sets,
load_state_dict hooks), and working copies (deepcopy, pickle)."""

import copy
import logging
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import compiledopt as co
from compiledopt.export import (
    ArtifactError,
    UntrustedCodeError,
    build_shape_agnostic,
    export_shape_agnostic,
    load_artifact,
)
from compiledopt.runtime import frozen_optimizer

ADAM = {"kind": "shape_agnostic", "name": "adam", "kwargs": {}}
PACKAGED = "normalized-mlp"
BACKENDS = ["eager", "compiled", "torchscript", "onnx"]


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    """An Adam artifact exported in a temporary folder (so untrusted), graphs for ranks 1, 2."""
    root = tmp_path_factory.mktemp("integrity")
    return export_shape_agnostic(
        root / "adam", ADAM, build_shape_agnostic(ADAM), ["torchscript", "onnx"], ranks=(1, 2)
    )


def _params(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _grads(params, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=generator)


def _snapshot(optimizer, params):
    """Clones of every parameter and every state tensor (state keys included)."""
    state = {
        i: {k: v.clone() for k, v in optimizer.state[p].items()}
        for i, p in enumerate(params)
        if p in optimizer.state
    }
    return [p.detach().clone() for p in params], state


def _assert_unchanged(optimizer, params, snapshot):
    values, state = snapshot
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    now = {i: optimizer.state[p] for i, p in enumerate(params) if optimizer.state.get(p)}
    assert now.keys() == state.keys()
    for i, saved in state.items():
        assert list(now[i]) == list(saved)
        for key, value in saved.items():
            assert now[i][key].dtype == value.dtype and torch.equal(now[i][key], value), (i, key)


# -- trust ----------------------------------------------------------------------------------


def test_code_backends_need_trust(adam):
    params = _params((4, 3))
    with pytest.raises(UntrustedCodeError, match="trust_code=True"):
        co.FrozenOptimizer(params, adam, backend="torchscript")
    untrusted = load_artifact(adam)
    with pytest.raises(UntrustedCodeError):
        co.FrozenOptimizer(params, untrusted, backend="torchscript")
    assert co.FrozenOptimizer(params, adam, backend="onnx").backend == "onnx"  # data, not code
    for artifact in (adam, untrusted):
        optimizer = co.FrozenOptimizer(params, artifact, backend="torchscript", trust_code=True)
        assert optimizer.artifact.code_trusted and optimizer.backend == "torchscript"
    assert not untrusted.code_trusted  # the caller's artifact is not changed
    with pytest.raises(ValueError, match="trusted_keys"):
        co.FrozenOptimizer(params, untrusted, trusted_keys=[b"key"])
    with pytest.raises(ValueError, match="Invalid trust_code"):
        co.FrozenOptimizer(params, adam, trust_code="yes")
    # Packaged optimizers ship with the code that runs them: trusted.
    packaged = co.FrozenOptimizer(params, PACKAGED, backend="torchscript")
    assert packaged.artifact.code_trusted


def test_auto_never_picks_a_code_backend_of_an_untrusted_artifact(adam, monkeypatch, caplog):
    assert co.FrozenOptimizer(_params((4, 3)), adam).backend == "compiled"
    monkeypatch.setattr(frozen_optimizer, "auto_order", lambda *_: ("torchscript", "onnx", "eager"))
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        assert co.FrozenOptimizer(_params((4, 3)), adam).backend == "onnx"
    assert "auto skips the torchscript backend" in caplog.text
    trusted = co.FrozenOptimizer(_params((4, 3)), adam, trust_code=True)
    assert trusted.backend == "torchscript"


# -- all-or-nothing steps -------------------------------------------------------------------


def _resized(optimizer, params):
    # The rule broadcasts the old (5, 3) state against the new (1, 3) gradient.
    params[1].data = torch.zeros(1, 3)
    _grads(params[:2], 2)


def _huge_lr(optimizer, params):
    optimizer.param_groups[1]["lr"] = 1e39  # more than float32 holds
    _grads(params[:2], 2)


def _no_graph(optimizer, params):
    _grads(params, 2)
    params[2].grad = torch.ones(2, 2, 2)  # rank 3: the onnx graphs cover ranks 1 and 2


def _overflow(optimizer, params):
    _grads(params[:2], 2)
    params[1].grad.fill_(1e30)  # finite, but its square (the second moment) is not


FAILURES = {
    "resized": (_resized, ValueError, r"parameter 1: .*resized"),
    "lr": (_huge_lr, ValueError, r"Invalid lr: 1e\+39"),
    "rank": (_no_graph, ArtifactError, "no graph for rank-3"),
    "nonfinite": (_overflow, FloatingPointError, r"new state 'exp_avg_sq' for parameter 1"),
}


@pytest.mark.parametrize("kind", FAILURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_step_changes_nothing(adam, backend, kind):
    setup, error, message = FAILURES[kind]
    if kind == "rank" and backend != "onnx":
        pytest.skip("only the onnx graphs are per rank")
    params = _params((4, 3), (5, 3), (2, 2, 2))
    groups = [{"params": params[:1]}, {"params": params[1:]}]
    optimizer = co.FrozenOptimizer(
        groups, adam, lr=1e-2, backend=backend, nonfinite="raise", trust_code=True
    )
    _grads(params[:2], 1)
    optimizer.step()
    setup(optimizer, params)
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(error, match=message):
        optimizer.step()
    _assert_unchanged(optimizer, params, snapshot)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_nonfinite_direction_or_state_skips_its_group(adam, backend):
    params = _params((4, 3), (5, 3))
    groups = [{"params": params[:1]}, {"params": params[1:]}]
    optimizer = co.FrozenOptimizer(groups, adam, lr=1e-2, backend=backend)
    _grads(params, 1)
    optimizer.step()
    _overflow(optimizer, params)
    before = _snapshot(optimizer, params[1:])
    reference = params[0].detach().clone()
    optimizer.step()
    assert optimizer.skipped_steps == 1
    _assert_unchanged(optimizer, params[1:], before)
    assert not torch.equal(params[0], reference)  # the finite group stepped
    assert int(optimizer.state[params[0]]["step"]) == 2


def test_finiteness_is_read_with_one_host_synchronisation(adam, host_reads, monkeypatch):
    params = _params((4, 3), (5, 3), (6,), (2, 2))
    optimizer = co.FrozenOptimizer(params, adam, backend="eager")
    _grads(params, 1)
    optimizer.step()
    optimizer.step()
    assert len(host_reads) == 2, host_reads
    monkeypatch.undo()
    assert all(int(optimizer.state[p]["step"]) == 2 for p in params)


# -- state by name --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """Parameters, their gradients and a state_dict after three steps of the packaged rule."""
    params = _params((4, 3), (3,), (2, 1, 3))
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    for seed in range(3):
        _grads(params, seed)
        optimizer.step()
    _grads(params, 7)
    return params, optimizer.state_dict()


def _resume(trained, backend, state_dict=None, **kwargs):
    """A copy of the trained parameters with ``state_dict`` loaded; their values after a step."""
    params, saved = trained
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    optimizer = co.FrozenOptimizer(copies, PACKAGED, backend=backend, **kwargs)
    optimizer.load_state_dict(copy.deepcopy(saved) if state_dict is None else state_dict)
    optimizer.step()
    return copies, optimizer


@pytest.mark.parametrize("backend", ["eager", "onnx"])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_reordered_state_keys_give_the_same_step(trained, backend, data):
    reference, _ = _resume(trained, backend)
    saved = copy.deepcopy(trained[1])
    for index, state in saved["state"].items():
        order = data.draw(st.permutations(sorted(state)), label=f"order of parameter {index}")
        saved["state"][index] = {k: state[k] for k in order}
    resumed, optimizer = _resume(trained, backend, saved)
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference))
    # Reordered in place, between steps, too.
    for p in resumed:
        state = optimizer.state[p]
        optimizer.state[p] = {k: state[k] for k in reversed(list(state))}
        p.grad = torch.ones_like(p)
    optimizer.step()
    again, other = _resume(trained, backend)
    for p in again:
        p.grad = torch.ones_like(p)
    other.step()
    assert all(torch.equal(a, b) for a, b in zip(resumed, again))


def _edited(trained, index, key, value):
    saved = copy.deepcopy(trained[1])
    if value is None:
        del saved["state"][index][key]
    else:
        saved["state"][index][key] = value
    return saved


@pytest.mark.parametrize(
    "index, key, value, message",
    [
        (0, "abs_moment", None, r"parameter 0: .*missing \['abs_moment'\]"),
        (1, "exp_avg", torch.zeros(3), r"parameter 1: .*unexpected \['exp_avg'\]"),
        (0, "momentum_fast", torch.zeros(3, 4), r"parameter 0: state 'momentum_fast' .*\(3, 4\)"),
        (2, "momentum_slow", torch.zeros(2, 3), r"parameter 2: state 'momentum_slow' .*\(2, 3\)"),
        (1, "abs_moment", torch.zeros(3, dtype=torch.int32), r"parameter 1: .*'abs_moment'.*int32"),
        (1, "abs_moment", torch.zeros(3, dtype=torch.complex64), r"'abs_moment'.*complex64"),
        (1, "abs_moment", [0.0, 0.0, 0.0], r"parameter 1: state 'abs_moment' must be a tensor"),
        (0, "step", torch.tensor(3.5), r"parameter 0: state 'step' .*3\.5"),
        (0, "step", -1000, r"parameter 0: state 'step' .*-1000"),
        (0, "step", True, r"parameter 0: state 'step' .*True"),
        (0, "step", torch.tensor(math.nan), r"parameter 0: state 'step' .*nan"),
        (0, "step", torch.tensor([1, 2]), r"parameter 0: state 'step' .*shape \(2,\)"),
    ],
)
def test_load_state_dict_refuses_a_state_that_does_not_fit(trained, index, key, value, message):
    params = _params((4, 3), (3,), (2, 1, 3))
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager", lr=0.5)
    _grads(params, 0)
    optimizer.step()
    snapshot = _snapshot(optimizer, params)
    groups = copy.deepcopy(optimizer.param_groups)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(_edited(trained, index, key, value))
    _assert_unchanged(optimizer, params, snapshot)  # nothing was loaded
    assert optimizer.param_groups[0]["lr"] == groups[0]["lr"] == 0.5


def test_load_state_dict_refuses_foreign_and_misplaced_states(trained):
    params = _params((4, 3), (3,), (2, 1, 3))
    _grads(params, 0)
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    adamw = torch.optim.AdamW(params)
    adamw.step()
    with pytest.raises(ValueError, match=r"parameter 0: .*another optimizer"):
        optimizer.load_state_dict(adamw.state_dict())
    saved = copy.deepcopy(trained[1])
    saved["state"][3] = saved["state"][0]
    with pytest.raises(ValueError, match="state for parameter 3, which its param_groups"):
        optimizer.load_state_dict(saved)
    with pytest.raises(ValueError, match="parameter group"):
        co.FrozenOptimizer(params[:2], PACKAGED, backend="eager").load_state_dict(trained[1])
    assert not optimizer.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loaded_step_count_of_any_accepted_kind_steps(adam, backend):
    def resumed(step):
        params = _params((4, 3), (5,))
        optimizer = co.FrozenOptimizer(params, adam, backend=backend, trust_code=True)
        saved = copy.deepcopy(state_dict)
        for state in saved["state"].values():
            state["step"] = step
        optimizer.load_state_dict(saved)
        _grads(params, 3)
        optimizer.step()
        return params, optimizer

    params = _params((4, 3), (5,))
    trainer = co.FrozenOptimizer(params, adam, backend="eager")
    for seed in range(2):
        _grads(params, seed)
        trainer.step()
    state_dict = trainer.state_dict()
    reference, _ = resumed(torch.tensor(2))
    for step in (2, torch.tensor(2.0), torch.tensor(2, dtype=torch.int32)):
        params, optimizer = resumed(step)
        assert all(torch.equal(a, b) for a, b in zip(params, reference)), step
        state = optimizer.state[params[0]]
        assert state["step"].dtype == torch.int64 and int(state["step"]) == 3


def test_loaded_state_keeps_its_storage_dtype(trained):
    params = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in trained[0]]
    saved = copy.deepcopy(trained[1])
    saved["state"][0]["momentum_fast"] = saved["state"][0]["momentum_fast"].double()
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")
    optimizer.load_state_dict(saved)
    state = optimizer.state[params[0]]
    assert state["momentum_fast"].dtype == torch.float32  # the artifact's, not the model's
    assert torch.equal(state["momentum_fast"], trained[1]["state"][0]["momentum_fast"])
    small = co.FrozenOptimizer(params, PACKAGED, backend="eager", state_dtype=torch.bfloat16)
    small.load_state_dict(saved)
    assert small.state[params[1]]["abs_moment"].dtype == torch.bfloat16


# -- torch.optim's contract -----------------------------------------------------------------


def test_load_state_dict_hooks_decide_what_is_loaded(trained):
    params = trained[0]
    optimizer = co.FrozenOptimizer(params, PACKAGED, backend="eager")

    def pre(opt, state_dict):
        edited = copy.deepcopy(state_dict)
        edited["state"][0]["momentum_fast"] = torch.full((4, 3), 0.25)
        return edited

    def post(opt):
        opt.state[params[1]]["abs_moment"] = torch.full((3,), 0.5)

    optimizer.register_load_state_dict_pre_hook(pre)
    optimizer.register_load_state_dict_post_hook(post)
    optimizer.load_state_dict(trained[1])
    assert torch.equal(optimizer.state[params[0]]["momentum_fast"], torch.full((4, 3), 0.25))
    assert torch.equal(optimizer.state[params[1]]["abs_moment"], torch.full((3,), 0.5))
    slow = trained[1]["state"][2]["momentum_slow"]
    assert torch.equal(optimizer.state[params[2]]["momentum_slow"], slow)
    assert optimizer.state[params[2]]["momentum_slow"] is not slow  # a copy


def test_tensor_lr_follows_a_scheduler_like_torch_adam(adam):
    params, reference = _params((4, 3), (5,)), _params((4, 3), (5,))
    optimizer = co.FrozenOptimizer(params, adam, lr=torch.tensor(0.02), backend="eager")
    torch_adam = torch.optim.Adam(reference, lr=torch.tensor(0.02), foreach=False)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (optimizer, torch_adam)]
    for seed in range(6):
        _grads(params, seed)
        _grads(reference, seed)
        optimizer.step()
        torch_adam.step()
        for scheduler in schedulers:
            scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.0025)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        co.FrozenOptimizer(params, adam, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        co.FrozenOptimizer([{"params": params, "lr": torch.ones(2)}], adam)


def test_a_set_of_parameters_is_refused_as_torch_does(adam):
    params = set(_params((4, 3), (5,)))
    with pytest.raises(TypeError, match="ordered collections"):
        torch.optim.SGD([{"params": params}], lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        co.FrozenOptimizer(params, adam)
    with pytest.raises(TypeError, match="ordered collections"):
        co.FrozenOptimizer([{"params": params}], adam)


# -- deepcopy and pickle --------------------------------------------------------------------


def _attributes(optimizer):
    return (
        optimizer.artifact,
        optimizer.artifact.code_trusted,
        optimizer.backend,
        optimizer.nonfinite,
        optimizer.state_dtype,
        optimizer.skipped_steps,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deep_copy_steps_as_the_original(adam, backend):
    params = _params((4, 3), (5, 3))
    optimizer = co.FrozenOptimizer(
        params, adam, backend=backend, nonfinite="skip", trust_code=True, lr=1e-2
    )
    _grads(params, 0)
    optimizer.step()
    _grads(params, 1, scale=math.inf)
    optimizer.step()  # skipped: a count the copy keeps
    _grads(params, 2)
    twin = copy.deepcopy(optimizer)
    assert _attributes(twin) == _attributes(optimizer) and optimizer.skipped_steps == 1
    copies = twin.param_groups[0]["params"]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    optimizer.step()
    twin.step()
    assert all(c is not p and torch.equal(c, p) for c, p in zip(copies, params))
    for c, p in zip(copies, params):
        assert int(twin.state[c]["step"]) == 2
        assert all(torch.equal(twin.state[c][k], v) for k, v in optimizer.state[p].items())


def test_a_pickled_optimizer_steps_as_the_original(adam):
    params = _params((4, 3), (5,))
    optimizer = co.FrozenOptimizer(
        params, adam, backend="torchscript", trust_code=True, state_dtype=torch.bfloat16
    )
    _grads(params, 0)
    optimizer.step()
    _grads(params, 1)
    restored = pickle.loads(pickle.dumps(optimizer))
    assert _attributes(restored) == _attributes(optimizer)
    assert restored.artifact.code_trusted and restored.state_dtype == torch.bfloat16
    copies = restored.param_groups[0]["params"]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    optimizer.step()
    restored.step()
    for c, p in zip(copies, params):
        assert torch.equal(c, p)
        assert all(torch.equal(restored.state[c][k], v) for k, v in optimizer.state[p].items())
