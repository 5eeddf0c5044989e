"""Shape-agnostic coordinate-wise transforms: CoordinateMLP and CoordinateLSTM.

Each is checked against a readable reference written here (loops over feature columns and hidden
units for the MLP; ``nn.LSTMCell`` run one coordinate at a time for the LSTM), in float64 over
several steps with the state carried, and through TorchScript, ``torch.compile`` and
``torch.export``.
"""

import copy
import itertools
import math
import re
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from registry import SHAPES
from torch import Tensor, nn

from compiledopt.learned.lstm import CoordinateLSTM
from compiledopt.learned.mlp import CoordinateMLP
from compiledopt.transforms.base import Transform, UpdateFunction

DTYPE = torch.float64
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
RANKS = (0, 1, 2, 4)
STEPS = 6

Trajectory = List[Tuple[Tensor, List[Tensor]]]

CONFIGS: Dict[str, Callable[[], Transform]] = {
    "mlp": CoordinateMLP,
    "mlp_deep_subset": lambda: CoordinateMLP(
        hidden_sizes=(6, 5),
        features=("grad", "param", "momentum", "factored", "time"),
        momentum_decays=(0.9, 0.99),
        second_moment_decay=0.95,
        timescales=(3.0, 300.0),
        init="random",
    ),
    "mlp_no_time": lambda: CoordinateMLP(
        hidden_sizes=(4, 3, 2), features=("rms", "momentum_rsqrt"), exp_mult=0.5, step_mult=0.1
    ),
    "lstm": CoordinateLSTM,
    "lstm_raw": lambda: CoordinateLSTM(hidden_size=5, preprocess=False, output_scale=0.5),
}
CONFIG_IDS = list(CONFIGS)
by_config = pytest.mark.parametrize("name", CONFIG_IDS)
by_rank = pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])


def _build(name: str, perturb: float = 0.1, seed: int = 0) -> Transform:
    """The configuration in float64, weights moved off their init so every unit matters."""
    transform = CONFIGS[name]().to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(perturb * torch.randn(weight.shape, generator=generator, dtype=DTYPE))
    return transform


def _param(shape: Sequence[int], seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=DTYPE)


def _grads(shape: Sequence[int], count: int = STEPS, seed: int = 1) -> List[Tensor]:
    """Gradients over seven orders of magnitude (both branches of the LSTM preprocessing), with
    an exact zero where there is room for one."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        g = torch.randn(tuple(shape), generator=generator, dtype=DTYPE)
        exponent = torch.empty(tuple(shape), dtype=DTYPE).uniform_(-6.0, 1.0, generator=generator)
        g = g * 10.0**exponent
        if g.numel() > 2:
            g.view(-1)[1] = 0.0
        out.append(g)
    return out


def _step(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _trajectory(update, param: Tensor, state: List[Tensor], grads: Sequence[Tensor]) -> Trajectory:
    out: Trajectory = []
    for k, grad in enumerate(grads):
        direction, state = update(grad, param, state, _step(k))
        state = list(state)
        out.append((direction, state))
    return out


def _assert_close(actual: Trajectory, expected: Trajectory) -> None:
    assert len(actual) == len(expected)
    for k, ((d, state), (ref_d, ref_state)) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(d, ref_d, **TOLERANCE, msg=lambda m, k=k: f"step {k}: {m}")
        assert len(state) == len(ref_state), f"step {k}: {len(state)} != {len(ref_state)}"
        for i, (s, ref) in enumerate(zip(state, ref_state)):
            torch.testing.assert_close(
                s, ref, **TOLERANCE, msg=lambda m, k=k, i=i: f"step {k}: state[{i}]: {m}"
            )


# --------------------------------------------------------------------------------------------
# Readable references
# --------------------------------------------------------------------------------------------


def mlp_reference(
    t: CoordinateMLP, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
) -> Tuple[Tensor, List[Tensor]]:
    """CoordinateMLP's maths spelt out: columns by name, one hidden unit at a time."""
    decays, beta2, eps = t.momentum_decays, t.second_moment_decay, t.eps
    count = len(decays)
    momenta = [beta * s + (1 - beta) * grad for beta, s in zip(decays, state[:count])]
    v = beta2 * state[count] + (1 - beta2) * grad**2
    if grad.dim() >= 2:
        squares = (grad**2).reshape(grad.shape[0], -1)
        row = beta2 * state[count + 1] + (1 - beta2) * squares.mean(dim=1)
        col = beta2 * state[count + 2] + (1 - beta2) * squares.mean(dim=0)
        v_hat = (torch.outer(row, col) / (row.mean() + eps)).reshape(grad.shape)
    else:
        row, col = state[count + 1], state[count + 2]
        v_hat = v

    columns = {"grad": grad, "param": param, "rms": torch.sqrt(v + eps)}
    columns["factored_grad"] = grad / torch.sqrt(v_hat + eps)
    for beta, m in zip(decays, momenta):
        columns[f"momentum_{beta}"] = m
        columns[f"momentum_rsqrt_{beta}"] = m / torch.sqrt(v + eps)
        columns[f"factored_momentum_{beta}"] = m / torch.sqrt(v_hat + eps)
    inputs = []
    for name in t.feature_names():
        if name.startswith("time_"):
            tau = float(name.removeprefix("time_"))
            inputs.append(torch.full((grad.numel(),), math.tanh(int(step) / tau), dtype=DTYPE))
        else:
            x = columns[name].reshape(-1)
            inputs.append(x / torch.sqrt((x**2).mean() + t.norm_eps))

    units = inputs
    for layer in [t.input_layer, *t.hidden_layers]:
        units = [
            torch.relu(
                layer.bias[j] + sum(layer.weight[j, f] * units[f] for f in range(len(units)))
            )
            for j in range(layer.out_features)
        ]
    d = t.head.bias[0] + sum(t.head.weight[0, j] * units[j] for j in range(len(units)))
    m = t.head.bias[1] + sum(t.head.weight[1, j] * units[j] for j in range(len(units)))
    direction = d * torch.exp(m * t.exp_mult) * t.step_mult
    return direction.reshape(grad.shape), [*momenta, v, row, col]


def _preprocess(g: float, p: float) -> List[float]:
    """Andrychowicz et al. (2016), appendix A, for one coordinate."""
    if abs(g) >= math.exp(-p):
        return [math.log(abs(g)) / p, math.copysign(1.0, g)]
    return [-1.0, math.exp(p) * g]


def lstm_reference(
    t: CoordinateLSTM, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
) -> Tuple[Tensor, List[Tensor]]:
    """Two ``nn.LSTMCell`` s holding the transform's weights, run one coordinate at a time."""
    cells = []
    for layer in range(2):
        w_ih = getattr(t, f"weight_ih_{layer}")
        cell = nn.LSTMCell(w_ih.shape[1], t.hidden_size).to(DTYPE)
        with torch.no_grad():
            cell.weight_ih.copy_(w_ih)
            cell.weight_hh.copy_(getattr(t, f"weight_hh_{layer}"))
            cell.bias_ih.copy_(getattr(t, f"bias_{layer}"))
            cell.bias_hh.zero_()
        cells.append(cell)
    outputs, new_state = [], [[], [], [], []]
    for k, g in enumerate(grad.reshape(-1).tolist()):
        x = _preprocess(g, t.preprocess_p) if t.preprocess else [g]
        x = torch.tensor([x], dtype=DTYPE)
        h0, c0 = cells[0](x, (state[0][k : k + 1], state[1][k : k + 1]))
        h1, c1 = cells[1](h0, (state[2][k : k + 1], state[3][k : k + 1]))
        outputs.append(t.output_scale * (t.output_weight[0] @ h1[0] + t.output_bias[0]))
        for i, s in enumerate((h0, c0, h1, c1)):
            new_state[i].append(s)
    direction = torch.stack(outputs).reshape(grad.shape)
    return direction, [torch.cat(s) for s in new_state]


def _reference(name: str):
    return mlp_reference if name.startswith("mlp") else lstm_reference


# --------------------------------------------------------------------------------------------
# Against the reference; state layout
# --------------------------------------------------------------------------------------------


@by_config
@by_rank
def test_matches_reference(name: str, rank: int) -> None:
    transform = _build(name)
    param = _param(SHAPES[rank])
    grads = _grads(param.shape)
    reference = _reference(name)
    with torch.no_grad():
        expected = _trajectory(
            lambda g, p, s, k: reference(transform, g, p, s, k),
            param,
            transform.init_state(param),
            grads,
        )
        actual = _trajectory(transform.update, param, transform.init_state(param), grads)
    _assert_close(actual, expected)
    # The state really is carried: the last direction differs from a first step on that grad.
    first, _ = transform.update(grads[-1], param, transform.init_state(param), _step(0))
    assert not torch.allclose(first, actual[-1][0])


@by_config
@pytest.mark.parametrize("rank", sorted(SHAPES), ids=[f"rank{r}" for r in sorted(SHAPES)])
def test_state_keeps_shapes_and_dtypes(name: str, rank: int) -> None:
    transform = _build(name)
    param = _param(SHAPES[rank])
    init = transform.init_state(param)
    assert len(transform.state_names()) == len(init)
    assert len(set(transform.state_names())) == len(init)
    layout = [(s.shape, s.dtype, s.device) for s in init]
    state = init
    with torch.no_grad():
        for k, grad in enumerate(_grads(param.shape, count=3)):
            direction, new_state = transform.update(grad, param, state, _step(k))
            assert direction.shape == grad.shape and direction.dtype == grad.dtype
            assert [(s.shape, s.dtype, s.device) for s in new_state] == layout, f"step {k}"
            state = new_state


def test_state_layout_is_documented() -> None:
    mlp = CoordinateMLP(momentum_decays=(0.5, 0.9))
    assert mlp.state_names() == [
        "momentum_0.5",
        "momentum_0.9",
        "second_moment",
        "factored_row",
        "factored_col",
    ]
    shapes = {
        (): [(), (), (), (1,), (1,)],
        (5,): [(5,), (5,), (5,), (1,), (1,)],
        (4, 3): [(4, 3), (4, 3), (4, 3), (4,), (3,)],
        (3, 2, 2, 2): [(3, 2, 2, 2)] * 3 + [(3,), (8,)],
    }
    for shape, expected in shapes.items():
        assert [tuple(s.shape) for s in mlp.init_state(torch.zeros(shape))] == expected
    lstm = CoordinateLSTM(hidden_size=7)
    assert lstm.state_names() == ["hidden_0", "cell_0", "hidden_1", "cell_1"]
    assert [tuple(s.shape) for s in lstm.init_state(torch.zeros(3, 2, 2))] == [(12, 7)] * 4
    assert [tuple(s.shape) for s in lstm.init_state(torch.zeros(()))] == [(1, 7)] * 4
    assert len(CoordinateMLP().feature_names()) == 18


def test_update_does_not_write_its_inputs() -> None:
    for name in ("mlp", "lstm"):
        transform = _build(name)
        param = _param((4, 3))
        state = transform.init_state(param)
        with torch.no_grad():
            for k, grad in enumerate(_grads(param.shape, count=2)):
                inputs = [grad.clone(), param.clone(), [s.clone() for s in state]]
                _, new_state = transform.update(grad, param, state, _step(k))
                torch.testing.assert_close([grad, param, state], inputs, atol=0, rtol=0)
                state = new_state


# --------------------------------------------------------------------------------------------
# TorchScript, torch.export, torch.compile
# --------------------------------------------------------------------------------------------


def _script(transform: Transform) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        return torch.jit.script(transform)


@by_config
def test_script_and_export_match_eager(name: str) -> None:
    transform = _build(name)
    scripted = _script(transform)  # one scripted module serves every rank
    for rank in RANKS:
        param = _param(SHAPES[rank])
        grads = _grads(param.shape, count=3)
        with torch.no_grad():
            expected = _trajectory(transform.update, param, transform.init_state(param), grads)
            torch.testing.assert_close(scripted.init_state(param), transform.init_state(param))
            actual = _trajectory(scripted.update, param, scripted.init_state(param), grads)
            _assert_close(actual, expected)
            torch.testing.assert_close(scripted(grads[0]), transform(grads[0]), **TOLERANCE)

        example = (grads[0], param, transform.init_state(param), _step(0))
        exported = torch.export.export(UpdateFunction(transform), example).module()
        with torch.no_grad():
            actual = _trajectory(exported, param, transform.init_state(param), grads)
        _assert_close(actual, expected)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_compiled(transform: Transform, param: Tensor, backend) -> int:
    """Two steps of the compiled update (grad disabled, as a frozen step runs); the second must
    reuse the first graph. Returns the number of graphs compiled."""
    grads = _grads(param.shape, count=2)

    def update(grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor):
        return transform.update(grad, param, state, step)

    compiled = torch.compile(update, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected = _trajectory(transform.update, param, transform.init_state(param), grads)
        first = compiled(grads[0], param, transform.init_state(param), _step(0))
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = compiled(grads[1], param, first[1], _step(1))
    _assert_close([(first[0], list(first[1])), (second[0], list(second[1]))], expected)
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(update.__code__))


@by_config
@by_rank
def test_compile_fullgraph_no_recompile(name: str, rank: int, fresh_dynamo) -> None:
    counter = torch._dynamo.testing.CompileCounter()
    entries = _check_compiled(_build(name), _param(SHAPES[rank]), counter)
    assert counter.frame_count == 1 and entries == 1, (counter.frame_count, entries)


def test_compile_inductor(fresh_dynamo) -> None:
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    entries = _check_compiled(_build("mlp"), _param(SHAPES[2]), counter)
    assert counter.frame_count == 1 and entries == 1, (counter.frame_count, entries)


# --------------------------------------------------------------------------------------------
# Shape-agnostic: one instance for every parameter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_one_instance_shared_by_every_shape(name: str) -> None:
    """Interleaved steps on parameters of every rank equal separate runs of private copies."""
    shared = _build(name)
    params = [_param(SHAPES[r], seed=r) for r in sorted(SHAPES)]
    grads = [_grads(p.shape, count=3, seed=10 + i) for i, p in enumerate(params)]
    states = [shared.init_state(p) for p in params]
    directions: List[List[Tensor]] = [[] for _ in params]
    with torch.no_grad():
        for k in range(3):
            for i, p in enumerate(params):
                d, states[i] = shared.update(grads[i][k], p, states[i], _step(k))
                directions[i].append(d)
        for i, p in enumerate(params):
            private = copy.deepcopy(shared)
            expected = _trajectory(private.update, p, private.init_state(p), grads[i])
            torch.testing.assert_close(directions[i], [d for d, _ in expected], atol=0, rtol=0)


def test_shared_instance_in_learnable_optimizer() -> None:
    from compiledopt.optim import LearnableOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 1))
    shared = CoordinateMLP()
    metaopt = LearnableOptimizer(model, shared, lr=1.0)
    assert all(t is shared for t in metaopt.transforms)
    assert len(list(metaopt.parameters())) == len(list(shared.parameters()))
    x = torch.randn(4, 2, 4, 4)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        metaopt.zero_grad()
        model(x).square().mean().backward()
        metaopt.step()
    moved = [(p.detach() - b).abs().max() for p, b in zip(model.parameters(), before)]
    assert all(0 < m < 0.01 for m in moved), moved
    assert all(w.grad is not None for w in shared.parameters())


# --------------------------------------------------------------------------------------------
# Meta-gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "perturb"),
    [("mlp", 0.0), ("mlp", 0.1), ("mlp_deep_subset", 0.1), ("mlp_no_time", 0.0), ("lstm", 0.0)],
)
def test_metagradient_reaches_every_weight(name: str, perturb: float) -> None:
    """∇φ L(p − lr·T_φ(g)) after a warm-up step (so the LSTM's recurrent weights see a non-zero
    hidden state); every weight gets a gradient, and none is zero everywhere."""
    transform = _build(name, perturb=perturb)
    param = _param((4, 3))
    target = _param((4, 3), seed=5)
    grads = _grads(param.shape, count=2)
    with torch.no_grad():
        _, state = transform.update(grads[0], param, transform.init_state(param), _step(0))
    direction, _ = transform.update(grads[1], param, state, _step(1))
    loss = (param - 0.5 * direction - target).square().sum()
    names = [n for n, _ in transform.named_parameters()]
    meta = torch.autograd.grad(loss, list(transform.parameters()), allow_unused=True)
    assert all(g is not None for g in meta), [n for n, g in zip(names, meta) if g is None]
    zero = [n for n, g in zip(names, meta) if not bool(g.abs().max() > 0)]
    assert not zero, f"zero meta-gradient for {zero}"


# --------------------------------------------------------------------------------------------
# The untrained CoordinateMLP is a sensible optimizer
# --------------------------------------------------------------------------------------------


def test_fresh_mlp_is_normalised_adam() -> None:
    """init="adam": direction = step_mult · m₀.₉ · rsqrt(v + ε), normalised per tensor."""
    transform = CoordinateMLP().to(DTYPE)
    param = _param((4, 3))
    state = transform.init_state(param)
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    with torch.no_grad():
        for k, grad in enumerate(_grads(param.shape)):
            direction, state = transform.update(grad, param, state, _step(k))
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            x = m / torch.sqrt(v + 1e-8)
            expected = 0.001 * x / torch.sqrt((x**2).mean() + 1e-10)
            torch.testing.assert_close(direction, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("init", ["adam", "sgd"])
def test_fresh_mlp_reduces_a_quadratic(init: str) -> None:
    """20 steps of an untrained CoordinateMLP (float32, default weights) on an ill-conditioned
    quadratic over a matrix and a bias. lr=20 makes the per-step move 0.02 (step_mult = 0.001)."""
    torch.manual_seed(0)
    transform = CoordinateMLP(init=init)
    params = [torch.randn(8, 4), torch.randn(4)]
    targets = [torch.randn(8, 4), torch.randn(4)]
    curvature = [torch.rand(8, 4) * 4 + 0.1, torch.rand(4) * 4 + 0.1]

    def loss_of(ps: List[Tensor]) -> Tensor:
        return sum(0.5 * (a * (p - c) ** 2).sum() for p, c, a in zip(ps, targets, curvature))

    states = [transform.init_state(p) for p in params]
    losses = [float(loss_of(params))]
    with torch.no_grad():
        for k in range(20):
            new = []
            for i, p in enumerate(params):
                grad = curvature[i] * (p - targets[i])
                direction, states[i] = transform.update(grad, p, states[i], _step(k))
                new.append(p - 20.0 * direction)
            params = new
            losses.append(float(loss_of(params)))
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

BAD_MLP = [
    ({"hidden_sizes": ()}, "Invalid hidden_sizes: ()"),
    ({"hidden_sizes": (8, 0)}, "Invalid hidden_sizes: (8, 0)"),
    ({"hidden_sizes": 8}, "Invalid hidden_sizes: 8"),
    ({"hidden_sizes": (1,)}, "Invalid hidden_sizes: (1,)"),
    ({"momentum_decays": (0.9, -0.1)}, "Invalid momentum_decays entry: -0.1"),
    ({"momentum_decays": (1.0,)}, "Invalid momentum_decays entry: 1.0"),
    ({"momentum_decays": (0.9, 0.9)}, "Invalid momentum_decays: (0.9, 0.9)"),
    ({"momentum_decays": ()}, "Invalid momentum_decays: ()"),
    ({"second_moment_decay": 1.5}, "Invalid second_moment_decay: 1.5"),
    ({"second_moment_decay": -0.5}, "Invalid second_moment_decay: -0.5"),
    ({"features": ("grad", "curvature")}, "Invalid features: ('grad', 'curvature')"),
    ({"features": ()}, "Invalid features: ()"),
    ({"timescales": (10.0, 0.0)}, "Invalid timescales entry: 0.0"),
    ({"timescales": (10.0, 10)}, "Invalid timescales: (10.0, 10)"),
    ({"step_mult": 0.0}, "Invalid step_mult: 0.0"),
    ({"step_mult": math.nan}, "Invalid step_mult: nan"),
    ({"exp_mult": math.inf}, "Invalid exp_mult: inf"),
    ({"eps": -1e-8}, "Invalid eps: -1e-08"),
    ({"init": "zeros"}, "Invalid init: 'zeros'"),
    ({"init": "adam", "features": ("grad", "time")}, "Invalid init: 'adam'"),
]
BAD_LSTM = [
    ({"hidden_size": 0}, "Invalid hidden_size: 0"),
    ({"hidden_size": 2.5}, "Invalid hidden_size: 2.5"),
    ({"preprocess_p": -10.0}, "Invalid preprocess_p: -10.0"),
    ({"output_scale": math.nan}, "Invalid output_scale: nan"),
    ({"preprocess": "yes"}, "Invalid preprocess: 'yes'"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [(CoordinateMLP, k, m) for k, m in BAD_MLP] + [(CoordinateLSTM, k, m) for k, m in BAD_LSTM],
    ids=[m for _, m in BAD_MLP + BAD_LSTM],
)
def test_bad_constructor_arguments(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**kwargs)


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_wrong_gradient_shape_or_state_raises(name: str) -> None:
    transform = _build(name)
    param = _param((4, 3))
    state = transform.init_state(param)
    for bad in [(4, 3, 1), (3, 4), (12,)]:
        with pytest.raises(ValueError, match=re.escape(f"gradient of shape {list(bad)}")):
            transform.update(torch.ones(bad, dtype=DTYPE), param, state, _step(0))
    with pytest.raises(ValueError, match=f"state of {len(state)} tensors, got {len(state) - 1}"):
        transform.update(torch.ones(4, 3, dtype=DTYPE), param, state[:-1], _step(0))
