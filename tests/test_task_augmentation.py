"""Task augmentation changes what an optimizer sees (parameter, gradient and loss scales) but not
the task's function: checked against the original task with autograd."""

import math

import pytest
import torch

from compiledopt.tasks import RegressionFamily
from compiledopt.tasks.augment import AugmentedFamily, AugmentedTask


@pytest.fixture()
def task():
    return RegressionFamily(seed=3).sample(1)


def _grads(task, params, batch):
    live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    loss = task.loss(live, batch)
    return loss, dict(zip(live, torch.autograd.grad(loss, list(live.values()))))


def test_same_function_other_scales(task):
    scales = {name: 4.0 ** (i - 1) for i, (name, _) in enumerate(task.model.named_parameters())}
    augmented = AugmentedTask(task, scales, loss_scale=0.25)
    batch = task.batch(0)
    start = augmented.init_params()
    # The augmented initial point is the original network, seen through other scales.
    for name, value in task.init_params().items():
        torch.testing.assert_close(start[name] * scales[name], value)
        assert not torch.equal(start[name], value) or scales[name] == 1.0
    loss, grads = _grads(augmented, start, batch)
    reference, reference_grads = _grads(task, augmented.original(start), batch)
    torch.testing.assert_close(loss, 0.25 * reference)
    torch.testing.assert_close(augmented.unscaled_loss(start, batch), reference)
    for name, grad in grads.items():  # chain rule: d(sL(c p'))/dp' = s c dL/dp
        torch.testing.assert_close(grad, 0.25 * scales[name] * reference_grads[name])


def test_a_step_on_the_augmented_task_is_a_preconditioned_step_on_the_original(task):
    # SGD with lr on p' equals SGD on p with per-tensor lr * s * c²: same trajectory of networks.
    scales = {name: 3.0 for name, _ in task.model.named_parameters()}
    augmented = AugmentedTask(task, scales, loss_scale=2.0)
    lr, batch = 1e-3, task.batch(0)
    start = augmented.init_params()
    _, grads = _grads(augmented, start, batch)
    stepped = augmented.original({n: p - lr * grads[n] for n, p in start.items()})
    original = task.init_params()
    _, original_grads = _grads(task, original, batch)
    expected = {n: p - lr * 2.0 * 9.0 * original_grads[n] for n, p in original.items()}
    for name in expected:
        torch.testing.assert_close(stepped[name], expected[name])


def test_family_augments_training_tasks_deterministically():
    family = AugmentedFamily(RegressionFamily(seed=0), max_param_scale=8.0, max_loss_scale=2.0)
    first, again = family.sample(5), family.sample(5)
    assert isinstance(first, AugmentedTask)
    assert first.scales == again.scales and first.loss_scale == again.loss_scale
    assert all(1 / 8 <= c <= 8 for c in first.scales.values())
    assert 0.5 <= first.loss_scale <= 2.0
    assert len(set(first.scales.values())) > 1  # one draw per tensor
    assert first.scales != family.sample(6).scales
    heldout = family.sample(5, "heldout")
    assert not isinstance(heldout, AugmentedTask)  # evaluation measures the original tasks
    assert isinstance(
        AugmentedFamily(RegressionFamily(), augment_heldout=True).sample(0, "heldout"),
        AugmentedTask,
    )


def test_scales_are_log_uniform():
    family = AugmentedFamily(RegressionFamily(seed=1), max_param_scale=100.0, max_loss_scale=1.0)
    logs = [math.log10(c) for i in range(200) for c in family.sample(i).scales.values()]
    assert -2.0 <= min(logs) < -1.5 and 1.5 < max(logs) <= 2.0
    assert abs(sum(logs) / len(logs)) < 0.15
    assert all(family.sample(i).loss_scale == 1.0 for i in range(5))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "2", True])
def test_bad_scales_are_refused(task, bad):
    name = next(iter(dict(task.model.named_parameters())))
    with pytest.raises(ValueError, match="scale of parameter"):
        AugmentedTask(task, {name: bad})
    with pytest.raises(ValueError, match="Invalid loss_scale"):
        AugmentedTask(task, {}, loss_scale=bad)


def test_unknown_names_and_ranges_are_refused(task):
    with pytest.raises(ValueError, match=r"no parameter of the task: \['nope'\]"):
        AugmentedTask(task, {"nope": 2.0})
    with pytest.raises(ValueError, match=r"Invalid max_param_scale: 0\.5"):
        AugmentedFamily(RegressionFamily(), max_param_scale=0.5)
    with pytest.raises(TypeError, match="wraps a TaskFamily"):
        AugmentedFamily(task)
