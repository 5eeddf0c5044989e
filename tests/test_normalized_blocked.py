"""NormalizedMLP.update_blocked: the fused update computed in blocks of coordinates.

References: the whole-tensor ``update`` of the same weights in the fused formulation (float64
means; the network unrolled, so agreement is to rounding, not bit for bit), and for float64 the
readable one-coordinate-at-a-time reference of test_normalized. Block sizes are chosen smaller
than, equal to, larger than and not dividing the tensor's size, so every partial-block path runs.
The memory test measures the resident-set peak of one step in a fresh process.
"""

import math
import os
import subprocess
import sys
import textwrap
from typing import List, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry import SHAPES
from test_normalized import CONFIGS, _build, _grads, _rms, reference
from torch import Tensor

from compiledopt.export import freeze_transform
from compiledopt.learned import NormalizedMLP
from compiledopt.learned.normalized import BLOCK_SIZE
from compiledopt.learned.normalized_blocked import blocked_update

F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-13}


def _tolerance(dtype: torch.dtype) -> dict:
    return F64 if dtype == torch.float64 else F32


def _assert_close(actual: Tensor, expected: Tensor, rtol: float, atol: float) -> None:
    """``assert_close`` with ``atol`` relative to the largest expected value: both updates round
    every coordinate's network at the scale of the tensor's largest directions (measured: the
    fused float32 update itself is 3e-6 from float64 where directions reach 10), so a
    near-zero coordinate can differ by that much, whatever its own size."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def _blocks(numel: int) -> List[int]:
    """Smaller than and not dividing, smaller and dividing (1), equal to, larger than."""
    return sorted({max(numel - 1, 1), 1, max(numel, 1), numel + 7, 3})


def _compare(t: NormalizedMLP, grads: Sequence[Tensor], block: int, **tolerance) -> None:
    """Both updates over ``grads``, each carrying its own state; equal at every step."""
    fused = freeze_transform(t, fused=True)
    param = torch.zeros_like(grads[0])
    state, ref_state = t.init_state(param), t.init_state(param)
    for k, grad in enumerate(grads):
        step = torch.tensor(k)
        direction, state = t.update_blocked(grad, param, state, step, block)
        with torch.no_grad():
            expected, ref_state = fused.update(grad, param, ref_state, step)
        assert direction.dtype == expected.dtype and direction.shape == expected.shape
        _assert_close(direction, expected, **tolerance)
        for s, ref in zip(state, ref_state, strict=True):
            assert s.is_contiguous() and s.shape == grad.shape
            torch.testing.assert_close(s, ref, rtol=0, atol=0)  # the same elementwise ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rank", sorted(SHAPES), ids=[f"rank{r}" for r in sorted(SHAPES)])
def test_equals_the_fused_update(rank: int, name: str, dtype: torch.dtype) -> None:
    t = _build(name, dtype)
    shape = SHAPES[rank]
    grads = _grads(shape, 3, dtype)
    tolerance = _tolerance(dtype)
    if t.orthogonalize and rank >= 2 and dtype == torch.float32:
        # Newton–Schulz amplifies float32 rounding of its input (the network's matmul and
        # unrolled forms round differently), as in test_normalized.
        tolerance = {"rtol": 1e-4, "atol": 1e-4}
    for block in _blocks(math.prod(shape)):
        _compare(t, grads, block, **tolerance)


@pytest.mark.parametrize("name", ["default", "deep_clipped"])
def test_larger_tensors_and_the_default_block(name: str) -> None:
    t = _build(name, torch.float32)
    grads = _grads((300, 250), 2, torch.float32)
    for block in (4096, 75000, BLOCK_SIZE, 1 << 20):
        _compare(t, grads, block, **F32)
    assert t.update_blocked.__defaults__ == (BLOCK_SIZE,)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rank", [0, 1, 2, 4])
def test_float64_matches_the_readable_reference(rank: int, name: str) -> None:
    t = _build(name)
    param = torch.zeros(SHAPES[rank], dtype=torch.float64)
    state = ref_state = t.init_state(param)
    for k, grad in enumerate(_grads(param.shape, 4)):
        direction, state = t.update_blocked(grad, param, state, torch.tensor(k), 2)
        with torch.no_grad():
            expected, ref_state = reference(t, grad, ref_state, k)
        torch.testing.assert_close(direction, expected, atol=1e-9, rtol=1e-7)
        for s, ref in zip(state, ref_state, strict=True):
            torch.testing.assert_close(s, ref, atol=1e-12, rtol=1e-12)


def test_the_comparison_can_fail() -> None:
    """A changed hidden weight moves the blocked direction beyond the tolerance."""
    t = _build("default", torch.float32)
    other = _build("default", torch.float32)
    with torch.no_grad():
        other.layers[1].weight[2, 3] += 0.05
    grad = _grads((6, 7), 1, torch.float32)[0]
    state = t.init_state(grad)
    ours, _ = t.update_blocked(grad, grad, state, torch.tensor(0), 5)
    theirs, _ = other.update_blocked(grad, grad, state, torch.tensor(0), 5)
    with pytest.raises(AssertionError):
        _assert_close(ours, theirs, **F32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_gradients_give_exactly_zero(name: str) -> None:
    t = _build(name, torch.float32)
    for shape in [(), (9,), (5, 4), (2, 3, 2)]:
        zeros = torch.zeros(shape)
        state = t.init_state(zeros)
        for k in range(3):
            direction, state = t.update_blocked(zeros, zeros, state, torch.tensor(k), 4)
            assert torch.equal(direction, torch.zeros(shape))
            assert all(torch.equal(s, torch.zeros(shape)) for s in state)


@pytest.mark.parametrize("name", ["default", "harness"])
def test_huge_gradients_stay_finite(name: str) -> None:
    t = _build(name, torch.float32)
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    for grad in (signs * 1e38, signs * 3.4e38, torch.cat([signs[:5] * 3e38, signs[5:] * 1e-30])):
        for shape in [(11,), (11, 1)]:
            grads = [grad.reshape(shape), -grad.reshape(shape), grad.reshape(shape)]
            state = t.init_state(grads[0])
            for k, g in enumerate(grads):
                direction, state = t.update_blocked(g, g, state, torch.tensor(k), 4)
                assert torch.isfinite(direction).all()
                assert all(torch.isfinite(s).all() for s in state)
                if not (t.adam_vectors and len(shape) == 1):
                    assert _rms(direction) == pytest.approx(1.0, rel=1e-5)
            _compare(t, grads, 4, **F32)


def test_non_contiguous_inputs() -> None:
    t = _build("deep_clipped", torch.float32)
    base = _grads((7, 6, 2), 4, torch.float32)
    grad = base[0][:, :, 0].t()  # (6, 7), strided
    state = [s[:, :, 1].t() for s in base[1:]]
    state[2] = state[2].abs()
    assert not grad.is_contiguous() and not state[0].is_contiguous()
    direction, new_state = t.update_blocked(grad, grad, state, torch.tensor(2), 5)
    fused = freeze_transform(t, fused=True)
    with torch.no_grad():
        expected, ref = fused.update(
            grad.contiguous(), grad, [s.contiguous() for s in state], torch.tensor(2)
        )
    torch.testing.assert_close(direction, expected, **F32)
    for s, r in zip(new_state, ref, strict=True):
        assert s.is_contiguous()
        torch.testing.assert_close(s, r, rtol=0, atol=0)
    # An expanded (stride-0) gradient reads the same as its materialised copy.
    wide = torch.randn(1, 5).expand(4, 5)
    plain = t.init_state(wide)
    a, _ = t.update_blocked(wide, wide, plain, torch.tensor(0), 3)
    b, _ = t.update_blocked(wide.contiguous(), wide, plain, torch.tensor(0), 3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["default", "harness"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 2, 2), (2, 0, 1, 1, 3)], ids=str)
def test_empty_tensors(name: str, shape) -> None:
    t = _build(name, torch.float32)
    grad = torch.zeros(shape)
    direction, state = t.update_blocked(grad, grad, t.init_state(grad), torch.tensor(0))
    assert direction.shape == grad.shape and direction.dtype == grad.dtype
    assert [(s.shape, s.dtype) for s in state] == [(grad.shape, grad.dtype)] * 3


def test_other_dtypes_follow_update() -> None:
    """bfloat16 state and gradient with float32 weights, float32 gradients with float64 weights:
    the direction has the gradient's dtype, the network runs in the weights' dtype."""
    for grad_dtype, weight_dtype in (
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ):
        t = _build("default", weight_dtype)
        grads = [g.to(grad_dtype) for g in _grads((9, 4), 3, torch.float32)]
        _compare(t, grads, 7, rtol=1e-2 if grad_dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def test_not_differentiable_and_not_scripted() -> None:
    t = _build("default", torch.float32)
    grad = torch.randn(4, 3)
    direction, state = t.update_blocked(grad, grad, t.init_state(grad), torch.tensor(0))
    assert not direction.requires_grad and not any(s.requires_grad for s in state)
    scripted = torch.jit.script(t)
    expected, _ = t.update(grad, grad, t.init_state(grad), torch.tensor(0))
    actual, _ = scripted.update(grad, grad, scripted.init_state(grad), torch.tensor(0))
    torch.testing.assert_close(actual, expected)
    assert "update_blocked" not in scripted.update.code


@pytest.mark.parametrize("name", ["default", "harness"])
@pytest.mark.parametrize("shape", [(BLOCK_SIZE + 5,), (300, 700), (700, 300)], ids=str)
def test_a_scripted_rule_computes_a_large_tensor_as_update_blocked(name: str, shape) -> None:
    # An exported TorchScript rule runs the blocked code on a tensor of more than BLOCK_SIZE
    # coordinates: update_blocked's outputs bit for bit (so the fused update's to rounding),
    # for vectors, wide and tall matrices (Newton-Schulz on either side).
    t = _build(name, torch.float32)
    scripted = torch.jit.script(t)
    param = torch.zeros(shape)
    state, blocked_state = t.init_state(param), t.init_state(param)
    for k, grad in enumerate(_grads(shape, 3, torch.float32)):
        step = torch.tensor(k)
        direction, state = scripted.update(grad, param, state, step)
        expected, blocked_state = t.update_blocked(grad, param, blocked_state, step)
        torch.testing.assert_close(direction, expected, rtol=0, atol=0)
        for s, ref in zip(state, blocked_state, strict=True):
            torch.testing.assert_close(s, ref, rtol=0, atol=0)
    assert "in_blocks" in scripted._update.code and "blocked_rule" in scripted.in_blocks.code


@pytest.mark.parametrize("block", [0, -3, 2.5, True, "64"], ids=repr)
def test_bad_block_raises(block) -> None:
    t = NormalizedMLP()
    grad = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"Invalid block: {block!r}"):
        t.update_blocked(grad, grad, t.init_state(grad), torch.tensor(0), block)


def test_wrong_shapes_raise() -> None:
    t = NormalizedMLP()
    param = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\[4, 3\]"):
        t.update_blocked(torch.zeros(4, 3), param, t.init_state(param), torch.tensor(0))
    with pytest.raises(ValueError, match="3 tensors"):
        blocked_update(t, param, param, t.init_state(param)[:2], torch.tensor(0))


_MAGNITUDES = st.floats(min_value=-30.0, max_value=math.log10(3e38)).map(lambda e: 10.0**e)
_ELEMENTS = st.one_of(st.just(0.0), _MAGNITUDES, _MAGNITUDES.map(lambda v: -v))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(["default", "harness", "deep_clipped"]))
def test_any_shape_and_values_equal_the_fused_update(data, name: str) -> None:
    t = _build(name, torch.float32)
    rank = data.draw(st.integers(0, 5))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    numel = math.prod(shape)
    block = data.draw(st.integers(1, numel + 2))
    steps = data.draw(st.integers(1, 3))
    grads = [
        torch.tensor(data.draw(st.lists(_ELEMENTS, min_size=numel, max_size=numel))).reshape(shape)
        for _ in range(steps)
    ]
    # Values from 1e-30 to 3e38 in one tensor: the ratio features round differently only where
    # they are clamped anyway, and the direction is unit RMS, so an absolute tolerance suffices.
    _compare(t, grads, block, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Memory: the peak resident-set rise of one step, in a fresh process
# --------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from compiledopt.learned import NormalizedMLP

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    def rise(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before

    torch.set_num_threads(1)
    t = NormalizedMLP()
    step = torch.tensor(3)
    small = torch.randn(100)  # first-call initialisation, outside the measurements
    t.update(small, small, t.init_state(small), step)
    t.update_blocked(small, small, t.init_state(small), step)
    for n in map(int, sys.argv[1:]):
        g = torch.randn(n)
        state = [torch.randn(n), torch.randn(n), torch.rand(n)]
        blocked = rise(lambda: t.update_blocked(g, g, state, step))
        if n == int(sys.argv[1]):
            with torch.no_grad():
                print(rise(lambda: t.update(g, g, state, step)))
        print(blocked)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_of_one_step_is_within_twice_the_state() -> None:
    """One blocked step allocates its outputs (4 values a coordinate) and blocks within 2 more
    values a coordinate: 4M coordinates (many full blocks), 2**20 (16 full blocks, the largest
    share of blocks in the tensor) and 100000 (blocks cut to a sixteenth); the whole-tensor
    ``update`` takes over five times the state."""
    sizes = (4 * 2**20, 2**20, 100_000)
    # Every allocation of 64 KiB or more is its own mapping, returned when freed, so the resident
    # peak counts each step's own allocations (no reuse of pages freed before the measurement).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, *map(str, sizes)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    plain, *blocked = (int(v) for v in run.stdout.split())
    for numel, rise in zip(sizes, blocked, strict=True):
        state_bytes = 3 * 4 * numel
        outputs = 4 * 4 * numel  # the direction and the new state: the least a step allocates
        assert outputs * 0.95 <= rise <= 2 * state_bytes, (numel, rise, state_bytes)
    assert plain > 5 * 3 * 4 * sizes[0], plain  # the whole-tensor path, far above
