"""Where a FrozenOptimizer runs: every backend runs where the parameters live or refuses at
construction, and ``auto`` orders the backends by the timings recorded on this machine."""

import json
import logging
import time

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.pretrained import open_artifact
from compiledopt.runtime import autotune, measure

PACKAGED = "normalized-mlp"


def _params(*shapes, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in shapes]


# The meta device stands in for an accelerator here: a tensor that is not on the CPU.
@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_exported_graphs_refuse_parameters_off_the_cpu(backend):
    params = [("layer.weight", p) for p in _params((4, 3), device="meta")]
    with pytest.raises(ValueError, match=rf"the {backend} backend .* 'layer.weight' is on meta"):
        co.FrozenOptimizer(params, PACKAGED, backend=backend)


def test_auto_skips_cpu_only_backends_for_parameters_elsewhere(caplog):
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        optimizer = co.FrozenOptimizer(_params((4, 3), device="meta"), PACKAGED)
    assert optimizer.backend == "compiled"
    for backend in ("eager", "compiled"):  # built-in backends take any device
        assert co.FrozenOptimizer(_params((4,), device="meta"), PACKAGED, backend=backend)


def test_eager_rules_are_built_on_the_parameters_device():
    optimizer = co.FrozenOptimizer(_params((4, 3), device="meta"), PACKAGED, backend="eager")
    rules = optimizer._schema_strategy.rules(torch.device("meta"))
    weights = list(rules.single.rule.transform.parameters())
    assert weights and all(w.device.type == "meta" for w in weights)
    cpu = optimizer._schema_strategy.rules(torch.device("cpu")).single.rule.transform
    assert all(w.device.type == "cpu" for w in cpu.parameters())


def test_measured_timings_order_auto(monkeypatch):
    artifact = open_artifact(PACKAGED, trust_code=False)
    params = _params((8, 4), *[(16,)] * 5)
    assert co.FrozenOptimizer(params, PACKAGED).backend == "compiled"  # nothing recorded

    def make(ps, art, backend):
        optimizer = co.FrozenOptimizer(ps, art, backend=backend)
        if backend == "eager":  # make eager the slowest: it must still come last
            step = optimizer.step
            optimizer.step = lambda: (time.sleep(0.02), step())
        return optimizer

    before = [p.detach().clone() for p in params]
    timings = measure.measure_backends(
        artifact, ["onnx", "torchscript", "eager"], params, reps=2, make_optimizer=make
    )
    # The caller's parameters and (absent) gradients are as they were.
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(params, before))
    assert set(timings) == {"onnx", "torchscript", "eager"}
    assert all(t > 0 for t in timings.values())
    elements = sum(p.numel() for p in params)
    order = autotune.measured_order(artifact, "cpu", elements=elements)
    fastest = min(("onnx", "torchscript"), key=timings.get)
    assert order[0] == fastest and order[-1] == "eager"
    assert co.FrozenOptimizer(params, PACKAGED).backend == fastest
    # Another thread count has its own recording (none here): the default order.
    assert autotune.measured_order(artifact, "cpu", 999, elements)[0] == "compiled"


def test_a_damaged_timing_cache_is_ignored_and_replaced():
    path = autotune.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    artifact = open_artifact(PACKAGED, trust_code=False)
    for damage in ("not json", "[1, 2]", json.dumps({"k": {"onnx": "fast"}})):
        path.write_text(damage)
        assert autotune.measured_order(artifact, "cpu")[0] == "compiled"
    measure.measure_backends(artifact, ["eager"], _params((3,)), reps=1)
    assert len(json.loads(path.read_text())) == 1


def test_measure_backends_refuses_bad_arguments():
    artifact = open_artifact(PACKAGED, trust_code=False)
    with pytest.raises(ValueError, match="reps"):
        measure.measure_backends(artifact, ["eager"], _params((3,)), reps=0)
    with pytest.raises(ValueError, match="at least one parameter"):
        measure.measure_backends(artifact, ["eager"], [], reps=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_cuda_step_matches_the_cpu_step(backend):
    shapes = [(64, 32), *[(32,)] * 6, (3, 4, 5)]
    cpu, cuda = _params(*shapes), _params(*shapes, device="cuda")
    optimizers = [co.FrozenOptimizer(ps, PACKAGED, backend=backend) for ps in (cpu, cuda)]
    for t in range(3):
        generator = torch.Generator().manual_seed(t)
        for p, q in zip(cpu, cuda):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.to("cuda")
        for optimizer in optimizers:
            optimizer.step()
    for p, q in zip(cpu, cuda):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)
    assert co.FrozenOptimizer(_params((4,), device="cuda"), PACKAGED).backend == "compiled"
