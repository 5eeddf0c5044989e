"""The ONNX Runtime and AOTInductor backends reproduce the eager update rules.

Each exported graph is run for ``STEPS`` steps next to the eager rule it came from, each side
carrying its own state, on the same gradients and parameters; every direction must match the
eager one to ``TOLERANCE`` (float32) relative to that tensor's largest eager magnitude over the
run (every new state likewise; see :class:`_Errors`). Transform weights are moved off their
identity start first, so an identity map cannot pass by accident.

* bound ``ModelRule`` s (static shapes) for four specs on a Linear weight, a bias, a Conv2d
  weight and a scalar, in float32 and (three of them) float64;
* shape-agnostic ``TensorRule`` s exported once per rank (1, 2, 4) with every size dynamic and
  run at two sizes that differ from the example's, one with size-1 dimensions;
* regressions: ``+ eps`` kept (zero gradients), float64 constants kept exact, aliased examples,
  rules returning an input or one value twice, quiet export, calls that do not fit the graph.

AOTInductor builds take 8-20 s each on two cores: two packages, shared by module fixtures and
marked slow.
"""

import os
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

import onnx
import pytest
import torch
from torch import Tensor

from compiledopt.export import aoti as aoti_backend
from compiledopt.export import onnx as onnx_backend
from compiledopt.export.rule import ModelRule, TensorRule
from compiledopt.export.spec import build_bound, build_shape_agnostic

STEPS = 10
TOLERANCE = 1e-6  # float32
TOLERANCE_64 = 1e-12
PERTURB = 0.05
LR = 0.01

BOUND_SHAPES = [(4, 3), (4,), (3, 2, 2, 2), ()]
BOUND_SPECS: Dict[str, Dict[str, Any]] = {
    "kronecker-lstm-psd": {"kind": "kronecker", "layer": "KroneckerLSTM", "psd": True},
    "metacurvature": {"kind": "metacurvature"},
    "coordinate-mlp": {
        "kind": "shape_agnostic",
        "name": "coordinate-mlp",
        "kwargs": {"hidden_sizes": [8]},
    },
    "adam": {"kind": "shape_agnostic", "name": "adam", "kwargs": {}},
}
AGNOSTIC: Dict[str, Dict[str, Any]] = {
    "coordinate-mlp": {"hidden_sizes": [8]},
    "coordinate-lstm": {"hidden_size": 6},
    "learned-step-size": {},
    "hypergradient": {},
    "idbd": {},
    "adam": {},
}
# rank -> the export example's shape, and the two shapes the graph then runs at.
EXAMPLE_SHAPES = {1: (3,), 2: (3, 5), 4: (2, 3, 5, 7)}
RUN_SHAPES = {
    1: [(1,), (9,)],
    2: [(1, 6), (7, 4)],
    4: [(1, 3, 1, 2), (4, 2, 3, 5)],
}

Runner = Callable[..., Tuple[Any, List[Tensor]]]


# ---------------------------------------------------------------------------------------------
# Helpers


def _perturb(transforms: Sequence[torch.nn.Module], seed: int) -> None:
    """Add ``PERTURB``-scaled noise to every weight (each shared transform once)."""
    generator = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for transform in transforms:
            if id(transform) in seen:
                continue
            seen.add(id(transform))
            for weight in transform.parameters():
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
                weight.add_(PERTURB * noise.to(weight.dtype))


def _bound_rule(
    spec: Dict[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0
) -> Tuple[ModelRule, List[Tensor], List[Tensor]]:
    """A perturbed ``ModelRule`` for ``BOUND_SHAPES``, with parameters and initial states."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # some transforms draw their initial weights
        transforms = build_bound(spec, BOUND_SHAPES, dtype=dtype)
    _perturb(transforms, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    params = [torch.randn(shape, generator=generator, dtype=dtype) for shape in BOUND_SHAPES]
    states: List[Tensor] = []
    counts = []
    for transform, param in zip(transforms, params):
        state = transform.init_state(param)
        states.extend(state)
        counts.append(len(state))
    return ModelRule(transforms, counts), params, states


def _tensor_rule(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> TensorRule:
    kwargs = AGNOSTIC[name]
    spec = {"kind": "shape_agnostic", "name": name, "kwargs": kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # CoordinateLSTM and CoordinateMLP draw their initial weights
        transform = build_shape_agnostic(spec).to(dtype)
    _perturb([transform], seed)
    return TensorRule(transform)


class _Errors:
    """Worst error per tensor over a trajectory, relative to that tensor's largest eager
    magnitude over the trajectory.

    The scale is taken over all steps, not step by step: a 0-d tensor's "largest magnitude" at
    one step is the value itself, and Adam's momentum of a scalar can pass near zero, where
    float32 cancellation turns a 1-ulp difference in its terms (torch's vectorised ``lerp`` uses
    a fused multiply-add, the ONNX graph a Mul and an Add) into a large relative error of that
    one small value.
    """

    def __init__(self) -> None:
        self.error: Dict[int, float] = {}
        self.scale: Dict[int, float] = {}

    def add(self, actual: Sequence[Tensor], expected: Sequence[Tensor]) -> None:
        assert len(actual) == len(expected)
        for i, (a, b) in enumerate(zip(actual, expected)):
            assert a.shape == b.shape, (i, a.shape, b.shape)
            assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
            if b.numel() == 0:
                continue
            error = (a - b).abs().max().item()
            self.error[i] = max(self.error.get(i, 0.0), error)
            self.scale[i] = max(self.scale.get(i, 0.0), b.abs().max().item())

    def worst(self) -> float:
        """The largest relative error (absolute where a tensor stayed exactly zero)."""
        return max(
            (e / self.scale[i] if self.scale[i] > 0 else e for i, e in self.error.items()),
            default=0.0,
        )


def _compare_model(
    runner: Runner, rule: ModelRule, params: List[Tensor], states: List[Tensor], seed: int = 7
) -> Tuple[float, float]:
    """Run ``runner`` and ``rule`` side by side for ``STEPS`` steps, each carrying its own state;
    return the worst relative error of the directions and of the new states."""
    generator = torch.Generator().manual_seed(seed)
    params = [p.clone() for p in params]
    mine, theirs = list(states), list(states)
    direction_errors, state_errors = _Errors(), _Errors()
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        step_t = torch.tensor(step, dtype=torch.int64)
        directions, mine = runner(grads, params, mine, step_t)
        with torch.no_grad():
            expected, theirs = rule(grads, params, theirs, step_t)
        assert isinstance(directions, list) and isinstance(mine, list)
        direction_errors.add(directions, expected)
        state_errors.add(mine, theirs)
        params = [p - LR * d for p, d in zip(params, expected)]
    return direction_errors.worst(), state_errors.worst()


def _compare_tensor(
    runner: Runner, rule: TensorRule, shape: Tuple[int, ...], dtype: torch.dtype, seed: int = 7
) -> Tuple[float, float]:
    """``_compare_model`` for one tensor of ``shape``, from the transform's initial state."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=generator, dtype=dtype)
    mine = rule.transform.init_state(param)
    theirs = list(mine)
    direction_errors, state_errors = _Errors(), _Errors()
    for step in range(STEPS):
        grad = torch.randn(shape, generator=generator, dtype=dtype)
        step_t = torch.tensor(step, dtype=torch.int64)
        direction, mine = runner(grad, param, mine, step_t)
        with torch.no_grad():
            expected, theirs = rule(grad, param, theirs, step_t)
        assert isinstance(direction, Tensor) and isinstance(mine, list)
        direction_errors.add([direction], [expected])
        state_errors.add(mine, theirs)
        param = param - LR * expected
    return direction_errors.worst(), state_errors.worst()


def _tensor_example(rule: TensorRule, shape: Tuple[int, ...], dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(shape, generator=generator, dtype=dtype)
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    return grad, param, rule.transform.init_state(param), torch.tensor(0)


def _save_quietly(backend: Any, rule: torch.nn.Module, example: tuple, path: str, dynamic: bool):
    """``backend.save`` that fails on any warning it raises (a specialised size included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.save(rule, example, path, dynamic)
    problems = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, DeprecationWarning)
    ]
    assert not problems, problems


# ---------------------------------------------------------------------------------------------
# ONNX: bound rules


@pytest.mark.parametrize("spec_id", list(BOUND_SPECS))
def test_onnx_model_rule_matches_eager(spec_id: str, tmp_path) -> None:
    rule, params, states = _bound_rule(BOUND_SPECS[spec_id])
    path = str(tmp_path / "rule.onnx")
    grads = [torch.randn_like(p) for p in params]
    _save_quietly(onnx_backend, rule, (grads, params, states, torch.tensor(0)), path, False)

    model = onnx.load(path)
    count = len(BOUND_SHAPES)
    assert [i.name for i in model.graph.input] == [
        *(f"grad_{i}" for i in range(count)),
        *(f"param_{i}" for i in range(count)),
        *(f"state_{i}" for i in range(len(states))),
        "step",
    ]
    assert [o.name for o in model.graph.output] == [
        *(f"direction_{i}" for i in range(count)),
        *(f"new_state_{i}" for i in range(len(states))),
    ]
    assert os.listdir(tmp_path) == ["rule.onnx"]  # self-contained: no external data file

    direction_error, state_error = _compare_model(onnx_backend.load(path), rule, params, states)
    assert direction_error <= TOLERANCE
    assert state_error <= TOLERANCE


@pytest.mark.parametrize("spec_id", ["coordinate-mlp", "adam", "kronecker-lstm-psd"])
def test_onnx_model_rule_float64(spec_id: str, tmp_path) -> None:
    """float64 graphs keep float64 constants (β, ε, time scales), not float32-rounded ones."""
    rule, params, states = _bound_rule(BOUND_SPECS[spec_id], dtype=torch.float64)
    path = str(tmp_path / "rule.onnx")
    grads = [torch.randn_like(p) for p in params]
    _save_quietly(onnx_backend, rule, (grads, params, states, torch.tensor(0)), path, False)
    direction_error, state_error = _compare_model(onnx_backend.load(path), rule, params, states)
    assert direction_error <= TOLERANCE_64
    assert state_error <= TOLERANCE_64


# ---------------------------------------------------------------------------------------------
# ONNX: shape-agnostic rules, one dynamic graph per rank


@pytest.mark.parametrize("rank", sorted(EXAMPLE_SHAPES), ids=lambda r: f"rank{r}")
@pytest.mark.parametrize("name", list(AGNOSTIC))
def test_onnx_tensor_rule_dynamic_sizes(name: str, rank: int, tmp_path) -> None:
    rule = _tensor_rule(name)
    path = str(tmp_path / "rule.onnx")
    example = _tensor_example(rule, EXAMPLE_SHAPES[rank], torch.float32)
    _save_quietly(onnx_backend, rule, example, path, True)

    model = onnx.load(path)
    states = len(example[2])
    assert [i.name for i in model.graph.input] == [
        "grad",
        "param",
        *(f"state_{i}" for i in range(states)),
        "step",
    ]
    assert [o.name for o in model.graph.output] == [
        "direction",
        *(f"new_state_{i}" for i in range(states)),
    ]
    for value in model.graph.input[:2]:  # grad and param: every size symbolic
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == rank
        assert all(d.dim_param and not d.HasField("dim_value") for d in dims), dims

    runner = onnx_backend.load(path)
    for shape in RUN_SHAPES[rank]:
        direction_error, state_error = _compare_tensor(runner, rule, shape, torch.float32)
        assert direction_error <= TOLERANCE, shape
        assert state_error <= TOLERANCE, shape


def test_onnx_tensor_rule_float64(tmp_path) -> None:
    rule = _tensor_rule("coordinate-mlp", dtype=torch.float64)
    path = str(tmp_path / "rule.onnx")
    _save_quietly(
        onnx_backend, rule, _tensor_example(rule, EXAMPLE_SHAPES[2], torch.float64), path, True
    )
    runner = onnx_backend.load(path)
    for shape in RUN_SHAPES[2]:
        direction_error, state_error = _compare_tensor(runner, rule, shape, torch.float64)
        assert direction_error <= TOLERANCE_64
        assert state_error <= TOLERANCE_64


# ---------------------------------------------------------------------------------------------
# ONNX: regressions and contract details


@pytest.mark.parametrize("name", ["adam", "coordinate-mlp"])
def test_onnx_zero_gradient_stays_finite(name: str, tmp_path) -> None:
    """``+ eps`` survives export: a zero gradient from the initial state gives the eager
    direction (0 for Adam), not 0/0. onnxscript's optimizer would drop ``+ 1e-8``."""
    rule = _tensor_rule(name)
    path = str(tmp_path / "rule.onnx")
    onnx_backend.save(rule, _tensor_example(rule, (3, 5), torch.float32), path, True)
    runner = onnx_backend.load(path)
    param = torch.randn(2, 4)
    grad = torch.zeros(2, 4)
    state = rule.transform.init_state(param)
    direction, _ = runner(grad, param, state, torch.tensor(0))
    expected, _ = rule(grad, param, state, torch.tensor(0))
    assert torch.isfinite(expected).all() and torch.isfinite(direction).all()
    scale = expected.abs().max().item()
    assert (direction - expected).abs().max().item() <= TOLERANCE * scale


def test_onnx_aliased_example_keeps_both_inputs(tmp_path) -> None:
    """An example passing one tensor as both ``grad`` and ``param`` still exports a graph that
    reads each input (export would otherwise trace them as one)."""
    spec = {"kind": "shape_agnostic", "name": "sgd", "kwargs": {"weight_decay": 0.5}}
    rule = TensorRule(build_shape_agnostic(spec))
    tensor = torch.randn(3, 5)
    path = str(tmp_path / "rule.onnx")
    onnx_backend.save(rule, (tensor, tensor, [], torch.tensor(0)), path, True)
    grad, param = torch.randn(2, 2), torch.randn(2, 2)
    direction, state = onnx_backend.load(path)(grad, param, [], torch.tensor(1))
    torch.testing.assert_close(direction, grad + 0.5 * param)
    assert state == []


def test_onnx_identity_outputs(tmp_path) -> None:
    """Rules that return an input unchanged (plain SGD) or one value twice (SGD's momentum
    buffer is both the direction and the new state) export with the right names."""
    for kwargs in ({}, {"momentum": 0.9}):
        spec = {"kind": "shape_agnostic", "name": "sgd", "kwargs": kwargs}
        rule = TensorRule(build_shape_agnostic(spec))
        path = str(tmp_path / f"sgd{len(kwargs)}.onnx")
        example = _tensor_example(rule, (3, 5), torch.float32)
        onnx_backend.save(rule, example, path, True)
        model = onnx.load(path)
        assert [i.name for i in model.graph.input][:2] == ["grad", "param"]
        runner = onnx_backend.load(path)
        for shape in [(1, 1), (4, 6)]:
            direction_error, state_error = _compare_tensor(runner, rule, shape, torch.float32)
            assert direction_error == 0.0 and state_error == 0.0


def test_onnx_save_and_run_print_nothing(tmp_path, capfd) -> None:
    rule, params, states = _bound_rule(BOUND_SPECS["adam"])
    path = str(tmp_path / "rule.onnx")
    onnx_backend.save(rule, (params, params, states, torch.tensor(0)), path, False)
    onnx_backend.load(path)(params, params, states, torch.tensor(0))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


class _SizeDependent(torch.nn.Module):
    """A rule whose graph depends on the gradient's first size (export must specialise it)."""

    def forward(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        if grad.shape[0] == 3:
            return 2 * grad, state
        return grad, state


def test_onnx_dynamic_export_warns_about_a_specialised_size(tmp_path) -> None:
    path = str(tmp_path / "rule.onnx")
    grad = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="specialised input 'grad'.*dim 0 = 3"):
        onnx_backend.save(_SizeDependent(), (grad, grad, [], torch.tensor(0)), path, True)
    runner = onnx_backend.load(path)
    direction, _ = runner(torch.ones(3, 1), torch.ones(3, 1), [], torch.tensor(0))
    torch.testing.assert_close(direction, torch.full((3, 1), 2.0))
    with pytest.raises(ValueError, match="size 3 at dim 0"):
        runner(torch.ones(4, 1), torch.ones(4, 1), [], torch.tensor(0))


def test_onnx_runner_rejects_calls_that_do_not_fit(tmp_path) -> None:
    """Counts, dtypes, ranks, sizes shared between inputs and derived sizes are checked."""
    rule = _tensor_rule("coordinate-mlp")
    path = str(tmp_path / "rule.onnx")
    onnx_backend.save(rule, _tensor_example(rule, (2, 3, 5, 7), torch.float32), path, True)
    runner = onnx_backend.load(path)
    param = torch.randn(4, 1, 2, 3)
    state = rule.transform.init_state(param)  # ..., factored_row (4,), factored_col (6,)
    step = torch.tensor(0)
    runner(param, param, state, step)
    with pytest.raises(ValueError, match="6 state tensors"):
        runner(param, param, state[:-1], step)
    with pytest.raises(ValueError, match="0-d"):
        runner(param, param, state, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"'grad' has dtype torch\.float64"):
        runner(param.double(), param, state, step)
    with pytest.raises(ValueError, match="'param' has shape"):
        runner(param, param[0], state, step)
    with pytest.raises(ValueError, match="'param' has size 5 at dim 3"):
        runner(param, torch.randn(4, 1, 2, 5), state, step)
    with pytest.raises(ValueError, match="'state_5' has size 7 at dim 0"):
        runner(param, param, [*state[:-1], torch.zeros(7)], step)


# ---------------------------------------------------------------------------------------------
# AOTInductor (slow: each package is a C++ build)


@pytest.fixture(scope="module")
def aoti_bound(tmp_path_factory) -> Tuple[Runner, ModelRule, List[Tensor], List[Tensor]]:
    rule, params, states = _bound_rule(BOUND_SPECS["kronecker-lstm-psd"])
    path = str(tmp_path_factory.mktemp("aoti") / "bound.pt2")
    grads = [torch.randn_like(p) for p in params]
    _save_quietly(aoti_backend, rule, (grads, params, states, torch.tensor(0)), path, False)
    return aoti_backend.load(path), rule, params, states


@pytest.fixture(scope="module")
def aoti_rank2(tmp_path_factory) -> Tuple[Runner, TensorRule]:
    rule = _tensor_rule("coordinate-mlp")
    path = str(tmp_path_factory.mktemp("aoti") / "rank2.pt2")
    _save_quietly(
        aoti_backend, rule, _tensor_example(rule, EXAMPLE_SHAPES[2], torch.float32), path, True
    )
    return aoti_backend.load(path), rule


@pytest.mark.slow
def test_aoti_model_rule_matches_eager(aoti_bound) -> None:
    runner, rule, params, states = aoti_bound
    direction_error, state_error = _compare_model(runner, rule, params, states)
    assert direction_error <= TOLERANCE
    assert state_error <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("shape", RUN_SHAPES[2], ids=str)
def test_aoti_tensor_rule_dynamic_sizes(aoti_rank2, shape: Tuple[int, ...]) -> None:
    runner, rule = aoti_rank2
    direction_error, state_error = _compare_tensor(runner, rule, shape, torch.float32)
    assert direction_error <= TOLERANCE
    assert state_error <= TOLERANCE


@pytest.mark.slow
def test_aoti_runner_rejects_calls_that_do_not_fit(aoti_bound, aoti_rank2) -> None:
    """The package itself checks nothing (a float64 input reads as float32 garbage)."""
    runner, _, params, states = aoti_bound
    step = torch.tensor(0)
    with pytest.raises(ValueError, match="4 grads"):
        runner(params[:3], params, states, step)
    with pytest.raises(ValueError, match=r"'state_0' has dtype torch\.float64"):
        runner(params, params, [states[0].double(), *states[1:]], step)
    with pytest.raises(ValueError, match="'grad_0' has shape"):
        runner([params[0].t(), *params[1:]], params, states, step)
    runner, rule = aoti_rank2
    param = torch.randn(3, 4)
    state = rule.transform.init_state(param)
    with pytest.raises(ValueError, match="'state_5' has size 5 at dim 0"):
        runner(param, param, [*state[:-1], torch.zeros(5)], step)
