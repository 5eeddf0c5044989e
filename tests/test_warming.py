"""A compiled rule chosen by ``auto`` never makes a step wait for its compile: the eager rule
answers until the background compile of that kind of call is ready, and the hand-over keeps the
optimizer's state exactly (parameters equal a run compiled from the start, within rounding)."""

import logging
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import compiledopt as co
from compiledopt.runtime import compiled, warming
from compiledopt.runtime.buckets import BatchedRule
from compiledopt.runtime.compiled import COMPILE_LOCK
from compiledopt.runtime.warming import Warming

#: How long a test waits for its own rule's compiles. Normally they take milliseconds; the bound
#: is reached only while a compile left running by another test holds the compile lock.
WAIT_S = 600.0


def _kind(x):
    return x.dim()


def _recorder(name, calls, gate=None):
    def rule(x):
        if gate is not None and threading.current_thread().name == "compiledopt-compile":
            gate.wait(10)
        calls.append((name, threading.current_thread().name))
        return x + (1 if name == "compiled" else 0)

    return rule


def test_eager_answers_until_the_compile_of_that_kind_is_ready():
    calls, gate = [], threading.Event()
    rule = Warming(_recorder("eager", calls), _recorder("compiled", calls, gate), _kind, "t")
    x = torch.zeros(3)
    started = warming.compiles_started()
    assert torch.equal(rule(x), x)  # eager while compiling
    assert torch.equal(rule(x), x)  # still compiling: eager again, no second compile
    assert warming.compiles_started() == started + 1
    gate.set()
    assert rule.wait(WAIT_S)
    assert torch.equal(rule(x), x + 1)  # compiled from now on
    main = threading.current_thread().name
    assert calls == [
        ("eager", main),
        ("eager", main),
        ("compiled", "compiledopt-compile"),
        ("compiled", main),
    ]
    # Another kind (a matrix) starts its own compile and answers eager meanwhile.
    assert torch.equal(rule(torch.zeros(2, 2)), torch.zeros(2, 2))
    assert rule.wait(WAIT_S)
    assert torch.equal(rule(torch.zeros(2, 2)), torch.ones(2, 2))


def test_a_rule_waits_for_its_own_compiles_only():
    calls, gate = [], threading.Event()
    slow = Warming(_recorder("eager", calls), _recorder("compiled", calls, gate), _kind, "slow")
    never = Warming(lambda x: x, lambda x: x, _kind, "never", warming.EagerClock(1e9))
    slow(torch.zeros(3))
    started = warming.compiles_started()
    never(torch.zeros(3))  # not due: starts no compile
    assert warming.compiles_started() == started
    try:
        assert never.wait(0)  # nothing of its own to wait for
        assert not slow.wait(0.05) and not warming.wait(0.05)  # the gated compile runs on
    finally:
        gate.set()
    assert slow.wait(WAIT_S)


def test_no_compile_starts_before_the_eager_rule_has_run_its_patience(monkeypatch):
    calls, now = [], [0.0]
    clock = warming.EagerClock(0.05)
    # A clock the eager rule advances by exactly 0.03 s a call (a real sleep overshoots under
    # load, which would make the first call alone reach the patience).
    monkeypatch.setattr(warming, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def slow_eager(x):
        now[0] += 0.03
        calls.append(("eager", threading.current_thread().name))
        return x

    rule = Warming(slow_eager, _recorder("compiled", calls), _kind, "t", clock)
    other = Warming(slow_eager, _recorder("compiled", calls), _kind, "t", clock)
    x = torch.zeros(3)
    rule(x)  # 0.03 s of eager time: below the patience
    other(torch.zeros(2, 2))  # another form of the same rule, the same clock: 0.06 s
    assert rule.wait(WAIT_S) and other.wait(WAIT_S)
    assert all(name == "eager" for name, _ in calls)
    assert clock.spent >= 0.06 and clock.due
    rule(x)  # due: this call starts the compile (and still answers eager)
    assert rule.wait(WAIT_S)
    assert ("compiled", "compiledopt-compile") in calls
    assert torch.equal(rule(x), x + 1)


def test_the_default_patience_is_read_when_a_clock_is_made(monkeypatch):
    assert warming.EagerClock().patience == warming.PATIENCE_S == 120.0
    monkeypatch.setattr(warming, "PATIENCE_S", 0.0)
    assert warming.EagerClock().due


def test_the_compile_runs_on_copies_of_the_call():
    seen = []

    def compiled(x):
        seen.append(x)
        return x

    rule = Warming(lambda x: x, compiled, _kind, "t")
    x = torch.zeros(3)
    rule(x)
    assert rule.wait(WAIT_S)
    assert seen[0] is not x and torch.equal(seen[0], x)


def test_a_ready_rule_runs_eager_while_another_compile_holds_the_lock():
    calls = []
    rule = Warming(_recorder("eager", calls), _recorder("compiled", calls), _kind, "t")
    rule(torch.zeros(3))
    assert rule.wait(WAIT_S)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with COMPILE_LOCK:
            holding.set()
            release.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    holding.wait(10)
    try:
        assert torch.equal(rule(torch.zeros(3)), torch.zeros(3))  # eager: no waiting
    finally:
        release.set()
        other.join()
    assert torch.equal(rule(torch.zeros(3)), torch.ones(3))


def test_a_failed_compile_keeps_the_eager_rule_with_one_warning(caplog):
    def broken(x):
        raise RuntimeError("inductor lowering failed")

    rule = Warming(lambda x: x * 2, broken, _kind, "the toy rule")
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        rule(torch.ones(2))
        assert rule.wait(WAIT_S)
        for _ in range(3):
            assert torch.equal(rule(torch.ones(2)), torch.full((2,), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the toy rule" in warnings[0] and "inductor lowering failed" in warnings[0]


def _run(backend, wait_after=None, steps=5):
    torch.manual_seed(0)
    # Two matrices of distinct shapes: one graph kind (rank 2), no bucket.
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3, 5))]
    optimizer = co.FrozenOptimizer(params, "normalized-mlp", lr=0.05, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        if step == wait_after:
            assert warming.wait(600)
    return optimizer, [p.detach().clone() for p in params]


@pytest.mark.slow
def test_hand_over_equals_a_run_compiled_from_the_start(caplog, monkeypatch):
    monkeypatch.setattr(warming, "PATIENCE_S", 0.0)  # compile from the first step on
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        optimizer, warmed = _run("auto", wait_after=1)
    assert optimizer.backend == "compiled" and optimizer.background
    text = caplog.text
    assert "compiled in the background" in text and "; later steps run it" in text
    _, compiled = _run("compiled")
    for w, c in zip(warmed, compiled):
        torch.testing.assert_close(w, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packages", ["off", "build"])
def test_the_first_step_of_auto_imports_no_compiler(tmp_path, packages):
    """Building a compiled callable imports Dynamo's and Inductor's compiler stack (half a
    second in a fresh process): a rule that answers eagerly must not pay that at its first
    step, nor does looking for its stored packages (and noting the calls that found none)."""
    script = (
        "import sys, torch, compiledopt as co\n"
        "m = torch.nn.Linear(4, 3)\n"
        "for p in m.parameters(): p.grad = torch.ones_like(p)\n"
        "before = set(sys.modules)\n"
        "opt = co.FrozenOptimizer(m.parameters(), backend='auto')\n"
        "opt.step()\n"
        "from compiledopt.runtime.package_builder import BUILDER\n"
        "noted = BUILDER.cancel()  # (no build after this test)\n"
        "new = sorted(n for n in set(sys.modules) - before if 'inductor' in n)\n"
        "print(opt.backend, noted > 0, new)\n"
    )
    env = {**os.environ, "COMPILEDOPT_CACHE": str(tmp_path), "COMPILEDOPT_PACKAGES": packages}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    noted = str(packages == "build")  # calls without a package are noted only when building
    assert done.stdout.split() == ["compiled", noted, "[]"], done.stdout + done.stderr


def _per_member(rule, grads, params, states, step, seeds, sides=None):
    """The reference: the rule called on each member, stacked."""
    out = []
    for j in range(grads.shape[0]):
        extra = () if sides is None else (sides[j],)
        out.append(rule(grads[j], params[j], [s[j] for s in states], step, seeds[j], *extra))
    return torch.stack([d for d, _ in out]), [torch.stack(c) for c in zip(*(s for _, s in out))]


@pytest.mark.parametrize("max_elements", [1, 5, 12, 20, 10_000])
@pytest.mark.parametrize("with_sides", [False, True])
def test_a_batched_rule_in_slices_equals_the_rule_per_member(max_elements, with_sides):
    def rule(grad, param, state, step, seed, *sides):
        scale = grad.square().mean().rsqrt() + (sides[0].sum() if sides else 0)
        return grad * scale - param * step, [0.9 * state[0] + grad, state[1] + seed]

    g = torch.Generator().manual_seed(0)
    grads, params = torch.randn(7, 2, 3, generator=g), torch.randn(7, 2, 3, generator=g)
    states = [torch.randn(7, 2, 3, generator=g), torch.randn(7, generator=g)]
    step, seeds = torch.tensor(3.0), torch.arange(7.0)
    sides = torch.randint(1, 4, (7, 2), generator=g) if with_sides else None
    extra = () if sides is None else (sides,)
    got = BatchedRule(rule, max_elements)(grads, params, states, step, seeds, *extra)
    want = _per_member(rule, grads, params, states, step, seeds, sides)
    torch.testing.assert_close(got[0], want[0])
    assert len(got[1]) == 2
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b)


def test_a_warming_rule_computes_eagerly_in_cache_sized_slices(monkeypatch):
    """While a compiled backend warms up, its eager rule takes the compiled backend's large
    buckets in slices of the eager backend's size (whole buckets would materialise the eager
    rule's intermediates for millions of elements)."""
    sizes = []
    update = co.learned.NormalizedMLP.update

    def spy(self, grad, *args):
        sizes.append(grad.numel())
        return update(self, grad, *args)

    monkeypatch.setattr(co.learned.NormalizedMLP, "update", spy)
    params = [torch.nn.Parameter(torch.randn(256, 200)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    co.FrozenOptimizer(params, "normalized-mlp", backend="auto").step()
    assert sizes == [256 * 200] * 4  # each matrix alone (the eager backend's slice holds one)


def test_compiling_nested_sets_and_restores_the_settings_once(monkeypatch):
    """A step enters the compiled backend's settings once around all its rule calls, each of
    which enters them again: only the outermost sets and restores them."""
    writes = []

    class Settings:
        def __setattr__(self, name, value):
            writes.append((name, value))
            object.__setattr__(self, name, value)

    settings = Settings()
    object.__setattr__(settings, "limit", 8)
    monkeypatch.setattr(compiled, "_SETTINGS", ((settings, "limit", 512),))
    with compiled.compiling():
        assert settings.limit == 512
        for _ in range(3):
            with compiled.compiling():
                assert settings.limit == 512
        assert settings.limit == 512
    assert settings.limit == 8
    assert writes == [("limit", 512), ("limit", 8)]
    with compiled.compiling():  # and a later step sets them again
        assert settings.limit == 512
    assert writes[2:] == [("limit", 512), ("limit", 8)]
