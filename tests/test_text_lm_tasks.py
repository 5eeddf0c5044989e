"""The text-lm task family: generated languages, small causal transformers, determinism, the
disjointness of training and validation text, and the functional forward under vmap."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from compiledopt.tasks import FAMILIES, get_family
from compiledopt.tasks.augment import AugmentedTask
from compiledopt.tasks.image_mlp import ImageMLPTask
from compiledopt.tasks.text_lm import (
    CHARACTERS,
    EVALUATION_WINDOWS,
    TextLMFamily,
    TextLMTask,
    decode,
    encode,
    text_spec,
)

SEEDS = (0, 3)  # 0: two layers, tied head, RMSNorm; 3: one layer, untied head, LayerNorm


@pytest.fixture(scope="module", params=SEEDS)
def task(request) -> TextLMTask:
    return TextLMTask(request.param)


def _sentences(text: str):
    import re

    return {s.strip() for s in re.findall(r"[^.!?]*[.!?]", text)}


def test_the_families_are_registered():
    assert FAMILIES["text-lm"] is TextLMFamily
    mixed = get_family("mixed-lm", seed=1)
    kinds = [type(mixed.sample(i).task).__name__ for i in range(4)]
    assert kinds == ["ImageMLPTask", "TextLMTask", "ImageMLPTask", "TextLMTask"]
    assert mixed.sample(3).seed == TextLMFamily(seed=1).sample(1).seed


def test_same_seed_same_task(task):
    again = TextLMTask(task.seed)
    assert again.spec == task.spec
    assert again.train_text == task.train_text and again.validation_text == task.validation_text
    for name, value in task.init_params().items():
        assert torch.equal(value, again.init_params()[name]), name
    for step in (0, 7):
        for a, b in zip(task.batch(step), again.batch(step)):
            assert torch.equal(a, b)
        for a, b in zip(task.validation_batch(step), again.validation_batch(step)):
            assert torch.equal(a, b)
    assert not torch.equal(task.batch(0)[0], task.batch(1)[0])


def test_other_seeds_draw_other_languages_and_models(task):
    other = TextLMTask(task.seed + 1)
    assert other.language.words != task.language.words
    assert other.train_text[:200] != task.train_text[:200]


def test_making_a_task_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TextLMTask(5)
    assert torch.equal(torch.rand(3), expected)


def test_shapes_and_targets_are_the_next_characters(task):
    inputs, targets = task.batch(2)
    assert inputs.shape == targets.shape == (task.batch_size, task.context)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    logits = task.model(inputs)
    assert logits.shape == (task.batch_size, task.context, len(CHARACTERS))
    evaluation = task.evaluation_batch()
    assert evaluation[0].shape == (EVALUATION_WINDOWS, task.context)
    loss = task.loss(task.init_params(), task.batch(0))
    assert abs(float(loss) - math.log(len(CHARACTERS))) < 0.1  # near uniform at initialisation


def test_specs_cover_the_documented_ranges():
    specs = [text_spec(seed) for seed in range(200)]
    assert {s.d_model for s in specs} == {16, 32, 48}
    assert {s.layers for s in specs} == {1, 2}
    assert {s.heads for s in specs} == {2, 4}
    assert {s.norm for s in specs} == {"layernorm", "rmsnorm"}
    assert {s.tied for s in specs} == {True, False}
    assert min(s.context for s in specs) == 16 and max(s.context for s in specs) == 32
    assert min(s.batch_size for s in specs) == 16 and max(s.batch_size for s in specs) == 32
    assert [TextLMTask(seed).spec for seed in SEEDS] == [specs[seed] for seed in SEEDS]


def test_validation_text_shares_no_sentence_with_the_training_text(task):
    train, validation = _sentences(task.train_text), _sentences(task.validation_text)
    assert len(validation) > 50
    assert not train & validation
    assert set(task.train_text) <= set(CHARACTERS)
    assert len(task.language.words) >= 40


def test_batches_are_windows_of_their_own_text(task):
    for step in range(3):
        for (inputs, targets), text in (
            (task.batch(step), task.train_text),
            (task.validation_batch(step), task.validation_text),
        ):
            for row in range(task.batch_size):
                assert decode(inputs[row]) + decode(targets[row, -1:]) in text
    inputs, targets = task.evaluation_batch()
    assert decode(inputs[0]) + decode(targets[0, -1:]) == task.validation_text[: task.context + 1]


def test_train_and_heldout_tasks_are_disjoint():
    family = TextLMFamily(seed=0, augment=False)
    train = {family.sample(i).seed for i in range(20)}
    heldout = {family.sample(i, "heldout").seed for i in range(20)}
    assert not train & heldout


def test_bad_input_is_named():
    for seed in (-1, 1.5, True, 2**63):
        with pytest.raises(ValueError, match=f"Invalid task seed: {seed!r}"):
            TextLMTask(seed)
    with pytest.raises(ValueError, match="'test'"):
        TextLMFamily(augment=False).sample(0, "test")
    with pytest.raises(ValueError, match="Invalid task index: -2"):
        get_family("mixed-lm").sample(-2)
    task = TextLMTask(1)
    with pytest.raises(ValueError, match="Invalid step: -1"):
        task.batch(-1)
    with pytest.raises(ValueError, match="Invalid step: 'x'"):
        task.validation_batch("x")
    with pytest.raises(ValueError, match="'A'"):
        encode("A b")
    with pytest.raises(ValueError, match="Invalid augment: 'yes'"):
        TextLMFamily(augment="yes")


def test_attention_is_causal(task):
    inputs = task.batch(0)[0][:2].clone()
    before = task.model(inputs)
    inputs[:, -1] = (inputs[:, -1] + 1) % len(CHARACTERS)
    after = task.model(inputs)
    torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=0)
    assert not torch.equal(before[:, -1], after[:, -1])


def test_roles_follow_the_module_types(task):
    roles = task.roles()
    assert list(roles) == list(task.init_params())
    assert roles["embed.weight"] == roles["positions.weight"] == "embedding"
    assert roles["blocks.0.qkv.weight"] == roles["blocks.0.out.weight"] == "matrix"
    assert roles["blocks.0.proj.bias"] == roles["norm.weight"] == "vector"
    assert "blocks.0.qkv.bias" not in roles  # a key bias would get no gradient
    if task.tied:
        assert "head.weight" not in roles and task.model.head.weight is task.model.embed.weight
    else:
        assert roles["head.weight"] == "head"
    assert "input" not in roles.values()  # the embedding reads the input
    image = ImageMLPTask(2).roles()
    last = len(ImageMLPTask(2).model.layers) - 1
    assert image["layers.0.weight"] == "input" and image[f"layers.{last}.weight"] == "head"


def _double(task: TextLMTask) -> TextLMTask:
    task.model.double()
    return task


@pytest.mark.parametrize("seed", SEEDS)
def test_functional_call_and_vmap_equal_the_modules_forward(seed):
    """Three perturbed copies of the parameters: vmap of functional_call (loss and grad) against
    the module itself loaded with each copy, in float64."""
    task = _double(TextLMTask(seed))
    batch = task.batch(1)
    generator = torch.Generator().manual_seed(0)
    stacked = {
        n: p + 0.05 * torch.randn((3, *p.shape), generator=generator, dtype=p.dtype)
        for n, p in task.init_params().items()
    }
    losses = vmap(task.loss, in_dims=(0, None))(stacked, batch)
    grads = vmap(grad(task.loss), in_dims=(0, None))(stacked, batch)
    reference = TextLMTask(seed).model.double()
    for m in range(3):
        reference.load_state_dict({n: v[m] for n, v in stacked.items()}, strict=False)
        reference.zero_grad()
        logits = reference(batch[0])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), batch[1].reshape(-1))
        loss.backward()
        torch.testing.assert_close(losses[m], loss.detach(), rtol=1e-12, atol=1e-12)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(grads[name][m], param.grad, rtol=1e-9, atol=1e-12)
        single = functional_call(task.model, {n: v[m] for n, v in stacked.items()}, (batch[0],))
        torch.testing.assert_close(single, logits.detach(), rtol=1e-12, atol=1e-12)


def test_a_few_adam_steps_reduce_the_validation_loss():
    task = TextLMTask(3)
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    optimizer = torch.optim.Adam(params.values(), lr=3e-3)
    start = float(task.loss(params, task.evaluation_batch()))
    for step in range(40):
        optimizer.zero_grad()
        task.loss(params, task.batch(step)).backward()
        optimizer.step()
    assert float(task.loss(params, task.evaluation_batch())) < start - 0.5


def test_training_tasks_are_augmented_without_changing_the_function():
    family = TextLMFamily(seed=0)
    augmented = family.sample(1)
    assert isinstance(augmented, AugmentedTask)
    plain = augmented.task
    batch = plain.batch(0)
    scaled = augmented.unscaled_loss(augmented.init_params(), batch)
    torch.testing.assert_close(scaled, plain.loss(plain.init_params(), batch))
    assert augmented.roles() == plain.roles()
    assert not isinstance(family.sample(1, "heldout"), AugmentedTask)
