"""The one meta-training loop reproduces runs recorded with the two trainers it replaced
(truncated back-propagation, PES, truncated ES, one-sided PES, routed rules): bit for bit on the
kind of machine they were recorded on, and within float32 rounding on any other.

``data/meta_recorded_runs.json`` holds each run's settings (under today's names), its meta-loss
per step, its held-out evaluations and its final weights, as the earlier code produced them, and
the CPU they were recorded on. Another CPU's vector kernels round differently (measured on an AMD
EPYC: losses within 3e-7 relative; the ES gradient estimates, differences of nearby losses
divided by a small perturbation, amplify that to 1% of their norms and 0.6% of the largest
final weight)."""

import json
import os
from typing import List

import pytest
import torch

from benchmarks.step_speed.runner import cpu_identity
from compiledopt.learned.catalog import build_transform
from compiledopt.meta import MetaConfig, MetaLoop
from compiledopt.tasks.regression import RegressionFamily

with open(os.path.join(os.path.dirname(__file__), "data", "meta_recorded_runs.json")) as _file:
    _DATA = json.load(_file)
RECORDED = _DATA["runs"]


#: Whether this is the kind of machine the runs were recorded on (then every value is exact).
SAME_MACHINE = dict(zip(("cpu", "flags"), cpu_identity())) == _DATA["recorded_on"]


def _check(got: List[float], want: List[float], rtol: float, what: str) -> None:
    if SAME_MACHINE:
        assert got == want, what
        return
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=rtol,
        atol=rtol * max(map(abs, want), default=0.0),
        msg=lambda message: f"{what}: {message}",
    )


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_loop_reproduces_the_recorded_run(name: str) -> None:
    run = RECORDED[name]
    settings = dict(run["settings"])
    transform_name = settings.pop("transform")
    family_seed = settings.pop("family_seed", settings["seed"])
    torch.manual_seed(0)
    transform = build_transform(transform_name, {})
    loop = MetaLoop(transform, RegressionFamily(seed=family_seed), MetaConfig(**settings))
    result = loop.train(progress=False)
    weights = torch.cat([p.detach().reshape(-1).double() for p in transform.parameters()])
    _check([r["loss"] for r in result.history], run["losses"], 1e-5, "meta-losses")
    _check([r["grad_norm"] for r in result.history], run["grad_norms"], 5e-2, "gradient norms")
    _check(weights.tolist(), run["weights"], 5e-2, "final weights")
    # The loop also evaluates before the first step; every recorded evaluation is reproduced.
    evaluations = {r["step"]: r["final_loss"] for r in result.evaluations}
    assert {step for step, _ in run["evaluations"]} <= set(evaluations)
    _check(
        [evaluations[step] for step, _ in run["evaluations"]],
        [loss for _, loss in run["evaluations"]],
        1e-5,
        "held-out evaluations",
    )
