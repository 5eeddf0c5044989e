"""The one meta-training loop reproduces, bit for bit, runs recorded with the two trainers it
replaced (truncated back-propagation, PES, truncated ES, one-sided PES, routed rules).

``data/meta_recorded_runs.json`` holds each run's settings (under today's names), its meta-loss
per step, its held-out evaluations and its final weights, as the earlier code produced them."""

import json
import os

import pytest
import torch

from compiledopt.learned.catalog import build_transform
from compiledopt.meta import MetaConfig, MetaLoop
from compiledopt.tasks.regression import RegressionFamily

RECORDED = json.load(
    open(os.path.join(os.path.dirname(__file__), "data", "meta_recorded_runs.json"))
)["runs"]


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
    assert [r["loss"] for r in result.history] == run["losses"]
    assert [r["grad_norm"] for r in result.history] == run["grad_norms"]
    assert weights.tolist() == run["weights"]
    # The loop also evaluates before the first step; every recorded evaluation is reproduced.
    evaluations = {r["step"]: r["final_loss"] for r in result.evaluations}
    assert {step: evaluations[step] for step, _ in run["evaluations"]} == dict(
        (step, loss) for step, loss in run["evaluations"]
    )
