"""The image-mlp task family: 8×8 classification with MLPs varied per task, deterministic per
seed, functional (grad and vmap), learnable, with disjoint training and validation pools."""

import sys

import pytest
import torch
from torch.func import functional_call, grad, vmap

from compiledopt.apps.requirements import (
    TASK_FAMILY_MODULES,
    MissingDependencyError,
    require_task_family,
)
from compiledopt.tasks import FAMILIES, AugmentedTask, get_family, task_seed
from compiledopt.tasks.augment import AugmentedFamily
from compiledopt.tasks.digits import load_digits
from compiledopt.tasks.image_mlp import (
    ACTIVATIONS,
    SOURCES,
    ImageMLPFamily,
    ImageMLPTask,
    generated_pools,
    task_spec,
)


def _seed_of(**wanted) -> int:
    """The first task seed whose spec has the ``wanted`` fields."""
    for seed in range(5_000):
        spec = task_spec(seed)
        if all(getattr(spec, field) == value for field, value in wanted.items()):
            return seed
    raise AssertionError(f"no seed below 5000 draws {wanted}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tasks are tiny: on a shared, busy CPU, intra-op threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain():
    return ImageMLPFamily(seed=0, augment=False)


@pytest.fixture(scope="module", params=SOURCES)
def task(request):
    """One (unaugmented) task of each data source."""
    return ImageMLPTask(_seed_of(source=request.param))


def _same_batch(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- registry and requirements ----------------------------------------------------------------


def test_the_family_is_registered_and_needs_sklearn(monkeypatch):
    assert FAMILIES["image-mlp"] is ImageMLPFamily
    family = get_family("image-mlp", seed=2)
    assert isinstance(family, ImageMLPFamily) and family.seed == 2 and family.augment
    assert "augment=True" in repr(family)
    for bad in ("no", 0, None):  # a truthy string must not turn augmentation on
        with pytest.raises(ValueError, match=f"Invalid augment: {bad!r}"):
            ImageMLPFamily(augment=bad)
    assert TASK_FAMILY_MODULES["image-mlp"] == ("sklearn", "tasks")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingDependencyError, match=r"scikit-learn.*compiledopt\[tasks\]"):
        require_task_family("image-mlp")


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_same_task(task):
    again = ImageMLPTask(task.seed)
    assert again.describe() == task.describe()
    params, other = task.init_params(), again.init_params()
    assert params.keys() == other.keys()
    assert all(torch.equal(params[n], other[n]) for n in params)
    for step in (0, 1, 37):
        assert _same_batch(task.batch(step), again.batch(step))
        assert _same_batch(task.validation_batch(step), again.validation_batch(step))
    assert _same_batch(task.evaluation_batch(), again.evaluation_batch())
    assert not _same_batch(task.batch(0), task.batch(1))
    assert not _same_batch(task.validation_batch(0), task.validation_batch(1))


def test_other_seeds_other_tasks(task):
    other = ImageMLPTask(task.seed + 1)
    params = task.init_params()
    assert any(
        p.shape != q.shape or not torch.equal(p, q)
        for p, q in zip(params.values(), other.init_params().values())
    )
    first, second = task.batch(0), other.batch(0)
    assert first[0].shape != second[0].shape or not torch.equal(first[0], second[0])


def test_making_a_task_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    ImageMLPTask(_seed_of(source="shapes"))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_and_heldout_seeds_are_disjoint(plain):
    train = {task_seed(plain.seed, i, "train") for i in range(1000)}
    heldout = {task_seed(plain.seed, i, "heldout") for i in range(1000)}
    assert len(train) == len(heldout) == 1000 and not train & heldout
    for index in range(3):
        assert plain.sample(index).seed == task_seed(plain.seed, index, "train")
        assert plain.sample(index, "heldout").seed == task_seed(plain.seed, index, "heldout")


# -- the distribution -------------------------------------------------------------------------


def test_tasks_vary(plain):
    tasks = [plain.sample(i) for i in range(50)]
    assert {t.source for t in tasks} == {"digits", "prototypes", "shapes"}
    assert {len(t.widths) for t in tasks} == {1, 2, 3}
    assert {w for t in tasks for w in t.widths} == {16, 32, 64}
    assert {t.activation for t in tasks} == {"relu", "tanh", "gelu", "silu"}
    assert {t.batch_size for t in tasks} == {32, 64, 128}
    assert len({t.classes for t in tasks}) >= 6
    assert all(2 <= t.classes <= 10 for t in tasks)
    digits = [t for t in tasks if t.source == "digits"]
    assert len({t.digits for t in digits}) == len(digits)  # class subsets vary
    for t in tasks:
        assert t.spec == task_spec(t.seed)
        x, y = t.batch(3)
        assert x.shape == (t.batch_size, 64) and x.dtype == torch.float32
        assert y.shape == (t.batch_size,) and 0 <= int(y.min()) and int(y.max()) < t.classes
        assert set(t.pool[1].tolist()) == set(range(t.classes))  # every class is in the pool


def test_the_64_32_10_mlp_is_a_task():
    task = ImageMLPTask(_seed_of(source="digits", classes=10, widths=(32,)))
    shapes = {name: tuple(p.shape) for name, p in task.init_params().items()}
    assert shapes == {
        "layers.0.weight": (32, 64),
        "layers.0.bias": (32,),
        "layers.1.weight": (10, 32),
        "layers.1.bias": (10,),
    }
    assert sorted(task.digits) == list(range(10))
    assert "64-32-10" in task.describe()


def test_describe_names_data_classes_layers_activation_and_batch(task):
    text = task.describe()
    assert task.source in text and task.activation in text
    assert f"batch {task.batch_size}" in text
    assert "-".join(str(n) for n in (64, *task.widths, task.classes)) in text
    if task.source == "digits":
        assert str(list(task.digits)) in text
    else:
        assert f"{task.classes} classes" in text
    assert text in repr(task)


# -- training and validation pools ------------------------------------------------------------


def _rows(images):
    return {tuple(row.tolist()) for row in images}


def _contains(pool, batch) -> bool:
    return _rows(batch[0]) <= _rows(pool[0])


def test_validation_pool_is_disjoint_from_the_training_pool(task):
    pool, validation = task.pool, task.validation
    assert not _rows(pool[0]) & _rows(validation[0])
    assert _contains(pool, task.batch(4)) and not _contains(validation, task.batch(4))
    held = task.validation_batch(4)
    assert _contains(validation, held) and not _contains(pool, held)
    assert _same_batch(task.evaluation_batch(), validation)
    assert len(validation[1]) > 128  # a larger batch than any training batch
    if task.source == "digits":
        images, labels = load_digits()
        assert int(task.pool_index.max()) < 1200 <= int(task.validation_index.min())
        assert torch.equal(pool[0], images[task.pool_index])
        assert torch.equal(validation[0], images[task.validation_index])
        digits = torch.tensor(task.digits)
        assert torch.equal(digits[pool[1]], labels[task.pool_index])  # labels follow digits
        assert task.streams is None
    else:
        assert task.pool_index is None and task.streams[0] != task.streams[1]
        assert len(pool[1]) == 1200 and len(validation[1]) == 512


def test_generated_pools_are_cached_and_seeded():
    seed = _seed_of(source="prototypes")
    first = generated_pools("prototypes", seed, 4)
    assert generated_pools("prototypes", seed, 4) is first
    fresh = generated_pools.__wrapped__("prototypes", seed, 4)
    assert all(_same_batch(a, b) for a, b in zip(first[:2], fresh[:2]))
    other = generated_pools.__wrapped__("prototypes", seed + 1, 4)
    assert not torch.equal(first[0][0], other[0][0])
    with pytest.raises(ValueError, match="Invalid generated source"):
        generated_pools.__wrapped__("digits", seed, 4)


# -- functional use ---------------------------------------------------------------------------


def test_a_few_adam_steps_reduce_the_loss(plain):
    for index in range(6):
        task = plain.sample(index)
        params = {n: p.requires_grad_() for n, p in task.init_params().items()}
        adam = torch.optim.Adam(params.values(), lr=1e-2)
        evaluation = task.evaluation_batch()
        before = task.loss(params, evaluation).item()
        for step in range(40):
            adam.zero_grad()
            task.loss(params, task.batch(step)).backward()
            adam.step()
        after = task.loss(params, evaluation).item()
        assert after < 0.6 * before, f"{task.describe()}: {before:.3f} -> {after:.3f}"
        with torch.no_grad():
            logits = functional_call(task.model, params, (evaluation[0],))
        accuracy = (logits.argmax(1) == evaluation[1]).float().mean().item()
        assert accuracy > 1.5 / task.classes, task.describe()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_vmap_of_grad_equals_a_loop(activation):
    task = ImageMLPTask(_seed_of(activation=activation, widths=(32, 16)))
    generator = torch.Generator().manual_seed(0)
    params = task.init_params()
    stacked = {
        n: p + 0.1 * torch.randn((3, *p.shape), generator=generator) for n, p in params.items()
    }
    batch = task.batch(2)
    batched = vmap(grad(task.loss), in_dims=(0, None))(stacked, batch)
    for i in range(3):
        single = grad(task.loss)({n: p[i] for n, p in stacked.items()}, batch)
        for name in params:
            torch.testing.assert_close(batched[name][i], single[name])
    losses = vmap(task.loss, in_dims=(0, None))(stacked, batch)
    assert len(set(losses.tolist())) == 3  # the perturbations matter


# -- augmentation -----------------------------------------------------------------------------


def _loss_and_grads(task, params, batch):
    live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    loss = task.loss(live, batch)
    return loss, dict(zip(live, torch.autograd.grad(loss, list(live.values()))))


def test_training_tasks_are_augmented_without_changing_the_function():
    family = ImageMLPFamily(seed=1, max_param_scale=5.0, max_loss_scale=3.0)
    reference = AugmentedFamily(
        ImageMLPFamily(seed=1, augment=False), max_param_scale=5.0, max_loss_scale=3.0
    )
    for index in range(3):
        augmented = family.sample(index)
        assert isinstance(augmented, AugmentedTask) and isinstance(augmented.task, ImageMLPTask)
        expected = reference.sample(index)
        assert augmented.scales == expected.scales
        assert augmented.loss_scale == expected.loss_scale
        assert all(1 / 5 <= c <= 5 for c in augmented.scales.values())
        assert len(set(augmented.scales.values())) > 1
        task, s, c = augmented.task, augmented.loss_scale, augmented.scales
        assert _same_batch(augmented.validation_batch(3), task.validation_batch(3))
        batch = augmented.batch(0)
        start = augmented.init_params()
        original = task.init_params()
        for name, value in original.items():
            torch.testing.assert_close(start[name], value / c[name])
        loss, grads = _loss_and_grads(augmented, start, batch)
        plain_loss, plain_grads = _loss_and_grads(task, original, batch)
        torch.testing.assert_close(loss, s * plain_loss)
        for name, value in grads.items():  # d(s L(c p'))/dp' = s c dL/dp
            torch.testing.assert_close(value, s * c[name] * plain_grads[name])
    heldout = family.sample(0, "heldout")
    assert isinstance(heldout, ImageMLPTask)  # evaluation measures the original tasks
    assert not isinstance(ImageMLPFamily(seed=1, augment=False).sample(0), AugmentedTask)
