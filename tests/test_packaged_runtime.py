"""Every packaged optimizer on every backend that can run it, on the models the runtime must
serve: many small tensors (the bucketed, vmapped path) and a transformer (matrices, biases and
norm weights of assorted shapes, some alone in their bucket).

The eager backend is checked against the rule's own ``update`` called per parameter in a
for-loop; every other backend against the eager backend, within float32 rounding. The compiled
backend's cases are slow (Inductor compiles a few graphs per optimizer; the optimizers of one
process share them).
"""

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt import pretrained
from compiledopt.export import ArtifactError
from compiledopt.learned.catalog import build_transform
from compiledopt.runtime.buckets import BatchedRule
from compiledopt.runtime.compiled import CompiledBatchedRule, StoredStateRule

NAMES = pretrained.names()
STEPS = 3
LR = 0.5
# Float32 rounding of a few steps through a small network, computed in another order (another
# backend, a vmapped batch, a fused formulation): relative to the largest displacement.
TOLERANCE = 2e-5


def many_small() -> nn.Module:
    """Many small tensors: 40 biases of 64 elements, 12 small matrices, odd shapes alone."""
    layers = [nn.Linear(3, 64) for _ in range(40)] + [nn.Linear(4, 4) for _ in range(12)]
    extra = nn.ParameterList([nn.Parameter(torch.randn(3, 2, 2)), nn.Parameter(torch.randn(1))])
    return nn.ModuleList([*layers, extra])


def transformer() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        nn.Linear(8, 1),
    )


MODELS = {"many_small": many_small, "transformer": transformer}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]()


def _gradients(params, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _run(name: str, kind: str, backend: str):
    """The model's parameters before and after ``STEPS`` steps of ``name`` on ``backend``, and
    the optimizer's state by parameter index."""
    params = list(_model(kind).parameters())
    before = [p.detach().clone() for p in params]
    optimizer = co.FrozenOptimizer(
        params, name, lr=LR, backend=backend, weight_decay=0.01, trust_code=True
    )
    assert optimizer.backend == backend
    for step in range(STEPS):
        _gradients(params, step)
        optimizer.step()
    states = [optimizer.state[p] for p in params]
    return before, [p.detach() for p in params], states


def _reference(name: str, kind: str):
    """The same steps computed by the rule's own ``update``, one parameter at a time."""
    transform = pretrained.load(name).transforms()[0]
    params = [p.detach().clone() for p in _model(kind).parameters()]
    states = [transform.init_state(p) for p in params]
    for step in range(STEPS):
        _gradients(params, step)
        with torch.no_grad():
            for i, p in enumerate(params):
                direction, states[i] = transform.update(p.grad, p, states[i], torch.tensor(step))
                p.mul_(1 - LR * 0.01).add_(direction, alpha=-LR)
    return params, states


def _assert_close_displacement(before, got, want, what: str) -> None:
    """``got`` and ``want`` (parameters after the steps) moved from ``before`` alike, within
    :data:`TOLERANCE` of the largest displacement."""
    scale = max(float((w - b).abs().max()) for b, w in zip(before, want))
    assert scale > 0, f"{what}: nothing moved"
    for i, (b, g, w) in enumerate(zip(before, got, want)):
        error = float(((g - b) - (w - b)).abs().max())
        assert error <= TOLERANCE * scale, (
            f"{what}: parameter {i} {tuple(b.shape)} differs by {error:.3g} (largest "
            f"displacement {scale:.3g})"
        )


def _assert_close_states(got, want, names, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert int(g["step"]) == STEPS, f"{what}: parameter {i} step {g['step']}"
        for key, value in zip(names, w):
            scale = float(value.abs().max()) or 1.0
            error = float((g[key].float() - value.float()).abs().max())
            assert error <= TOLERANCE * scale, (
                f"{what}: parameter {i} state {key!r} differs by {error:.3g} (scale {scale:.3g})"
            )


@pytest.fixture(scope="module")
def eager_runs():
    """Eager runs, shared by every comparison: ``(name, kind) -> (before, after, states)``."""
    runs = {}

    def get(name, kind):
        if (name, kind) not in runs:
            runs[name, kind] = _run(name, kind, "eager")
        return runs[name, kind]

    return get


def test_every_packaged_optimizer_is_covered():
    assert NAMES, "no packaged optimizer found"
    assert pretrained.DEFAULT in NAMES


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_eager_steps_equal_the_rule_per_parameter(name, kind, eager_runs):
    before, after, states = eager_runs(name, kind)
    params, reference_states = _reference(name, kind)
    _assert_close_displacement(before, after, params, f"{name} eager on {kind}")
    names = pretrained.load(name).manifest["state_names"]
    _assert_close_states(states, reference_states, names, f"{name} eager on {kind}")


def _cases():
    """``(name, backend)`` for every packaged optimizer and every backend it may run: eager's
    compiled counterpart and every exported graph the artifact ships (AOTInductor only where it
    ships one, and runs on this CPU)."""
    cases = []
    for name in NAMES:
        artifact = pretrained.load(name)
        for backend in ("compiled", *artifact.backends):
            marks = [pytest.mark.slow] if backend in ("compiled", "aoti") else []
            cases.append(pytest.param(name, backend, marks=marks, id=f"{name}-{backend}"))
    return cases


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name, backend", _cases())
def test_every_backend_steps_as_eager(name, backend, kind, eager_runs):
    if backend not in ("compiled", "eager"):
        artifact = pretrained.load(name)
        try:
            artifact.check_runnable(backend)
        except ArtifactError as error:
            pytest.skip(f"{backend} cannot run here: {error}")
    if backend == "compiled" and kind != "transformer":
        # Its buckets of same-shape biases and norm weights take the vmapped graphs as the many
        # small tensors would; compiling each packaged rule once keeps the suite's time down.
        pytest.skip("the compiled backend is checked on the transformer")
    before, want, want_states = eager_runs(name, kind)
    _, got, got_states = _run(name, kind, backend)
    what = f"{name} {backend} on {kind}"
    _assert_close_displacement(before, got, want, what)
    names = pretrained.load(name).manifest["state_names"]
    _assert_close_states(got_states, [[s[k] for k in names] for s in want_states], names, what)


@pytest.mark.slow
def test_compiled_batched_coordinate_mlp_matches_its_eager_batch():
    """The vmapped compiled rule of a (tiny) CoordinateMLP: its float hyper-parameters
    (``norm_eps`` added to a per-tensor 0-d mean) compile under ``vmap``, and the batch equals
    the eager batch."""
    transform = build_transform("coordinate-mlp", {"hidden_sizes": [2], "timescales": [10.0]})
    transform.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    grads, params = torch.randn(2, 2, 3, generator=generator)
    states = [torch.stack([s, s]) for s in transform.init_state(params[0])]
    step, seeds = torch.tensor(4), torch.arange(2)
    got, got_states, got_finite = CompiledBatchedRule(transform, torch.float32)(
        grads, params, states, step, seeds
    )
    want, want_states, want_finite = BatchedRule(StoredStateRule(transform.update, torch.float32))(
        grads, params, states, step, seeds
    )
    assert got_finite.tolist() == want_finite.tolist() == [True, True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(got_states, want_states):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # The flags taken in the graph see a member's infinity, as the eager batch's do.
    grads[1, 2] = float("inf")
    rule = CompiledBatchedRule(transform, torch.float32)
    assert rule(grads, params, states, step, seeds)[2].tolist() == [True, False]
