"""One backend registry, read when it is used: an export backend registered after import is known
everywhere from then on, and forgotten once unregistered.

A toy backend (TorchScript files under another name and extension, counting its saves and loads)
is registered through the public ``compiledopt.export.register`` after the package is imported,
and is then

* listed by ``compiledopt.export.BACKENDS`` and the runtime's backends;
* exported to by ``export_shape_agnostic`` and loaded by ``FrozenOptimizer(backend=...)``, whose
  steps match the eager backend's;
* a candidate of ``backend="auto"``: in its default order, timed by ``measure_backends`` and
  chosen when its recorded timing is the fastest;
* listed by the benchmark's ``available_backends``;

and ``unregister`` takes it out of every one of those lists again.
"""

import json

import pytest
import torch
from torch import nn

import compiledopt.export
from compiledopt import FrozenOptimizer, bench
from compiledopt.export import (
    Backend,
    build_shape_agnostic,
    export_shape_agnostic,
    load_artifact,
    torchscript,
)
from compiledopt.runtime import autotune, measure
from compiledopt.runtime.backends import runtime_backends
from compiledopt.runtime.choice import auto_order

SPEC = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
NAME = "toyscript"


class _Toy(Backend):
    """TorchScript under another name and extension, counting what it saves and loads."""

    name = NAME
    extension = ".toy"
    per_rank = False
    carries_code = True

    def __init__(self) -> None:
        self.saved = 0
        self.loaded = 0

    def save(self, rule, example, path, dynamic) -> None:
        self.saved += 1
        torchscript.BACKEND.save(rule, example, path, dynamic)

    def load(self, path):
        self.loaded += 1
        return torchscript.BACKEND.load(path)


@pytest.fixture
def toy():
    """The toy backend, registered after import and unregistered after the test."""
    backend = compiledopt.export.register(_Toy())
    try:
        yield backend
    finally:
        compiledopt.export.unregister(NAME)


@pytest.fixture
def artifact(toy, tmp_path):
    """A small shape-agnostic artifact with toy graphs only, loaded trusting its code."""
    torch.manual_seed(0)
    transform = build_shape_agnostic(SPEC)
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    path = export_shape_agnostic(tmp_path / "toy-artifact", SPEC, transform, backends=[NAME])
    return load_artifact(path, trust_code=True)


def _params():
    generator = torch.Generator().manual_seed(3)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(6, 5), (5,), (3,)]]


def _run(artifact, backend, steps=4):
    params = _params()
    optimizer = FrozenOptimizer(params, artifact, backend=backend, lr=0.01)
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer, params


def test_a_backend_registered_after_import_is_listed_until_unregistered():
    assert NAME not in compiledopt.export.BACKENDS
    backend = compiledopt.export.register(_Toy())
    try:
        assert compiledopt.export.BACKENDS[-1] == NAME
        assert runtime_backends()[-1] == NAME
        assert compiledopt.export.backend.get(NAME) is backend
    finally:
        assert compiledopt.export.unregister(NAME) is backend
    assert NAME not in compiledopt.export.BACKENDS and NAME not in runtime_backends()
    with pytest.raises(ValueError, match="Unknown backend"):
        compiledopt.export.unregister(NAME)


def test_frozen_optimizer_steps_on_a_backend_registered_after_import(toy, artifact):
    assert list(artifact.backends) == [NAME]
    assert toy.saved == 1  # one graph serves every rank
    optimizer, params = _run(artifact, NAME)
    assert optimizer.backend == NAME and toy.loaded >= 1
    _, reference = _run(artifact, "eager")
    for p, q, initial in zip(params, reference, _params()):
        assert not torch.equal(p, initial)  # the steps moved it
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_an_unregistered_backend_is_refused(toy, artifact):
    assert FrozenOptimizer(_params(), artifact, backend=NAME).backend == NAME
    compiledopt.export.unregister(NAME)
    try:
        with pytest.raises(ValueError, match=f"Invalid backend: '{NAME}'"):
            FrozenOptimizer(_params(), artifact, backend=NAME)
    finally:
        compiledopt.export.register(toy)


def test_auto_tries_a_backend_registered_after_import(toy, artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(tmp_path / "cache"))
    order = autotune.default_order()
    assert NAME in order and order[-1] == "eager"
    assert NAME in auto_order(artifact, torch.device("cpu"))[:-1]
    # measure_backends times it, and its recorded timing orders auto's candidates.
    params = _params()
    timings = measure.measure_backends(artifact, [NAME, "eager"], params, reps=1)
    assert set(timings) == {NAME, "eager"}
    elements = sum(p.numel() for p in params)
    key = autotune._key(artifact, torch.device("cpu"), torch.get_num_threads(), elements)
    autotune.cache_file().write_text(json.dumps({key: {NAME: 0.0, "compiled": 1.0}}))
    assert auto_order(artifact, torch.device("cpu"), elements)[0] == NAME
    assert FrozenOptimizer(params, artifact, backend="auto").backend == NAME


def test_bench_lists_a_backend_registered_after_import(toy, artifact):
    assert bench.available_backends(artifact) == ["eager", "compiled", NAME]
    compiledopt.export.unregister(NAME)
    try:
        assert bench.available_backends(artifact) == ["eager", "compiled"]
    finally:
        compiledopt.export.register(toy)
