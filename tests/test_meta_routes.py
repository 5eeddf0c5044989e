"""Meta-training with routes: each parameter updated by the rule of its role. The vectorised
population against a plain loop over members in float64 (with independent references of the
adam and orthogonal rules), no routes bit-identical to the unrouted code path, zero gradients
giving zero updates, the settings refused by name, and the routes carried from `compiledopt
train` through the checkpoint into the exported manifest."""

import json
from typing import Dict, List

import pytest
import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from compiledopt.learned.mlp import CoordinateMLP
from compiledopt.learned.normalized import NormalizedMLP
from compiledopt.meta import MetaConfig, MetaLoop
from compiledopt.meta.inner import apply_transform, init_states, routed_transforms
from compiledopt.meta.population import Population, flat_weights, unflatten
from compiledopt.tasks.base import Batch, Task
from compiledopt.tasks.image_mlp import ImageMLPTask
from compiledopt.tasks.regression import RegressionFamily
from compiledopt.tasks.text_lm import TextLMTask
from compiledopt.transforms.base import UpdateFunction

ROUTES = {
    "matrix": "orthogonal",
    "vector": "adam",
    "embedding": "adam",
    "head": "adam",
    "input": "orthogonal",
}
LR = 0.5  # exact in float32: the population's lr tensor is float32


class Float64Task(Task):
    """``task`` in float64 (its model converted, its float inputs cast), optionally with its
    loss multiplied by ``factor``."""

    def __init__(self, task: Task, factor: float = 1.0) -> None:
        self.task = task
        self.factor = factor
        super().__init__(task.seed, task.model.double())

    def batch(self, step: int) -> Batch:
        inputs, target = self.task.batch(step)
        return (inputs.double() if inputs.is_floating_point() else inputs), target

    def evaluation_batch(self) -> Batch:
        return self.batch(0)

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return self.factor * self.task.criterion(output, target)


def _tasks() -> List[Task]:
    # An MLP (input, matrix, head, vector: a tall and a wide matrix) and a transformer with an
    # untied head (embedding, matrix, head, vector).
    image = ImageMLPTask(next(s for s in range(50) if len(ImageMLPTask(s).widths) >= 2))
    return [Float64Task(image), Float64Task(TextLMTask(3))]


def _members(transform: NormalizedMLP, members: int) -> Tensor:
    theta = torch.cat([w.detach().reshape(-1) for w in transform.parameters()])
    noise = torch.randn(members, theta.numel(), generator=torch.Generator().manual_seed(1))
    return theta + 0.3 * noise.double()


def _loop(transform, task: Task, weights: Tensor, params, states, step: int, lr: float):
    """One step of every member by autograd, the rule of each parameter its role's."""
    roles = task.roles()
    batch = task.batch(step)
    out_params: Dict[str, List[Tensor]] = {n: [] for n in params}
    out_states: Dict[str, List[List[Tensor]]] = {n: [] for n in params}
    losses = []
    for m in range(weights.shape[0]):
        torch.nn.utils.vector_to_parameters(weights[m], transform.parameters())
        member = {n: p[m].clone().requires_grad_() for n, p in params.items()}
        loss = task.loss(member, batch)
        grads = dict(zip(member, torch.autograd.grad(loss, list(member.values()))))
        losses.append(loss.detach())
        with torch.no_grad():
            for name, value in member.items():
                rule = transform.routed(ROUTES[roles[name]])
                state = [s[m] for s in states[name]]
                direction, new = rule.update(grads[name], value, state, torch.tensor(step))
                out_params[name].append(value - lr * direction)
                out_states[name].append(new)
    return (
        torch.stack(losses),
        {n: torch.stack(v) for n, v in out_params.items()},
        {n: [torch.stack(s) for s in zip(*v)] for n, v in out_states.items()},
    )


def _newton_schulz(matrix: Tensor) -> Tensor:
    """Five quintic Newton–Schulz iterations in float64, written out on the Gram side of the
    smaller dimension (the reference of the orthogonal rule)."""
    x = matrix / matrix.norm()
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x.T if transpose else x


def _unit_rms(x: Tensor) -> Tensor:
    return x / x.square().mean().sqrt()


@pytest.mark.parametrize("index", [0, 1])
def test_the_vectorised_routed_step_equals_a_loop_in_float64(index):
    task = _tasks()[index]
    transform = NormalizedMLP().double()
    weights = _members(transform, 3)
    population = Population(transform, task, 3, ROUTES)
    roles = task.roles()
    assert population.rules == {n: ROUTES[r] for n, r in roles.items()}
    params, states = population.init()
    ref_params, ref_states = params, states
    for step in range(2):
        losses, params, states = population.step(weights, params, states, step, LR)
        ref_losses, ref_params, ref_states = _loop(
            transform, task, weights, ref_params, ref_states, step, LR
        )
        torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=0)
        for name in params:
            torch.testing.assert_close(params[name], ref_params[name], rtol=1e-9, atol=1e-10)
            for mine, reference in zip(states[name], ref_states[name]):
                torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-10)


def test_routes_apply_the_roles_rules():
    """Step 0 from independent references: ``adam`` roles move by ``lr · g/(|g| + ε/(1-β₃))``
    (≈ the gradient's sign), ``orthogonal`` ones by the Newton–Schulz orthogonalisation of the
    unrouted (``learned``) direction, rescaled to unit RMS; on tall and wide matrices."""
    transform = NormalizedMLP(init="small_mlp").double()
    weights = _members(transform, 2)
    seen, shapes = set(), set()
    for task in _tasks():
        learned = Population(transform, task, 2, dict.fromkeys(ROUTES, "learned"))
        routed = Population(transform, task, 2, ROUTES)
        params, states = routed.init()
        _, after, _ = routed.step(weights, params, states, 0, LR)
        _, plain, _ = learned.step(weights, params, states, 0, LR)
        grads = vmap(torch.func.grad(task.loss), in_dims=(0, None))(params, task.batch(0))
        for name, role in task.roles().items():
            seen.add(role)
            direction = (params[name] - after[name]) / LR
            unrouted = (params[name] - plain[name]) / LR
            for m in range(2):
                if ROUTES[role] == "adam":
                    g = grads[name][m]
                    expected = g / (g.abs() + transform.eps / (1 - transform.abs_decay))
                    expected = expected.clamp(-transform.feature_clip, transform.feature_clip)
                else:
                    expected = _unit_rms(_newton_schulz(unrouted[m]))
                    assert not torch.allclose(expected, unrouted[m], atol=1e-3)
                    rows, cols = expected.shape
                    shapes.add("tall" if rows > cols else "wide")
                torch.testing.assert_close(direction[m], expected, rtol=1e-8, atol=1e-10)
    assert seen == {"input", "matrix", "head", "vector", "embedding"}
    assert shapes == {"tall", "wide"}


def test_zero_gradient_gives_zero_update_through_the_routed_rules():
    for task in _tasks():
        zero = Float64Task(task.task, factor=0.0)
        transform = NormalizedMLP(init="small_mlp").double()
        population = Population(transform, zero, 2, ROUTES)
        params, states = population.init()
        new_params, new_states = params, states
        for step in range(3):
            _, new_params, new_states = population.step(
                _members(transform, 2), new_params, new_states, step, LR
            )
        for name in params:
            assert torch.equal(new_params[name], params[name]), name
            assert all(not s.any() for s in new_states[name]), name


def _old_member_step(update, loss, weights, params, states, batch, step, lr):
    """The population's step as it was before routes (one transform for every parameter)."""
    grads, value = grad_and_value(loss)(params, batch)
    new_params, new_states = {}, {}
    for name, p in params.items():
        direction, new_states[name] = functional_call(
            update, weights, (grads[name], p, states[name], step)
        )
        new_params[name] = p - lr * direction
    return value, new_params, new_states


def test_without_routes_the_step_is_bit_identical_to_the_unrouted_code_path():
    task = TextLMTask(3)
    transform = NormalizedMLP(init="small_mlp")
    theta = flat_weights(transform)
    weights = theta + 0.1 * torch.randn(
        2, theta.numel(), generator=torch.Generator().manual_seed(0)
    )
    update = UpdateFunction(transform)
    old = vmap(
        lambda *a: _old_member_step(update, task.loss, *a), in_dims=(0, 0, 0, None, None, None)
    )
    named = {f"transform.{n}": w for n, w in unflatten(transform, weights).items()}
    unrouted, everywhere = Population(transform, task, 2), Population(transform, task, 2, {})
    artifact = Population(transform, task, 2, dict.fromkeys(ROUTES, "artifact"))
    params, states = unrouted.init()
    step, lr = torch.tensor(0), torch.tensor(1e-3, dtype=torch.float32)
    with torch.no_grad():
        expected = old(named, params, states, task.batch(0), step, lr)
    for population in (unrouted, everywhere, artifact):
        got = population.step(weights, params, states, 0, 1e-3)
        assert torch.equal(got[0], expected[0])
        for name in params:
            assert torch.equal(got[1][name], expected[1][name]), name
            assert all(torch.equal(a, b) for a, b in zip(got[2][name], expected[2][name]))
    # The functional inner loop of truncated back-propagation, likewise.
    grads = {n: torch.randn_like(p[0]) for n, p in params.items()}
    plain = {n: p[0] for n, p in params.items()}
    first = init_states(transform, plain)
    a = apply_transform(transform, plain, grads, first, 0, 1e-3)
    b = apply_transform(
        transform, plain, grads, first, 0, 1e-3, routed_transforms(transform, task, {})
    )
    for name in plain:
        direction = transform.update(grads[name], plain[name], first[name], torch.tensor(0))[0]
        assert torch.equal(a[0][name], plain[name] - 1e-3 * direction)
        assert torch.equal(b[0][name], a[0][name])


@pytest.mark.parametrize(
    "routes, match",
    [
        ({"weights": "adam"}, "unknown role 'weights'"),
        ({"matrix": 3}, "role 'matrix' has rule 3"),
        (["matrix"], r"Invalid routes: \['matrix'\]"),
    ],
)
def test_bad_routes_are_refused_by_name(routes, match):
    for estimator in ("pes", "es", "tbptt"):
        with pytest.raises(ValueError, match=match):
            MetaConfig(estimator=estimator, routes=routes).validate()


def test_a_rule_the_transform_lacks_is_refused_by_name():
    family = RegressionFamily(seed=0)
    with pytest.raises(ValueError, match="role 'vector' has rule 'sgd'"):
        MetaLoop(NormalizedMLP(), family, MetaConfig(estimator="pes", routes={"vector": "sgd"}))
    with pytest.raises(ValueError, match="role 'matrix' has rule 'orthogonal'"):
        MetaLoop(
            CoordinateMLP(),
            family,
            MetaConfig(estimator="tbptt", routes={"matrix": "orthogonal"}),
        )


def test_tbptt_with_routes_reaches_the_weights_through_every_rule():
    config = MetaConfig(
        estimator="tbptt",
        meta_steps=1,
        unroll=2,
        horizon=4,
        tasks_per_step=1,
        inner_lr=1e-2,
        eval_every=0,
    )
    config.routes = {"matrix": "orthogonal", "vector": "adam"}
    loop = MetaLoop(NormalizedMLP(init="small_mlp"), RegressionFamily(seed=0), config)
    before = flat_weights(loop.transform)
    record = loop.step()
    assert record["applied"] == 1.0
    slot = loop.slots[0]
    kinds = {name: t.orthogonalize for name, t in slot.context.items()}
    roles = slot.task.roles()
    assert {kinds[n] for n, r in roles.items() if r == "matrix"} <= {True}
    assert {kinds[n] for n, r in roles.items() if r == "vector"} == {False}
    assert not torch.equal(flat_weights(loop.transform), before)


def _cli(argv) -> int:
    from compiledopt import cli

    return cli.main(["train", *argv])


ARGS = [
    "--estimator", "pes", "--transform", "normalized-mlp", "--family", "regression",
    "--meta-steps", "2", "--unroll", "2", "--horizon", "4", "--min-horizon", "4",
    "--pairs", "1", "--tasks-per-step", "1", "--eval-every", "0", "--no-progress",
]  # fmt: skip


def test_cli_routes_reach_the_checkpoint_and_the_manifest(tmp_path, capsys):
    from compiledopt.export import load_artifact

    output, artifact = tmp_path / "run.pt", tmp_path / "artifact"
    routes = "matrix=orthogonal,vector=adam,input=orthogonal"
    argv = [*ARGS, "--routes", routes, "--output", str(output)]
    assert _cli([*argv, "--export", str(artifact), "--export-backends", "torchscript"]) == 0
    state = torch.load(output, weights_only=True)
    expected = {"matrix": "orthogonal", "vector": "adam", "input": "orthogonal"}
    assert state["config"]["routes"] == expected and state["metadata"]["routes"] == expected
    assert load_artifact(artifact).manifest["routes"] == expected
    # A resumed run keeps its routes; other routes are refused, naming the setting.
    assert _cli([*argv, "--resume", "--meta-steps", "3"]) == 0
    assert torch.load(output, weights_only=True)["meta_step"] == 3
    capsys.readouterr()
    assert _cli([*ARGS, "--routes", "matrix=adam", "--output", str(output), "--resume"]) == 2
    assert "routes" in capsys.readouterr().err
    # A config file may set them as a JSON object.
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"routes": {"head": "adam"}}))
    assert _cli([*ARGS, "--config", str(config), "--output", str(tmp_path / "b.pt")]) == 0
    assert torch.load(tmp_path / "b.pt", weights_only=True)["config"]["routes"] == {"head": "adam"}


@pytest.mark.parametrize(
    "value, match",
    [
        ("matrix", "expected role=rule"),
        ("matrix=adam,matrix=learned", "role 'matrix' is routed twice"),
        ("weights=adam", "unknown role 'weights'"),
        ("vector=sgd", "role 'vector' has rule 'sgd'"),
    ],
)
def test_cli_bad_routes_are_named(tmp_path, capsys, value, match):
    try:
        code = _cli([*ARGS, "--routes", value, "--output", str(tmp_path / "x.pt")])
    except SystemExit as exit:  # argparse refuses the option's syntax itself
        code = exit.code
    assert code == 2
    assert match in capsys.readouterr().err.replace('"', "'")
