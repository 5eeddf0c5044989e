"""Learnable step sizes: each rule against a readable float64 reference, its meta-gradients, its
behaviour on simple streams, and TorchScript / torch.compile / torch.export against eager."""

import functools
import itertools
import math
import re
import warnings
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from registry import SHAPES
from torch import Tensor, nn

import compiledopt as co
from compiledopt.learned.step_sizes import IDBD, HypergradientDescent, LearnedStepSize
from compiledopt.transforms import UpdateFunction
from compiledopt.transforms.baselines import SGD

DTYPE = torch.float64
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
EXACT = {"atol": 1e-12, "rtol": 1e-10}
RANKS = (0, 1, 2, 4)
LR = 0.3


def _grads(shape, count: int, seed: int = 1, scale: float = 1.0) -> List[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=generator, dtype=DTYPE) for _ in range(count)]


def _directions(transform, param: Tensor, grads: List[Tensor]) -> Tuple[List[Tensor], List]:
    """Directions of ``transform.update`` over ``grads`` (state carried), and the last state."""
    state = transform.init_state(param)
    out = []
    for t, grad in enumerate(grads):
        direction, state = transform.update(grad, param, state, torch.tensor(t))
        out.append(direction)
    return out, state


def _assert_all_close(actual: List[Tensor], expected: List[Tensor], tolerance: Dict) -> None:
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m, t=t: f"step {t}: {m}")


# --------------------------------------------------------------------------------------------
# Readable references (the published recursions, with the step size itself as the state)
# --------------------------------------------------------------------------------------------


def hd_reference(grads: List[Tensor], alpha0: float, beta: float, per_element: bool):
    """Baydin et al.'s SGD-HD: α_t = α_{t−1} + β g_t·g_{t−1}, direction α_t g_t."""
    alpha = torch.full(grads[0].shape if per_element else (), alpha0, dtype=DTYPE)
    previous = torch.zeros_like(grads[0])
    directions, alphas = [], []
    for grad in grads:
        alignment = grad * previous if per_element else (grad * previous).sum()
        alpha = alpha + beta * alignment
        directions.append(alpha * grad)
        alphas.append(alpha)
        previous = grad
    return directions, alphas


def idbd_reference(grads: List[Tensor], log_alpha0: float, theta: float):
    """Sutton's IDBD with δx_i → −g_i and x_i² → g_i²; also reports whether the clamp acted."""
    beta = torch.full(grads[0].shape, log_alpha0, dtype=DTYPE)
    h = torch.zeros_like(grads[0])
    directions, clamped = [], False
    for grad in grads:
        beta = beta - theta * grad * h
        alpha = torch.exp(beta)
        directions.append(alpha * grad)
        decay = 1.0 - alpha * grad**2
        clamped = clamped or bool((decay < 0).any())
        h = h * decay.clamp(min=0.0) - alpha * grad
    return directions, clamped


@pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])
def test_learned_step_size_matches_reference(rank: int) -> None:
    param = torch.randn(SHAPES[rank], dtype=DTYPE)
    grads = _grads(param.shape, 10)
    shared = LearnedStepSize(0.3).to(DTYPE)
    per_element = LearnedStepSize.per_element(param, 0.3)
    with torch.no_grad():
        per_element.log_lr.add_(0.2 * torch.randn(param.shape, dtype=DTYPE))
    for transform in (shared, per_element):
        expected = [transform.log_lr.detach().exp() * g for g in grads]
        _assert_all_close(_directions(transform, param, grads)[0], expected, EXACT)
    assert shared.log_lr.shape == () and per_element.log_lr.shape == param.shape


@pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])
@pytest.mark.parametrize("per_element", [False, True], ids=["per_tensor", "per_element"])
def test_hypergradient_descent_matches_reference(rank: int, per_element: bool) -> None:
    param = torch.randn(SHAPES[rank], dtype=DTYPE)
    grads = _grads(param.shape, 12)
    transform = HypergradientDescent(0.2, 0.05, per_element).to(DTYPE)
    directions, state = _directions(transform, param, grads)
    # The weights were rounded to float32 before .to(DTYPE): read them back.
    alpha0, beta = transform.log_lr.exp().item(), transform.log_hyper_lr.exp().item()
    expected, alphas = hd_reference(grads, alpha0, beta, per_element)
    _assert_all_close(directions, expected, EXACT)
    torch.testing.assert_close(transform.step_size(state), alphas[-1], **EXACT)


@pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])
def test_idbd_matches_reference(rank: int) -> None:
    param = torch.randn(SHAPES[rank], dtype=DTYPE)
    grads = _grads(param.shape, 12, scale=2.0)
    transform = IDBD(0.5, 0.05).to(DTYPE)
    log_alpha0, theta = transform.log_lr.item(), transform.log_meta_lr.exp().item()
    expected, clamped = idbd_reference(grads, log_alpha0, theta)
    assert clamped, "the positive-part clamp never acted: the reference would not test it"
    _assert_all_close(_directions(transform, param, grads)[0], expected, EXACT)


# --------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------


def _alphas(transform: HypergradientDescent, grads: List[Tensor]) -> List[Tensor]:
    state = transform.init_state(grads[0])
    alphas = [transform.step_size(state)]
    for t, grad in enumerate(grads):
        _, state = transform.update(grad, grad, state, torch.tensor(t))
        alphas.append(transform.step_size(state))
    return alphas


def test_hd_step_size_follows_gradient_alignment() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    transform = HypergradientDescent(0.1, 0.01).to(DTYPE)
    aligned = _alphas(transform, [g, 0.5 * g, 2.0 * g, g])
    opposed = _alphas(transform, [g, -g, 0.5 * g, -2.0 * g])
    # The first step has no previous gradient: α stays at α_0.
    assert aligned[1] == aligned[0] == opposed[1]
    assert all(b > a for a, b in itertools.pairwise(aligned[1:])), aligned
    assert all(b < a for a, b in itertools.pairwise(opposed[1:])), opposed

    per_element = HypergradientDescent(0.1, 0.01, per_element=True).to(DTYPE)
    flip = torch.tensor([1.0, -1.0, 1.0], dtype=DTYPE)  # element 1 opposes, 0 and 2 align
    alpha = _alphas(per_element, [g, flip * g, g])[-1]
    assert alpha[0] > 0.1 and alpha[2] > 0.1 and alpha[1] < 0.1, alpha


def _linear_regression_losses(transform, lr: float, steps: int = 300) -> Tensor:
    """Noiseless LMS stream y = w*·x with loss ½δ²; the loop applies ``w -= lr * direction``."""
    generator = torch.Generator().manual_seed(0)
    n = 20
    w_star = torch.randn(n, generator=generator, dtype=DTYPE)
    xs = torch.randn(steps, n, generator=generator, dtype=DTYPE)
    w = torch.zeros(n, dtype=DTYPE)
    state = transform.init_state(w)
    losses = []
    for t, x in enumerate(xs):
        delta = (w_star - w) @ x
        losses.append(0.5 * delta**2)
        direction, state = transform.update(-delta * x, w, state, torch.tensor(t))
        w = w - lr * direction
    return torch.stack(losses)


def test_idbd_beats_sgd_on_noiseless_linear_regression() -> None:
    step = 0.01
    with torch.no_grad():
        sgd = _linear_regression_losses(SGD(), lr=step)
        idbd = _linear_regression_losses(IDBD(step, 0.1).to(DTYPE), lr=1.0)
    assert idbd.mean() < 0.9 * sgd.mean(), (idbd.mean(), sgd.mean())
    assert idbd[-50:].mean() < 0.5 * sgd[-50:].mean(), (idbd[-50:].mean(), sgd[-50:].mean())


# --------------------------------------------------------------------------------------------
# Meta-gradients under LearnableOptimizer
# --------------------------------------------------------------------------------------------


class _Model(nn.Module):
    """Parameters of ranks 0, 1, 2 and 4 in one non-quadratic loss."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.params = nn.ParameterList(
            [nn.Parameter(torch.randn(SHAPES[r], generator=generator, dtype=DTYPE)) for r in RANKS]
        )

    def loss(self, k: float) -> Tensor:
        return sum(((p - k) ** 2).sum() + (torch.sin(p) ** 3).sum() for p in self.params)


def _run(transform, steps: int = 1):
    """``steps`` optimizer steps, then one more backward; every step's gradients, per param."""
    model = _Model()
    metaopt = co.optim.LearnableOptimizer(model, transform, lr=LR)
    grads = []
    for t in range(steps + 1):
        metaopt.zero_grad()
        for w in metaopt.parameters():
            w.grad = None
        model.loss(0.5 * t).backward()
        grads.append([p.grad.detach().clone() for p in model.params])
        if t < steps:
            metaopt.step()
    return metaopt, grads


def test_learned_step_size_per_element_meta_gradient_closed_form() -> None:
    """θ_{t+1} = θ_t − lr e^{log α} g_t, so ∂L_{t+1}/∂log α = −lr g_{t+1} g_t e^{log α}."""

    def factory(param: Tensor) -> LearnedStepSize:
        transform = LearnedStepSize.per_element(param, 0.1)
        with torch.no_grad():
            transform.log_lr.add_(0.3 * torch.randn(param.shape, dtype=param.dtype))
        return transform

    metaopt, grads = _run(factory)
    g_t, g_next = grads
    for transform, a, b in zip(metaopt.transforms, g_t, g_next):
        expected = -LR * b * a * transform.log_lr.detach().exp()
        torch.testing.assert_close(transform.log_lr.grad, expected, **EXACT)


def test_learned_step_size_shared_meta_gradient_sums_over_parameters() -> None:
    shared = LearnedStepSize(0.1).to(DTYPE)
    _, (g_t, g_next) = _run(shared)
    step_size = shared.log_lr.detach().exp()  # 0.1 rounded to float32 by construction
    expected = -LR * sum((a * b).sum() for a, b in zip(g_t, g_next)) * step_size
    torch.testing.assert_close(shared.log_lr.grad, expected, **EXACT)


def test_hd_meta_gradient_reaches_both_weights_closed_form() -> None:
    """direction = (α_0 − β H_t) g_t with the state H_t constant: the one-step meta-gradients are
    ∂/∂log α_0 = −lr α_0 (g_{t+1}·g_t) and ∂/∂log β = lr β H_t (g_{t+1}·g_t), summed over the
    parameters sharing the transform."""
    hd = HypergradientDescent(0.1, 0.01).to(DTYPE)
    _, grads = _run(hd, steps=3)
    g_t, g_next = grads[-2], grads[-1]
    # H_t = −Σ_{k=1..t} g_k·g_{k−1}, per parameter, t the last step (2).
    h = [-sum((grads[k][i] * grads[k - 1][i]).sum() for k in (1, 2)) for i in range(len(RANKS))]
    dots = [(a * b).sum() for a, b in zip(g_t, g_next)]
    alpha0, beta = hd.log_lr.detach().exp(), hd.log_hyper_lr.detach().exp()
    expected_alpha0 = -LR * alpha0 * sum(dots)
    expected_beta = LR * beta * sum(d * s for d, s in zip(dots, h))
    torch.testing.assert_close(hd.log_lr.grad, expected_alpha0, **EXACT)
    torch.testing.assert_close(hd.log_hyper_lr.grad, expected_beta, **EXACT)
    assert hd.log_hyper_lr.grad.abs() > 0


def test_idbd_meta_gradient_reaches_both_weights() -> None:
    idbd = IDBD(0.1, 0.01).to(DTYPE)
    _run(idbd, steps=3)
    assert idbd.log_lr.grad.abs() > 0 and idbd.log_meta_lr.grad.abs() > 0


# --------------------------------------------------------------------------------------------
# TorchScript, torch.compile (fullgraph, no recompile on step 2) and torch.export
# --------------------------------------------------------------------------------------------


def _perturbed(transform: nn.Module, seed: int = 0) -> nn.Module:
    transform = transform.to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(0.1 * torch.randn(weight.shape, generator=generator, dtype=DTYPE))
    return transform


PATH_CASES: Dict[str, Callable[[Tensor], nn.Module]] = {
    "learned_step_size": lambda p: LearnedStepSize(0.5),
    "learned_step_size_per_element": functools.partial(LearnedStepSize.per_element, step_size=0.5),
    "hd": lambda p: HypergradientDescent(0.5, 0.1),
    "hd_per_element": lambda p: HypergradientDescent(0.5, 0.1, per_element=True),
    "idbd": lambda p: IDBD(0.5, 0.1),
}
STEPS = 3


def _trajectory(update, param: Tensor, state: List[Tensor], grads: List[Tensor]):
    out = []
    step = torch.tensor(0)
    for grad in grads:
        direction, state = update(grad, param, state, step)
        state = list(state)
        out.append((direction, state))
        step = step + 1
    return out


def _assert_trajectories_close(actual, expected) -> None:
    for t, ((d, s), (ref_d, ref_s)) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(d, ref_d, **TOLERANCE, msg=lambda m, t=t: f"step {t}: {m}")
        torch.testing.assert_close(s, ref_s, **TOLERANCE, msg=lambda m, t=t: f"step {t}: {m}")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])
@pytest.mark.parametrize("case", PATH_CASES)
def test_script_compile_export_match_eager(case: str, rank: int, fresh_dynamo) -> None:
    param = torch.randn(SHAPES[rank], dtype=DTYPE)
    transform = _perturbed(PATH_CASES[case](param))
    grads = _grads(param.shape, STEPS)
    with torch.no_grad():
        expected = _trajectory(transform.update, param, transform.init_state(param), grads)

        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
            )
            scripted = torch.jit.script(transform)
        actual = _trajectory(scripted.update, param, scripted.init_state(param), grads)
        _assert_trajectories_close(actual, expected)

        torch.testing.assert_close(scripted(grads[0]), transform(grads[0]), **TOLERANCE)

        def update(grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor):
            return transform.update(grad, param, state, step)

        counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
        compiled = torch.compile(update, backend=counter, fullgraph=True)
        state, step = transform.init_state(param), torch.tensor(0)
        actual, frames = [], 0
        for k, grad in enumerate(grads):
            # A fresh gradient, the new state and the next step count must reuse the graph.
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                direction, state = compiled(grad, param, state, step)
            if k == 0:
                frames = counter.frame_count
            actual.append((direction, list(state)))
            step = step + 1
        assert frames >= 1, "nothing was compiled"
        assert counter.frame_count == frames, f"recompiled: {frames} -> {counter.frame_count}"
        _assert_trajectories_close(actual, expected)

    program = torch.export.export(
        UpdateFunction(transform), (grads[0], param, transform.init_state(param), torch.tensor(0))
    )
    exported = _trajectory(program.module(), param, transform.init_state(param), grads)
    _assert_trajectories_close(exported, expected)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_gradient_of_wrong_shape() -> None:
    param = torch.zeros(4, 3, dtype=DTYPE)
    bound = LearnedStepSize.per_element(param)
    with pytest.raises(ValueError, match=re.escape("gradient of shape [3, 4] given to")):
        bound(torch.zeros(3, 4, dtype=DTYPE))
    for transform in (LearnedStepSize(), HypergradientDescent(), IDBD()):
        state = transform.init_state(param)
        with pytest.raises(ValueError, match=re.escape("gradient of shape [12]")):
            transform.update(torch.zeros(12, dtype=DTYPE), param, state, torch.tensor(0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LearnedStepSize(0.0), "Invalid step_size: 0.0"),
        (lambda: LearnedStepSize(-1.0), "Invalid step_size: -1.0"),
        (lambda: LearnedStepSize(math.nan), "Invalid step_size: nan"),
        (lambda: LearnedStepSize(True), "Invalid step_size: True"),
        (lambda: LearnedStepSize(shape=(2, -1)), "Invalid shape: (2, -1)"),
        (lambda: LearnedStepSize(shape="ab"), "Invalid shape: 'ab'"),
        (
            lambda: LearnedStepSize.per_element(torch.zeros(3, dtype=torch.int64)),
            "needs a real floating-point parameter, got dtype torch.int64",
        ),
        (lambda: HypergradientDescent(math.inf), "Invalid step_size: inf"),
        (lambda: HypergradientDescent(1.0, 0.0), "Invalid hyper_lr: 0.0"),
        (lambda: HypergradientDescent(1.0, 1e-3, 1), "Invalid per_element: 1"),
        (lambda: IDBD(-0.1), "Invalid step_size: -0.1"),
        (lambda: IDBD(1.0, "0.1"), "Invalid meta_lr: '0.1'"),
    ],
)
def test_bad_hyper_parameters(make, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_state_schema() -> None:
    param = torch.zeros(4, 3, dtype=DTYPE)
    for transform in (
        LearnedStepSize(),
        LearnedStepSize.per_element(param),
        HypergradientDescent(),
        HypergradientDescent(per_element=True),
        IDBD(),
    ):
        state = transform.init_state(param)
        assert len(transform.state_names()) == len(state)
        assert not transform.reads_param
        assert all(s.dtype == param.dtype for s in state)
