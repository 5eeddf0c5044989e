"""The estimator recipe holds: an estimator written outside the package — one class, registered
by name — is run by the one loop with checkpoints and exact resume, and its settings are checked.

The toy estimator is central finite differences of the first task's loss after ``unroll`` plain
steps ``p <- p - lr * direction``, weight by weight: slow, exact to O(h²), and independent of
autograd through the unroll, so it also checks the loop's bookkeeping against a readable
reference."""

from typing import Any, ClassVar, Dict, Sequence

import pytest
import torch
from models import ScalarScale

from compiledopt.meta import ESTIMATORS, Estimate, Estimator, MetaConfig, MetaLoop, Slot
from compiledopt.meta.estimator import register_estimator
from compiledopt.meta.inner import apply_transform, init_states
from compiledopt.tasks import RegressionFamily


class FiniteDifferences(Estimator):
    DEFAULTS: ClassVar[Dict[str, Any]] = {
        "meta_steps": 3,
        "unroll": 2,
        "horizon": 4,
        "inner_lr": 1.0,
        "eval_every": 0,
        "eval_steps": 3,
        "checkpoint_every": 0,
    }

    def start(self, slot: Slot, fresh: bool) -> None:
        assert slot.task is not None
        if fresh:
            slot.params = slot.task.init_params()
            slot.states = init_states(self.transform, slot.params)

    def _loss_after(self, slot: Slot) -> float:
        params, states = slot.params, slot.states
        task = slot.task
        with torch.enable_grad():
            for k in range(self.config.unroll):
                live = {n: v.detach().requires_grad_() for n, v in params.items()}
                loss = task.loss(live, task.batch(slot.inner_step + k))
                grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
                params, states = apply_transform(
                    self.transform, live, grads, states, slot.inner_step + k, self.config.inner_lr
                )
        return float(task.loss(params, task.batch(slot.inner_step + self.config.unroll)))

    @torch.no_grad()
    def estimate(self, slots: Sequence[Slot]) -> Estimate:
        total = 0.0
        for slot in slots:
            for weight in self.weights:
                grad = torch.zeros_like(weight)
                for i in range(weight.numel()):
                    flat = weight.view(-1)
                    saved = float(flat[i])
                    flat[i] = saved + 1e-3
                    up = self._loss_after(slot)
                    flat[i] = saved - 1e-3
                    down = self._loss_after(slot)
                    flat[i] = saved
                    grad.view(-1)[i] = (up - down) / 2e-3 / len(slots)
                weight.grad = grad if weight.grad is None else weight.grad + grad
            total += self._loss_after(slot)
            slot.inner_step += self.config.unroll
        return Estimate(total, len(slots), 0)

    def evaluate(self) -> Dict[str, float]:
        return {"final_loss": 0.0}


@pytest.fixture
def toy_estimator():
    register_estimator("finite-differences")(FiniteDifferences)
    yield "finite-differences"
    del ESTIMATORS["finite-differences"]


def _loop(estimator: str, **overrides) -> MetaLoop:
    transform = ScalarScale(log_scale=-2.0, dtype=torch.float32)
    config = MetaConfig(estimator, tasks_per_step=2, meta_lr=0.05, **overrides)
    return MetaLoop(transform, RegressionFamily(seed=1), config)


def test_a_registered_estimator_runs_in_the_loop_and_resumes_exactly(toy_estimator, tmp_path):
    full = _loop(toy_estimator, meta_steps=4)
    result = full.train(progress=False)
    assert full.config.unroll == 2 and full.config.horizon == 4  # its DEFAULTS filled in
    assert [r["applied"] for r in result.history] == [1.0] * 4
    assert full.transform.log_scale.item() != -2.0

    first = _loop(toy_estimator, meta_steps=2)
    first.train(checkpoint=str(tmp_path / "run.pt"), progress=False)
    resumed = _loop(toy_estimator, meta_steps=4)
    resumed.load(str(tmp_path / "run.pt"))
    assert resumed.train(progress=False).history == result.history
    assert torch.equal(resumed.transform.log_scale, full.transform.log_scale)


def test_its_gradient_is_the_one_the_loop_applies(toy_estimator):
    """Adam's first step from zero moments moves each weight by lr * sign(gradient)."""
    loop = _loop(toy_estimator, meta_steps=1, clip_norm=1e9)
    before = loop.transform.log_scale.item()
    loop.step()
    gradient = float(loop.transform.log_scale.grad)  # what the estimator left there
    assert abs(gradient) > 1e-4
    moved = loop.transform.log_scale.item() - before
    assert moved == pytest.approx(-0.05 * (1.0 if gradient > 0 else -1.0), rel=1e-4)


def test_settings_the_estimator_does_not_read_are_refused(toy_estimator):
    with pytest.raises(ValueError, match=r"Invalid pairs: 4 .*read by the pes, es estimator"):
        MetaConfig(toy_estimator, pairs=4).validate()
    with pytest.raises(ValueError, match="already registered"):
        register_estimator(toy_estimator)(FiniteDifferences)
    with pytest.raises(ValueError, match="Invalid estimator: 'nope'"):
        MetaConfig("nope").validate()
