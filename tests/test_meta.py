"""Meta-training by truncated back-propagation: exact meta-gradients, exact resume, non-finite
handling, distributed parity."""

import math
import os

import pytest
import torch
from models import ScalarScale
from torch import nn

import compiledopt as co
from compiledopt.meta import MetaConfig, MetaLoop
from compiledopt.tasks import FAMILIES, RegressionFamily, get_family

SMALL = dict(unroll=3, horizon=6, tasks_per_step=2, meta_lr=0.05, eval_every=0)


def _trainer(steps=4, log_scale=-2.0, **overrides):
    config = MetaConfig(meta_steps=steps, **{**SMALL, **overrides})
    transform = ScalarScale(log_scale=log_scale, dtype=torch.float32)
    return MetaLoop(transform, RegressionFamily(seed=1), config), transform


def _reference(log_scale: float):
    """The first meta-step's meta-loss and its first-order meta-gradient, by a readable loop.

    With the inner gradients treated as constants, θ_k = θ_0 − e^φ Σ_{j<k} g_j, so
    d/dφ L(θ_k) = ∇L(θ_k) · (−e^φ Σ_{j<k} g_j), averaged over k = 1..K and over the tasks."""
    fresh, _ = _trainer(log_scale=log_scale)
    scale = math.exp(log_scale)
    total_loss = total_grad = 0.0
    for slot in fresh.slots:
        task = fresh.family.sample(slot.slot_id, "train")  # each slot's first task
        params = task.init_params()
        past = {n: torch.zeros_like(v) for n, v in params.items()}
        losses, derivatives = [], []
        for k in range(4):
            live = {n: v.detach().requires_grad_() for n, v in params.items()}
            loss = task.loss(live, task.batch(k))
            grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
            if k:
                losses.append(loss.item())
                derivatives.append(sum((grads[n] * -scale * past[n]).sum().item() for n in grads))
            for n in grads:
                past[n] += grads[n]
            params = {n: live[n].detach() - scale * grads[n] for n in live}
        total_loss += sum(losses) / 3
        total_grad += sum(derivatives) / 3
    return total_loss / len(fresh.slots), total_grad / len(fresh.slots)


def _first_meta_gradient(second_order: bool, log_scale: float = -2.0) -> float:
    loop, transform = _trainer(log_scale=log_scale, second_order=second_order)
    estimate = loop.estimate()
    assert estimate.tasks == len(loop.slots) and estimate.skipped == 0
    assert torch.equal(transform.log_scale, torch.tensor(-2.0))  # estimating does not step
    return transform.log_scale.grad.item()


def test_first_order_meta_gradient_matches_reference():
    _, expected = _reference(-2.0)
    assert abs(expected) > 1e-4
    assert _first_meta_gradient(False) == pytest.approx(expected, rel=1e-4)


def test_second_order_meta_gradient_matches_finite_differences():
    eps = 1e-2
    numeric = (_reference(-2.0 + eps)[0] - _reference(-2.0 - eps)[0]) / (2 * eps)
    assert _first_meta_gradient(True) == pytest.approx(numeric, rel=2e-3)


def test_meta_training_lowers_the_meta_loss():
    trainer, transform = _trainer(steps=15, log_scale=-4.0, meta_lr=0.2)
    result = trainer.train(progress=False)
    assert transform.log_scale.item() > -3.5  # a step size of e^-4 is far too small here
    assert result.skipped_tasks == 0 and result.skipped_steps == 0
    assert len(result.history) == 15


def test_exact_resume(tmp_path):
    full, full_transform = _trainer(steps=6, eval_every=2, eval_tasks=1, eval_steps=3)
    full.train(progress=False)

    first, _ = _trainer(steps=3, eval_every=2, eval_tasks=1, eval_steps=3)
    first.train(checkpoint=str(tmp_path / "run.pt"), progress=False)
    resumed, resumed_transform = _trainer(steps=6, eval_every=2, eval_tasks=1, eval_steps=3)
    resumed.load(str(tmp_path / "run.pt"))
    result = resumed.train(progress=False)

    assert torch.equal(full_transform.log_scale, resumed_transform.log_scale)
    assert result.history == full.history
    assert result.evaluations == full.evaluations
    for a, b in zip(full.slots, resumed.slots):
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name])


def test_checkpoint_refuses_a_different_run(tmp_path):
    trainer, _ = _trainer(steps=1)
    trainer.train(checkpoint=str(tmp_path / "run.pt"), progress=False)
    other = MetaLoop(
        ScalarScale(dtype=torch.float32),
        RegressionFamily(seed=2),
        MetaConfig(meta_steps=2, **SMALL),
    )
    with pytest.raises(ValueError, match=r"checkpoint family .* differs"):
        other.load(str(tmp_path / "run.pt"))
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    state["format"] = 99
    with pytest.raises(ValueError, match="unknown checkpoint format 99"):
        trainer.load_state_dict(state)


def test_non_finite_meta_loss_is_skipped_and_counted():
    trainer, transform = _trainer(steps=2, log_scale=200.0)  # e^200 overflows: inf updates
    result = trainer.train(progress=False)
    assert result.skipped_tasks == 4
    assert transform.log_scale.item() == 200.0  # never touched by a non-finite value
    assert all(math.isnan(record["loss"]) for record in result.history)
    assert [record["applied"] for record in result.history] == [0.0, 0.0]


def test_shape_bound_transforms_are_refused():
    family = RegressionFamily()
    with pytest.raises(TypeError, match="KroneckerTransform"):
        MetaLoop(co.optim.KroneckerTransform(co.nn.KroneckerLinear), family)
    with pytest.raises(ValueError, match="MetaCurvatureTransform is bound to one parameter shape"):
        MetaLoop(co.optim.MetaCurvatureTransform(torch.zeros(3)), family)
    with pytest.raises(TypeError, match="TaskFamily"):
        MetaLoop(ScalarScale(), "regression")


@pytest.mark.parametrize(
    "field, value",
    [
        ("meta_steps", 0),
        ("unroll", -1),
        ("inner_lr", math.nan),
        ("clip_norm", 0.0),
        ("horizon", 7),
        ("eval_every", -1),
        ("tasks_per_step", 1.5),
    ],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}: {value}"):
        MetaConfig(**{field: value}).validate()


def test_task_parameter_without_gradient():
    loop, _ = _trainer(steps=1)
    slot = loop.slots[0]
    loop.estimate()  # every slot gets its first task
    slot.task.model.register_parameter("unused", nn.Parameter(torch.zeros(2)))
    slot.params = slot.task.init_params()
    slot.states = {n: [] for n in slot.params}
    with pytest.raises(ValueError, match=r"'unused' .* gets no gradient"):
        loop.estimate()


# The loss 100 Adam steps must reach, as a fraction of the initial one: a language model starts
# near ln(vocabulary) and its entropy floor is far above 0, so it cannot halve its loss that fast
# (text-lm: 15.8 -> 10.7 at the evaluation scale).
LEARNABLE = {"text-lm": 0.75}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_task_families_are_deterministic_and_learnable(name):
    family = get_family(name, seed=0)
    a, b = family.sample(0), family.sample(0)
    assert a.seed == b.seed and a.seed != family.sample(0, "heldout").seed
    assert all(torch.equal(x, y) for x, y in zip(a.batch(5), b.batch(5)))
    assert all(torch.equal(a.init_params()[n], v) for n, v in b.init_params().items())
    params = {n: v.requires_grad_() for n, v in a.init_params().items()}
    adam = torch.optim.Adam(params.values(), lr=1e-2)
    before = a.loss(params, a.evaluation_batch()).item()
    for k in range(100):
        adam.zero_grad()
        a.loss(params, a.batch(k)).backward()
        adam.step()
    factor = LEARNABLE.get(name, 0.5)
    assert a.loss(params, a.evaluation_batch()).item() < factor * before, f"{name} not learnable"
    with pytest.raises(ValueError, match="Unknown task family"):
        get_family("imagenet")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    from dist_worker import train, worker

    single = train(world=1)
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], single, atol=1e-6, rtol=1e-5)
    assert not os.path.exists(tmp_path / "rank2.pt")
