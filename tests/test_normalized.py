"""NormalizedMLP: against a readable float64 reference, and the properties its design promises.

The reference below is written separately from the module: plain Python floats, one coordinate
at a time, the RMS normalisation as ``x / sqrt(mean(x²))`` and Newton–Schulz always on the left
Gram matrix with a plain Frobenius norm. The property tests check what the overflow-safe
formulation is for: finite gradients up to float32's maximum give a finite unit-RMS direction,
the direction ignores the gradient's scale, is odd in the gradient history, and a coordinate that
only ever sees zero gradients never moves.
"""

import math
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry import SHAPES
from torch import Tensor

from compiledopt.export import export_shape_agnostic, freeze_transform, load_artifact
from compiledopt.export.verify import verify_artifact
from compiledopt.learned import CATALOG, CoordinateMLP, NormalizedMLP, build_transform
from compiledopt.learned.normalized import newton_schulz, normalize
from compiledopt.learned.normalized_ops import ns_cols, ns_in_place, ns_rows
from compiledopt.transforms.base import UpdateFunction

RANKS = (0, 1, 2, 3, 4)
by_rank = pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])

CONFIGS: Dict[str, Callable[[], NormalizedMLP]] = {
    "default": NormalizedMLP,
    "harness": lambda: NormalizedMLP(hidden_sizes=(6,), orthogonalize=True, adam_vectors=True),
    "orthogonalize": lambda: NormalizedMLP(orthogonalize=True),
    "deep_clipped": lambda: NormalizedMLP(
        hidden_sizes=(4, 3, 5), fast_decay=0.5, slow_decay=0.0, abs_decay=0.9, feature_clip=0.7
    ),
}
by_config = pytest.mark.parametrize("name", list(CONFIGS))


def _build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> NormalizedMLP:
    """The configuration with every weight moved off its init, so every unit matters."""
    torch.manual_seed(seed)
    transform = CONFIGS[name]().to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in transform.parameters():
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
            weight.add_(0.5 * noise.to(dtype))
    return transform


def _grads(
    shape: Sequence[int], count: int, dtype: torch.dtype = torch.float64, seed: int = 1
) -> List[Tensor]:
    """Gradients over six orders of magnitude, with an exact zero where there is room."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        g = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
        exponent = torch.empty(tuple(shape), dtype=torch.float64)
        g = g * 10.0 ** exponent.uniform_(-4.0, 2.0, generator=generator)
        if g.numel() > 2:
            g.view(-1)[1] = 0.0
        out.append(g.to(dtype))
    return out


def _run(update, param: Tensor, state: List[Tensor], grads: Sequence[Tensor]):
    """``(direction, state)`` after each gradient, the state carried."""
    out = []
    for k, grad in enumerate(grads):
        direction, state = update(grad, param, state, torch.tensor(k))
        state = list(state)
        out.append((direction, state))
    return out


def _assert_runs_close(actual, expected, **tolerance) -> None:
    for k, ((d, state), (ref_d, ref_state)) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(d, ref_d, **tolerance, msg=lambda m, k=k: f"step {k}: {m}")
        for i, (s, ref) in enumerate(zip(state, ref_state, strict=True)):
            torch.testing.assert_close(
                s, ref, **tolerance, msg=lambda m, k=k, i=i: f"step {k} state {i}: {m}"
            )


def _rms(x: Tensor) -> float:
    return float(x.detach().double().square().mean().sqrt())


# --------------------------------------------------------------------------------------------
# The readable reference (float64, one coordinate at a time)
# --------------------------------------------------------------------------------------------


def _rms_normalize(values: List[float]) -> List[float]:
    rms = math.sqrt(sum(v * v for v in values) / len(values))
    return [v / rms if rms > 0 else 0.0 for v in values]


def _reference_newton_schulz(rows: List[List[float]]) -> List[List[float]]:
    """Five quintic steps on the left Gram matrix ``XXᵀ``, whichever side is smaller."""
    x = torch.tensor(rows, dtype=torch.float64)
    norm = math.sqrt(sum(v * v for row in rows for v in row))
    x = x / norm if norm > 0 else x
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * (a @ x) + 2.0315 * (a @ a @ x)
    return x.tolist()


def reference(
    t: NormalizedMLP, grad: Tensor, state: List[Tensor], step: int
) -> Tuple[Tensor, List[Tensor]]:
    b1, b2, b3 = t.fast_decay, t.slow_decay, t.abs_decay
    g = grad.double().reshape(-1).tolist()
    m1, m2, a = (s.double().reshape(-1).tolist() for s in state)
    m1 = [b1 * m + (1 - b1) * x for m, x in zip(m1, g)]
    m2 = [b2 * m + (1 - b2) * x for m, x in zip(m2, g)]
    a = [b3 * v + (1 - b3) * abs(x) for v, x in zip(a, g)]
    c1, c2, c3 = (1 - b ** (step + 1) for b in (b1, b2, b3))
    r1 = [m / (v + t.eps) * c3 / c1 for m, v in zip(m1, a)]
    r2 = [m / (v + t.eps) * c3 / c2 for m, v in zip(m2, a)]
    r0 = [x / (v + t.eps) * c3 for x, v in zip(g, a)]
    ng, nm = _rms_normalize(g), _rms_normalize(m1)

    def clip(v: float) -> float:
        return max(-t.feature_clip, min(t.feature_clip, v))

    layers = [layer.weight.double().tolist() for layer in t.layers]
    head = t.head.weight.double()[0].tolist()
    skip = t.skip.double().tolist()
    out = []
    for i in range(len(g)):
        x = [clip(r1[i]), clip(r2[i]), clip(r0[i]), clip(ng[i]), clip(nm[i])]
        h = x
        for w in layers:
            h = [math.tanh(sum(row[f] * h[f] for f in range(len(h)))) for row in w]
        out.append(sum(s * v for s, v in zip(skip, x)) + sum(w * v for w, v in zip(head, h)))

    if t.adam_vectors and grad.dim() <= 1:
        direction = [clip(v) for v in r1]
    else:
        if t.orthogonalize and grad.dim() >= 2:
            cols = len(out) // grad.shape[0]
            rows = [out[r * cols : (r + 1) * cols] for r in range(grad.shape[0])]
            out = [v for row in _reference_newton_schulz(rows) for v in row]
        direction = _rms_normalize(out)

    def as_tensor(values: List[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float64).reshape(grad.shape)

    return as_tensor(direction), [as_tensor(m1), as_tensor(m2), as_tensor(a)]


@by_config
@by_rank
def test_matches_reference_over_steps(name: str, rank: int) -> None:
    t = _build(name)
    param = torch.randn(SHAPES[rank], dtype=torch.float64)
    grads = _grads(param.shape, 5)
    actual = _run(t.update, param, t.init_state(param), grads)
    expected, state = [], t.init_state(param)
    with torch.no_grad():
        for k, grad in enumerate(grads):
            direction, state = reference(t, grad, state, k)
            expected.append((direction, state))
    _assert_runs_close(actual, expected, atol=1e-9, rtol=1e-7)


def test_reference_is_sensitive_to_every_part() -> None:
    """The comparison above can fail: a changed weight, decay or clip changes the direction."""
    t = _build("deep_clipped")
    param = torch.randn(4, 3, dtype=torch.float64)
    grads = _grads(param.shape, 3)
    base = _run(t.update, param, t.init_state(param), grads)[-1][0]
    for change in ("weight", "decay", "clip"):
        other = _build("deep_clipped")
        with torch.no_grad():
            if change == "weight":
                other.layers[1].weight[0, 0] += 0.1
            elif change == "decay":
                other.abs_decay = 0.95
            else:
                other.feature_clip = 0.6
        moved = _run(other.update, param, other.init_state(param), grads)[-1][0]
        assert (moved - base).abs().max() > 1e-6, change


# --------------------------------------------------------------------------------------------
# Zero history, overflow safety, scale invariance, unit RMS, oddness
# --------------------------------------------------------------------------------------------


@by_config
@by_rank
def test_zero_gradients_give_exactly_zero(name: str, rank: int) -> None:
    t = _build(name, torch.float32)
    param = torch.randn(SHAPES[rank])
    zeros = [torch.zeros(param.shape) for _ in range(4)]
    for direction, state in _run(t.update, param, t.init_state(param), zeros):
        assert torch.equal(direction, torch.zeros_like(direction))
        assert all(torch.equal(s, torch.zeros_like(s)) for s in state)


@pytest.mark.parametrize("name", ["default", "deep_clipped"])
def test_a_coordinate_without_gradient_never_moves(name: str) -> None:
    t = _build(name, torch.float32)
    param = torch.randn(6, 5)
    start = param.clone()
    state = t.init_state(param)
    generator = torch.Generator().manual_seed(0)
    for k in range(200):
        grad = torch.randn(param.shape, generator=generator) * 10.0 ** (k % 7 - 3)
        grad[2, 3] = 0.0
        direction, state = t.update(grad, param, state, torch.tensor(k))
        assert direction[2, 3] == 0.0 and direction.abs().max() > 0
        param = param - 1e-2 * direction
    assert param[2, 3] == start[2, 3]
    assert (param - start).abs().sum() > 1.0  # everything else moved


_SHAPES = [(), (1,), (7,), (3, 4), (5, 2), (2, 3, 2)]
_MAGNITUDES = st.floats(min_value=-30.0, max_value=math.log10(3e38)).map(lambda e: 10.0**e)
_ELEMENTS = st.one_of(st.just(0.0), _MAGNITUDES, _MAGNITUDES.map(lambda v: -v))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(["default", "harness"]))
def test_extreme_gradients_stay_finite_with_unit_rms(data, name: str) -> None:
    t = _build(name, torch.float32)
    shape = data.draw(st.sampled_from(_SHAPES))
    steps = data.draw(st.integers(3, 5))
    numel = math.prod(shape)
    param = torch.zeros(shape)
    state = t.init_state(param)
    seen = torch.zeros(shape, dtype=torch.bool)
    for k in range(steps):
        values = data.draw(st.lists(_ELEMENTS, min_size=numel, max_size=numel))
        grad = torch.tensor(values, dtype=torch.float32).reshape(shape)
        assert torch.isfinite(grad).all()
        seen |= grad != 0
        direction, state = t.update(grad, param, state, torch.tensor(k))
        assert torch.isfinite(direction).all(), (k, grad, direction)
        assert all(torch.isfinite(s).all() for s in state)
        assert direction.dtype == torch.float32
        if t.adam_vectors and len(shape) <= 1:
            assert direction.abs().max() <= t.feature_clip
            assert torch.equal(direction == 0, ~seen) or (direction[seen] != 0).any()
        elif seen.any():
            assert _rms(direction) == pytest.approx(1.0, rel=1e-4)
        else:
            assert torch.equal(direction, torch.zeros_like(direction))


def test_float32_extremes_in_one_tensor() -> None:
    t = _build("default", torch.float32)
    grad = torch.tensor([3e38, -3e38, 1e-30, -1e-30, 0.0, 1.0])
    param = torch.zeros(6)
    state = t.init_state(param)
    for k in range(4):
        direction, state = t.update(grad, param, state, torch.tensor(k))
        assert torch.isfinite(direction).all() and all(torch.isfinite(s).all() for s in state)
        assert _rms(direction) == pytest.approx(1.0, rel=1e-5)
        assert direction[4] == 0.0
    # Decays that allow a ratio to overflow (β₁ > β₃): ±inf is clamped, never NaN.
    loose = NormalizedMLP(fast_decay=0.999, abs_decay=0.0)
    state = loose.init_state(grad)
    for k, scale in enumerate([1.0, 0.0, 0.0]):
        direction, state = loose.update(grad * scale, param, state, torch.tensor(k))
        assert torch.isfinite(direction).all() and _rms(direction) == pytest.approx(1.0, rel=1e-5)
    # Gradients of 1e-30 give ratios within ε/a = 1e-37/1e-33 = 1e-4 of exact (r₁ = sign(g) on
    # the first step), and exact to float32 rounding from 1e-27 up.
    fresh = NormalizedMLP(init="zero_mlp")
    for size, tolerance in ((1e-30, 1.1e-4), (1e-27, 1e-6)):
        tiny = torch.tensor([1.0, -1.0, 2.0]) * size
        direction, _ = fresh.update(tiny, tiny, fresh.init_state(tiny), torch.tensor(0))
        torch.testing.assert_close(
            direction, torch.tensor([1.0, -1.0, 1.0]), rtol=tolerance, atol=0
        )


@pytest.mark.parametrize("scale", [1e-20, 1e20], ids=["1e-20", "1e20"])
@pytest.mark.parametrize("name", ["default", "orthogonalize", "deep_clipped"])
@by_rank
def test_direction_ignores_the_gradient_scale(name: str, rank: int, scale: float) -> None:
    t = _build(name, torch.float32)
    param = torch.randn(SHAPES[rank])
    grads = _grads(param.shape, 4, torch.float32)
    plain = _run(t.update, param, t.init_state(param), grads)
    scaled = _run(t.update, param, t.init_state(param), [g * scale for g in grads])
    # Newton–Schulz amplifies float32 rounding of its input (up to a³ ≈ 480 on small singular
    # values), so the orthogonalised direction agrees to a looser tolerance.
    tolerance = 1e-4 if t.orthogonalize else 1e-5
    for (d, _), (ds, _) in zip(plain, scaled):
        torch.testing.assert_close(ds, d, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", ["default", "orthogonalize", "deep_clipped"])
@by_rank
def test_direction_has_unit_rms(name: str, rank: int) -> None:
    t = _build(name, torch.float32)
    param = torch.randn(SHAPES[rank])
    for direction, _ in _run(t.update, param, t.init_state(param), _grads(param.shape, 4)):
        assert _rms(direction) == pytest.approx(1.0, rel=1e-5)


@by_rank
def test_fresh_zero_mlp_is_the_normalized_adam_like_direction(rank: int) -> None:
    t = NormalizedMLP(init="zero_mlp").double()
    param = torch.randn(SHAPES[rank], dtype=torch.float64)
    state = t.init_state(param)
    m, a = torch.zeros_like(param), torch.zeros_like(param)
    for k, grad in enumerate(_grads(param.shape, 4)):
        direction, state = t.update(grad, param, state, torch.tensor(k))
        m = 0.9 * m + 0.1 * grad
        a = 0.999 * a + 0.001 * grad.abs()
        r1 = m / (a + 1e-37) * (1 - 0.999 ** (k + 1)) / (1 - 0.9 ** (k + 1))
        expected = r1.clamp(-10, 10)
        expected = expected / expected.square().mean().sqrt()
        torch.testing.assert_close(direction, expected, atol=1e-12, rtol=1e-10)
    with torch.no_grad():  # the default init's head is small but not zero
        assert NormalizedMLP().head.weight.abs().max() > 0


@by_config
@by_rank
def test_negated_history_negates_the_direction(name: str, rank: int) -> None:
    t = _build(name, torch.float32)
    param = torch.randn(SHAPES[rank])
    grads = _grads(param.shape, 4, torch.float32)
    plain = _run(t.update, param, t.init_state(param), grads)
    negated = _run(t.update, param, t.init_state(param), [-g for g in grads])
    for (d, state), (dn, state_n) in zip(plain, negated):
        torch.testing.assert_close(dn, -d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state_n[2], state[2], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Harness options
# --------------------------------------------------------------------------------------------


def _singular_ratio(matrix: Tensor) -> float:
    values = torch.linalg.svdvals(matrix.detach().double())
    return float(values.max() / values.min())


@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_newton_schulz_equalises_singular_values(tall: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(16, 8, generator=generator) * torch.logspace(0, 1, 8) * 1e30
    matrix = matrix if tall else matrix.T
    assert _singular_ratio(matrix) > 10
    out = newton_schulz(matrix)
    assert out.shape == matrix.shape
    assert torch.isfinite(out).all() and _singular_ratio(out) < 2
    torch.testing.assert_close(newton_schulz(-matrix), -out)
    torch.testing.assert_close(newton_schulz(matrix.T), out.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(newton_schulz(torch.zeros(matrix.shape)), torch.zeros(matrix.shape))


@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("chunk", [1, 7, 100, 10_000])
def test_newton_schulz_steps_in_place_equal_the_allocating_ones(side: str, chunk: int) -> None:
    # The blocked path iterates in the matrix itself, a chunk of columns (rows) at a time: the
    # same values as the allocating form up to the order of float32 sums, both within float32
    # rounding of a float64 reference written as the polynomial reads, aX + (bA + cA^2)X with
    # A = XX^T (or XB + ... on columns).
    ns = ns_rows if side == "rows" else ns_cols
    generator = torch.Generator().manual_seed(3)
    shape = (12, 30) if side == "rows" else (30, 12)  # (not long enough for the Gram side)
    x = torch.randn(shape, generator=generator)
    x = x / x.square().sum().sqrt()
    expected = ns(x.clone(), 5)
    matrix = x.clone()
    actual = ns_in_place(matrix, 5, chunk)
    assert actual.data_ptr() == matrix.data_ptr()  # no new matrix
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    y = x.double()
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        if side == "rows":
            gram = y @ y.T
            y = a * y + (b * gram + c * gram @ gram) @ y
        else:
            gram = y.T @ y
            y = a * y + y @ (b * gram + c * gram @ gram)
    torch.testing.assert_close(actual.double(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (4, 2, 3, 3)], ids=str)
def test_orthogonalized_direction(shape: Tuple[int, ...]) -> None:
    t = _build("orthogonalize", torch.float32)
    plain = _build("default", torch.float32)
    param = torch.randn(shape)
    grads = _grads(shape, 3, torch.float32)
    out = _run(t.update, param, t.init_state(param), grads)
    ref = _run(plain.update, param, plain.init_state(param), grads)
    negated = _run(t.update, param, t.init_state(param), [-g for g in grads])
    for (d, _), (d_plain, _), (dn, _) in zip(out, ref, negated):
        matrix = d.reshape(shape[0], -1)
        assert torch.isfinite(d).all() and _rms(d) == pytest.approx(1.0, rel=1e-5)
        assert _singular_ratio(matrix) < 3
        if len(shape) == 2:  # the plain network's direction is far from orthogonal here
            assert _singular_ratio(d_plain.reshape(shape[0], -1)) > 3
        torch.testing.assert_close(dn, -d, rtol=1e-5, atol=1e-6)
    # Scalars and vectors are unaffected.
    for vector in (torch.randn(()), torch.randn(7)):
        grads = _grads(vector.shape, 3, torch.float32)
        a = _run(t.update, vector, t.init_state(vector), grads)
        b = _run(plain.update, vector, plain.init_state(vector), grads)
        _assert_runs_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_adam_vectors(rank: int) -> None:
    t = NormalizedMLP(adam_vectors=True, feature_clip=3.0).double()
    plain = NormalizedMLP(feature_clip=3.0).double()
    plain.load_state_dict(t.state_dict())
    param = torch.randn(SHAPES[rank], dtype=torch.float64)
    grads = _grads(param.shape, 5)
    state = t.init_state(param)
    m, a = torch.zeros_like(param), torch.zeros_like(param)
    expected_plain = _run(plain.update, param, plain.init_state(param), grads)
    for k, grad in enumerate(grads):
        direction, state = t.update(grad, param, state, torch.tensor(k))
        m = 0.9 * m + 0.1 * grad
        a = 0.999 * a + 0.001 * grad.abs()
        r1 = (m / (a + 1e-37) * (1 - 0.999 ** (k + 1)) / (1 - 0.9 ** (k + 1))).clamp(-3, 3)
        if rank <= 1:
            torch.testing.assert_close(direction, r1, atol=1e-12, rtol=1e-10)
        else:  # matrices take the network's path
            torch.testing.assert_close(direction, expected_plain[k][0], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# vmap, functional_call, fused, TorchScript, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "harness"])
@pytest.mark.parametrize("rank", [0, 1, 2, 4])
def test_vmap_over_grads_and_weights_equals_a_loop(name: str, rank: int) -> None:
    batch = 3
    transforms = [_build(name, seed=s) for s in range(batch)]
    rule = UpdateFunction(transforms[0])
    weights = {
        f"transform.{k}": torch.stack([dict(t.named_parameters())[k] for t in transforms]).detach()
        for k, _ in transforms[0].named_parameters()
    }
    shape = SHAPES[rank]
    grads = torch.stack([g for g in _grads((batch, *shape), 1)[0]])
    params = torch.randn(batch, *shape, dtype=torch.float64)
    states = [torch.randn(batch, *shape, dtype=torch.float64) for _ in range(3)]
    states[2] = states[2].abs()
    step = torch.tensor(3)

    def one(w, g, p, s):
        return torch.func.functional_call(rule, w, (g, p, s, step))

    directions, new_states = torch.func.vmap(one)(weights, grads, params, states)
    for i, t in enumerate(transforms):
        d, s = t.update(grads[i], params[i], [x[i] for x in states], step)
        torch.testing.assert_close(directions[i], d, rtol=1e-10, atol=1e-12)
        for a, b in zip(new_states, s, strict=True):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-14)
    # One module over a batch of gradients, the step shared.
    t = transforms[0]
    directions, _ = torch.func.vmap(t.update, in_dims=(0, 0, 0, None))(grads, params, states, step)
    for i in range(batch):
        d, _ = t.update(grads[i], params[i], [x[i] for x in states], step)
        torch.testing.assert_close(directions[i], d, rtol=1e-10, atol=1e-12)


@by_config
@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_equals_matmul_form(name: str, rank: int, dtype: torch.dtype) -> None:
    reference = _build(name, dtype)
    fused = freeze_transform(reference, fused=True)
    assert fused.fused and not reference.fused
    param = torch.randn(SHAPES[rank], dtype=dtype)
    grads = _grads(param.shape, 4, dtype)
    with torch.no_grad():
        expected = _run(reference.update, param, reference.init_state(param), grads)
        actual = _run(fused.update, param, fused.init_state(param), grads)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    _assert_runs_close(actual, expected, **tolerance)


@pytest.mark.parametrize("hidden", [(8, 8), (3,), (4, 3, 5)])
def test_the_whole_tensor_network_equals_a_loop_over_coordinates(hidden) -> None:
    """The inference form on feature rows (an eager or TorchScript step) against the network
    written out for one coordinate at a time in float64, and against the ``(N, 5)`` form."""
    torch.manual_seed(0)
    t = NormalizedMLP(hidden_sizes=hidden).double()
    with torch.no_grad():
        t.head.weight.normal_()
        t.skip.normal_()
    columns = [torch.randn(7, 3, dtype=torch.float64) * 3 for _ in range(5)]
    with torch.no_grad():
        got = t._network(columns)
        rows = t.network_of(torch.stack([c.reshape(-1) for c in columns], dim=1))
    expected = []
    for n in range(21):
        x = [float(c.reshape(-1)[n]) for c in columns]
        h = x
        for layer in t.layers:
            w = layer.weight.tolist()
            h = [math.tanh(sum(wi * hi for wi, hi in zip(row, h))) for row in w]
        out = sum(w * v for w, v in zip(t.head.weight[0].tolist(), h))
        expected.append(out + sum(s * v for s, v in zip(t.skip.tolist(), x)))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(got, rows)
    # With gradients (meta-training) and under vmap: the (N, 5) form's own arithmetic.
    assert torch.equal(t._network(columns), rows)
    batched = torch.func.vmap(lambda *c: t._network(list(c)))(*[c[None] for c in columns])
    assert torch.equal(batched[0], rows)


def _script(t: NormalizedMLP) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.script(t)


@by_config
@by_rank
def test_script_equals_eager(name: str, rank: int) -> None:
    t = _build(name)
    scripted = _script(t)
    param = torch.randn(SHAPES[rank], dtype=torch.float64)
    grads = _grads(param.shape, 3)
    expected = _run(t.update, param, t.init_state(param), grads)
    _assert_runs_close(_run(scripted.update, param, scripted.init_state(param), grads), expected)


def _peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most bytes torch's CPU allocator held at once during ``fn()`` beyond what it held
    before (the profiler's allocation events, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "name, shape, most",
    [
        # The Adam-like rule on a vector: the outputs (the new state and the direction, 4 values a
        # coordinate) and a block (it was 7 values a coordinate, the whole-tensor graph).
        ("harness", (1_000_000,), 4.2),
        # The network on a matrix (37 values a coordinate whole), then Newton–Schulz in the
        # direction and one spare matrix.
        ("harness", (2048, 512), 6.0),
        ("harness", (512, 2048), 6.0),
        ("default", (2048, 512), 6.0),
    ],
)
def test_a_scripted_step_on_a_large_tensor_stays_within_twice_the_state(
    name: str, shape: Tuple[int, ...], most: float
) -> None:
    # As an exported TorchScript graph runs it; "most" is in values a coordinate (the state is 3).
    scripted = _script(_build(name, torch.float32))
    grad, param = torch.randn(shape), torch.randn(shape)
    state = [torch.randn(shape), torch.randn(shape), torch.rand(shape)]
    for _ in range(3):  # the profiling executor's first runs
        scripted.update(grad, param, state, torch.tensor(4))
    peak = _peak_allocated_bytes(lambda: scripted.update(grad, param, state, torch.tensor(4)))
    values = peak / (4 * grad.numel())
    assert 4 <= values <= most, values


@pytest.mark.slow  # an AOTInductor / Inductor compile: tens of seconds
def test_compiled_graphs_serve_tall_and_wide_matrices() -> None:
    """With dynamic sizes ``torch.compile`` guards on the Gram side (``torch.cond`` cannot run
    under the ``vmap`` of the batched multi-tensor step) and on whether the matrix is long enough
    to end on its Gram matrix: one graph per orientation and iteration, each reused for other
    sizes; exported graphs keep ``torch.cond`` (the next test)."""
    t = _build("orthogonalize")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(UpdateFunction(t), backend=counter, dynamic=True, fullgraph=True)
    counts = []
    # tall, wide, tall, wide; then the same, long (on the Gram matrix)
    shapes = [(4, 3), (3, 5), (5, 4), (4, 6), (9, 2), (2, 9), (12, 3), (3, 13)]
    for shape in shapes:
        param = torch.randn(shape, dtype=torch.float64)
        grads = _grads(shape, 2)
        expected = _run(t.update, param, t.init_state(param), grads)
        _assert_runs_close(_run(compiled, param, t.init_state(param), grads), expected)
        counts.append(counter.frame_count)
    assert counts[0] < counts[1] == counts[2] == counts[3] < counts[4] < counts[5], counts
    assert counts[5] == counts[6] == counts[7], counts
    torch._dynamo.reset()


@pytest.mark.slow
def test_orthogonalize_exports_with_dynamic_sizes(tmp_path) -> None:
    """The rank-2 ONNX and AOTInductor graphs keep both Gram sides (``torch.cond``): one graph
    serves the tall (6, 5) and the wide (1, 9) matrices that ``verify_artifact`` replays."""
    t = _build("orthogonalize", torch.float32)
    spec = {"kind": "shape_agnostic", "name": "normalized-mlp", "kwargs": {"orthogonalize": True}}
    backends = ("torchscript", "onnx", "aoti")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_shape_agnostic(tmp_path / "a", spec, t, backends, ranks=(2,))
    errors = verify_artifact(path, steps=5, trust_code=True)
    # Newton–Schulz amplifies float32 rounding differences between runtimes (see above).
    assert errors["torchscript"] <= 1e-6 and errors["onnx"] <= 1e-4 and errors["aoti"] <= 1e-4
    runner = load_artifact(path).runner("onnx")
    for shape in [(3, 8), (8, 3)]:
        param = torch.randn(shape)
        expected = _run(t.update, param, t.init_state(param), _grads(shape, 2, torch.float32))
        actual = _run(runner, param, t.init_state(param), _grads(shape, 2, torch.float32))
        _assert_runs_close(actual, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Cost model, catalog, state, validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (7,), (64, 32), (16, 3, 3, 3)], ids=str)
def test_cost_is_below_coordinate_mlp(shape: Tuple[int, ...]) -> None:
    numel = math.prod(shape)
    ours = NormalizedMLP().cost(shape)
    theirs = CoordinateMLP().cost(shape)
    assert ours.flops < theirs.flops
    assert ours.flops == 297 * numel and ours.bytes == 9 * 4 * numel
    assert ours.eager_flops == ours.flops
    assert NormalizedMLP(hidden_sizes=(16,)).cost(shape).flops == (297 - 250 + 218) * numel
    vectors = NormalizedMLP(adam_vectors=True).cost(shape)
    assert vectors.flops == (17 if len(shape) <= 1 else 297) * numel
    ortho = NormalizedMLP(orthogonalize=True).cost(shape, itemsize=2)
    assert ortho.bytes == 9 * 2 * numel
    assert (ortho.flops > ours.flops) == (len(shape) >= 2)


def test_catalog_state_and_dtypes() -> None:
    assert CATALOG["normalized-mlp"].build is NormalizedMLP
    assert CATALOG["normalized-mlp"].inner_lr == 1e-3
    t = build_transform("normalized-mlp", {"orthogonalize": True, "hidden_sizes": [4]})
    assert t.orthogonalize and t.hidden_sizes == [4] and t.shape_agnostic and t.view_invariant
    assert t.state_names() == ["momentum_fast", "momentum_slow", "abs_moment"]
    assert not t.reads_param
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        param = torch.randn(3, 4).to(dtype)
        state = t.init_state(param)
        assert [(s.shape, s.dtype) for s in state] == [(param.shape, dtype)] * 3
        direction, new_state = t.update(param * 1e-3, param, state, torch.tensor(0))
        assert direction.dtype == dtype and all(s.dtype == dtype for s in new_state)
        assert torch.isfinite(direction).all()


def test_normalize_is_safe() -> None:
    assert torch.equal(normalize(torch.zeros(3, 2)), torch.zeros(3, 2))
    big = torch.tensor([3e38, -3e38, 1.0, 0.0])
    torch.testing.assert_close(normalize(big), torch.tensor([2**0.5, -(2**0.5), 0.0, 0.0]))
    assert float(normalize(torch.tensor(-5.0))) == -1.0


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"hidden_sizes": ()}, "()"),
        ({"hidden_sizes": (8, 0)}, "(8, 0)"),
        ({"hidden_sizes": (8, 2.5)}, "(8, 2.5)"),
        ({"hidden_sizes": (True,)}, "(True,)"),
        ({"hidden_sizes": 8}, "8"),
        ({"fast_decay": 1.0}, "1.0"),
        ({"slow_decay": -0.1}, "-0.1"),
        ({"abs_decay": float("nan")}, "nan"),
        ({"abs_decay": "0.9"}, "'0.9'"),
        ({"feature_clip": 0.0}, "0.0"),
        ({"feature_clip": float("inf")}, "inf"),
        ({"eps": 0.0}, "0.0"),
        ({"eps": -1e-37}, "-1e-37"),
        ({"init": "adam"}, "'adam'"),
        ({"orthogonalize": 1}, "1"),
        ({"adam_vectors": "yes"}, "'yes'"),
    ],
    ids=lambda v: str(v),
)
def test_bad_arguments_raise(kwargs: dict, shown: str) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"Invalid {name}: ") as raised:
        NormalizedMLP(**kwargs)
    assert shown in str(raised.value)


def test_wrong_shapes_raise() -> None:
    t = NormalizedMLP()
    param = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\[4, 3\]"):
        t.update(torch.zeros(4, 3), param, t.init_state(param), torch.tensor(0))
    with pytest.raises(ValueError, match="3 tensors"):
        t.update(param, param, t.init_state(param)[:2], torch.tensor(0))
