"""Evolution-strategies meta-training: the estimators against the exact gradient of a short
quadratic unroll, antithetic variance, the vectorized population against a loop, checkpoints."""

import math
from typing import Dict

import pytest
import torch
from torch import Tensor, nn

from compiledopt.learned.catalog import build_transform
from compiledopt.learned.step_sizes import LearnedStepSize
from compiledopt.meta import MetaConfig, MetaLoop
from compiledopt.meta.population import Population, flat_weights, loop_step
from compiledopt.schedules import warmup_cosine
from compiledopt.tasks.base import Batch, Task, TaskFamily
from compiledopt.tasks.regression import RegressionFamily

CURVATURE = torch.tensor([0.5, 1.0, 2.0, 4.0])


class _Point(nn.Module):
    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(start.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.w


class QuadraticTask(Task):
    """``½ Σ aᵢ wᵢ²`` from a seeded start: a deterministic loss with a closed form."""

    def __init__(self, seed: int) -> None:
        start = torch.randn(4, generator=torch.Generator().manual_seed(seed)) + 2.0
        super().__init__(seed, _Point(start))

    def batch(self, step: int) -> Batch:
        return torch.zeros(1), torch.zeros(1)

    def evaluation_batch(self) -> Batch:
        return self.batch(0)

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (CURVATURE * output**2).sum()


class QuadraticFamily(TaskFamily):
    name = "quadratic"

    def make(self, seed: int) -> Task:
        return QuadraticTask(seed)


def _config(**overrides) -> MetaConfig:
    values = dict(
        estimator="pes",
        unroll=5,
        min_horizon=10,
        horizon=10,
        pairs=4000,
        tasks_per_step=1,
        sigma=0.01,
        inner_lr=0.3,
        warmup_fraction=0.0,
        eval_every=0,
        checkpoint_every=0,
    )
    values.update(overrides)
    return MetaConfig(**values)


def _exact(log_lr: float, task: Task, truncations: int, lr: float, unroll: int, full: bool):
    """d/dθ of Σ over truncations of the truncation's mean log loss, by float64 autograd.

    ``full``: differentiate through the whole unroll (what PES estimates); otherwise each
    truncation starts from a detached state (what truncated ES estimates)."""
    theta = torch.tensor(log_lr, dtype=torch.float64, requires_grad=True)
    w = task.init_params()["w"].double()
    curvature = CURVATURE.double()
    total = torch.zeros((), dtype=torch.float64)
    step = 0
    for _ in range(truncations):
        if not full:
            w = w.detach()
        values = []
        for _ in range(5):
            values.append(torch.log(0.5 * (curvature * w**2).sum()))
            w = w - lr * warmup_cosine(step, unroll, 0.0) * torch.exp(theta) * curvature * w
            step += 1
        total = total + torch.stack(values).mean()
    (gradient,) = torch.autograd.grad(total, theta)
    return float(gradient)


def _estimate(loop: MetaLoop) -> float:
    """One truncation's estimate of the (single) weight's meta-gradient."""
    estimate = loop.estimate()
    assert estimate.tasks == 1 and estimate.skipped == 0
    grad = loop.estimator.theta.grad
    assert grad is not None and grad is loop.estimator.weights[0].grad
    return float(grad[0])


@pytest.mark.parametrize("estimator", ["pes", "es"])
def test_estimator_matches_the_exact_gradient_of_the_unroll(estimator: str) -> None:
    log_lr = math.log(0.5)
    loop = MetaLoop(LearnedStepSize(step_size=0.5), QuadraticFamily(), _config(estimator=estimator))
    estimates = [_estimate(loop) for _ in range(2)]  # the two truncations
    task = loop.slots[0].task
    # PES sums to the gradient of the whole unroll; truncated ES to the truncated gradients.
    exact = _exact(log_lr, task, 2, 0.3, 10, full=estimator == "pes")
    other = _exact(log_lr, task, 2, 0.3, 10, full=estimator != "pes")
    assert abs(exact - other) > 0.3 * abs(exact)  # the two targets are distinguishable
    # 4000 antithetic pairs: relative standard error ≈ sqrt(2/4000) ≈ 2.2 %; bound at ~5 σ.
    assert sum(estimates) == pytest.approx(exact, rel=0.12)


def test_antithetic_pairs_reduce_the_variance() -> None:
    def spread(antithetic: bool) -> float:
        values = []
        for seed in range(12):
            config = _config(pairs=16, antithetic=antithetic, min_horizon=5, horizon=5, seed=seed)
            loop = MetaLoop(LearnedStepSize(step_size=0.5), QuadraticFamily(), config)
            values.append(_estimate(loop))
        return float(torch.tensor(values).std())

    assert spread(True) * 5 < spread(False)


def test_the_vectorized_population_equals_a_loop() -> None:
    family = RegressionFamily(seed=3)
    transform = build_transform("coordinate-mlp", {"hidden_sizes": [8]})
    task = family.sample(0)
    population = Population(transform, task, 3)
    params, states = population.init()
    base = flat_weights(transform)
    weights = base + 0.05 * torch.randn(3, base.numel(), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        fast = population.step(weights, params, states, step, 0.1)
        slow = loop_step(transform, task, weights, params, states, step, 0.1)
        torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-7)
        for name in params:
            torch.testing.assert_close(fast[1][name], slow[1][name], rtol=1e-5, atol=1e-7)
            for a, b in zip(fast[2][name], slow[2][name]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        params, states = fast[1], fast[2]
    assert not torch.equal(params[next(iter(params))][0], params[next(iter(params))][1])


def _small_run(estimator: str = "pes", **overrides) -> MetaConfig:
    values = dict(
        estimator=estimator,
        meta_steps=4,
        unroll=3,
        min_horizon=6,
        horizon=12,
        pairs=2,
        tasks_per_step=2,
        sigma=0.05,
        inner_lr=0.05,
        eval_every=2,
        eval_tasks=1,
        eval_steps=4,
        checkpoint_every=2,
    )
    values.update(overrides)
    return MetaConfig(**values)


def _weights(loop: MetaLoop) -> Dict[str, Tensor]:
    return {n: w.detach().clone() for n, w in loop.transform.named_parameters()}


@pytest.mark.parametrize("estimator", ["pes", "es"])
def test_a_run_moves_the_weights_and_resumes_exactly(estimator: str, tmp_path) -> None:
    family = RegressionFamily(seed=1)
    make = lambda: build_transform("coordinate-mlp", {"hidden_sizes": [4]})  # noqa: E731
    torch.manual_seed(0)
    straight_loop = MetaLoop(make(), family, _small_run(estimator))
    straight = straight_loop.train(progress=False)
    torch.manual_seed(0)
    first = MetaLoop(make(), family, _small_run(estimator, meta_steps=2))
    start = _weights(first)
    first.train(checkpoint=str(tmp_path / "run.pt"), progress=False)
    assert any(not torch.equal(start[n], w) for n, w in _weights(first).items())
    torch.manual_seed(123)  # the resumed run must not depend on the global generator
    resumed = MetaLoop(make(), family, _small_run(estimator))
    with pytest.raises(ValueError, match=r"checkpoint config differs.*sigma 0\.05 -> 0\.1"):
        MetaLoop(make(), family, _small_run(estimator, sigma=0.1)).load(str(tmp_path / "run.pt"))
    resumed.load(str(tmp_path / "run.pt"))
    result = resumed.train(progress=False)
    for name, value in _weights(straight_loop).items():
        torch.testing.assert_close(_weights(resumed)[name], value, rtol=0, atol=0)
    assert [r["loss"] for r in result.history] == [r["loss"] for r in straight.history]
    assert result.meta_step == straight.meta_step == 4
    assert [e["step"] for e in straight.evaluations] == [0, 2, 4]
    assert math.isfinite(straight.evaluations[-1]["final_loss"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"estimator": "reinforce"}, "estimator"),
        ({"objective": "test"}, "objective"),
        ({"pairs": 0}, "pairs"),
        ({"sigma": -1.0}, "sigma"),
        ({"min_horizon": 50, "horizon": 20}, "Invalid min_horizon: 50"),
        ({"unroll": 30, "horizon": 20, "min_horizon": 10}, "Invalid horizon: 20"),
        ({"antithetic": 1}, "antithetic"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
    ],
)
def test_bad_settings_are_refused_by_name(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        _small_run(**overrides).validate()


def test_unknown_settings_in_a_config_are_named() -> None:
    with pytest.raises(ValueError, match="sigmma"):
        MetaConfig.from_dict({"sigmma": 0.1})


def _cli_train(argv, capsys=None):
    from compiledopt import cli

    return cli.main(["train", *argv])


ES_ARGS = [
    "--estimator", "pes", "--transform", "coordinate-mlp",
    "--transform-kwargs", '{"hidden_sizes": [4]}', "--family", "regression",
    "--meta-steps", "3", "--unroll", "2", "--horizon", "4", "--min-horizon", "2",
    "--pairs", "2", "--tasks-per-step", "2", "--inner-lr", "0.05", "--eval-every", "0",
    "--no-progress",
]  # fmt: skip


def test_cli_two_processes_train_exactly_what_one_does(tmp_path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert _cli_train([*ES_ARGS, "--output", str(one)]) == 0
    assert _cli_train([*ES_ARGS, "--output", str(two), "--processes", "2"]) == 0
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert b["world"] == 2 and (tmp_path / "two.pt.rank1").exists()
    assert a["transform"].keys() == b["transform"].keys()
    for name, value in a["transform"].items():
        torch.testing.assert_close(value, b["transform"][name], rtol=0, atol=1e-6)
    assert any(value.any() for value in a["transform"].values())
    assert a["metadata"]["training"]["estimator"] == "pes"


def test_cli_config_file_sets_defaults_and_the_command_line_wins(tmp_path, capsys) -> None:
    import json

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"estimator": "es", "meta_steps": 2, "sigma": 0.2}))
    out = tmp_path / "run.pt"
    argv = [*ES_ARGS, "--config", str(config), "--output", str(out)]
    argv[argv.index("--meta-steps") + 1] = "1"
    argv.remove("--estimator"), argv.remove("pes")
    assert _cli_train(argv) == 0
    state = torch.load(out, weights_only=True)
    assert state["config"]["estimator"] == "es" and state["config"]["sigma"] == 0.2
    assert state["meta_step"] == 1  # --meta-steps 1 beat the file's 2
    config.write_text(json.dumps({"sigmma": 0.2}))
    assert _cli_train([*ES_ARGS, "--config", str(config), "--output", str(out)]) == 2
    assert "sigmma" in capsys.readouterr().err


def test_cli_exports_the_result_with_its_training_record(tmp_path) -> None:
    from compiledopt.export import load_artifact

    artifact = tmp_path / "artifact"
    argv = [*ES_ARGS, "--output", str(tmp_path / "run.pt"), "--export", str(artifact)]
    argv += ["--export-backends", "torchscript", "--export-lr", "0.003"]
    assert _cli_train(argv) == 0
    loaded = load_artifact(artifact)
    assert loaded.manifest["lr"] == 0.003 and loaded.backends == ["torchscript"]
    training = loaded.training
    assert training["estimator"] == "pes" and training["meta_steps"] == 3
    assert training["lr"] == 0.003 and training["cpu_time_s"] > 0


def test_unflatten_handles_scalar_weights() -> None:
    from compiledopt.learned.catalog import build_transform
    from compiledopt.meta.population import flat_weights, set_weights, unflatten

    transform = build_transform("learned-step-size", {})
    assert any(w.dim() == 0 for w in transform.parameters())
    flat = flat_weights(transform) + 1.0
    named = unflatten(transform, flat)
    assert all(named[n].shape == w.shape for n, w in transform.named_parameters())
    assert unflatten(transform, flat.expand(3, -1))[next(iter(named))].shape[0] == 3
    set_weights(transform, flat)
    assert torch.equal(flat_weights(transform), flat)
