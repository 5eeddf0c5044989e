"""``torch.compile(optimizer.step)``, the recipe torch.optim users know, runs quietly: Dynamo
leaves the step (and torch.optim's hooks around it) to Python, with no warning, no recompile and
the same parameters as the plain step."""

import logging
import warnings

import torch
from torch import nn

import compiledopt as co

STEPS = 12  # more than Dynamo's recompile limit (8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _train(compile_step: bool):
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), lr=1e-2, backend="eager")
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    step = torch.compile(optimizer.step) if compile_step else optimizer.step
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        model(torch.randn(4, 8, generator=generator)).pow(2).mean().backward()
        step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], len(calls)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_compiled_step_is_quiet_and_equals_the_plain_step():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    records = _Records()  # torch's logger does not propagate to the root (nor to caplog)
    logging.getLogger("torch").addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, hooks = _train(compile_step=True)
    finally:
        logging.getLogger("torch").removeHandler(records)
    shown = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert shown == []
    assert records.messages == []  # e.g. "hit config.recompile_limit", "record_function ignored"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing traced
    assert hooks == STEPS  # torch.optim's step hooks still run
    want, _ = _train(compile_step=False)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_the_step_keeps_its_name_and_documentation():
    assert co.FrozenOptimizer.step.__name__ == "step"
    assert "closure" in co.FrozenOptimizer.step.__doc__
