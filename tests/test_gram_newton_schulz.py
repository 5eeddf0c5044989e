"""Newton–Schulz on the Gram matrix of a long matrix's short side: the same iterations as the
plain quintic step on ``X`` (a float64 for-loop reference), in fewer FLOPs, with zero, zero
rows and columns, and oddness kept, and in the TorchScript blocked path too."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compiledopt.learned import NormalizedMLP
from compiledopt.learned.normalized_blocked import IN_PLACE_FROM, blocked_update
from compiledopt.learned.normalized_ops import (
    NS_STEPS,
    gram_side,
    newton_schulz,
    newton_schulz_flops,
    ns_gram,
    ns_in_place,
    unit_frobenius,
)

A, B, C = 3.4445, -4.7750, 2.0315


def reference(matrix: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The quintic step ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` in float64, written out."""
    x = matrix.double()
    norm = x.norm()
    x = x / norm if norm > 0 else x
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + B * gram @ x + C * gram @ gram @ x
    return x


def _matrix(rows: int, cols: int, condition: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A random matrix whose singular values span ``[1/condition, 1]`` geometrically."""
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    left, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return (left * values @ right.T).float()


SHAPES = [(16, 144), (144, 16), (32, 128), (128, 32), (7, 300), (40, 41), (32, 64)]


@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_equals_the_float64_iteration(shape, condition):
    matrix = _matrix(*shape, condition)
    got = newton_schulz(matrix)
    want = reference(matrix)
    assert got.dtype == torch.float32
    error = (got.double() - want).norm() / want.norm()
    assert error < 2e-5, f"relative error {error:.2e}"


@pytest.mark.parametrize("shape", [(16, 144), (144, 16)])
def test_the_gram_iteration_equals_the_plain_one_in_float64(shape):
    x = unit_frobenius(_matrix(*shape, 1e3).double())
    for steps in (0, 1, 2, 3, 5):
        for plain in (0, 1, 2):
            got = ns_gram(x, steps, shape[0] > shape[1], plain=plain)
            torch.testing.assert_close(got, reference(x, steps), rtol=1e-10, atol=1e-12)
        # In place (its own two plain steps), in chunks of a few rows or columns.
        for chunk in (1, 100, 10_000):
            matrix = x.clone()
            got = ns_in_place(matrix, steps, chunk)
            assert got.data_ptr() == matrix.data_ptr()
            torch.testing.assert_close(got, reference(x, steps), rtol=1e-10, atol=1e-12)


def test_long_matrices_take_the_gram_side():
    assert gram_side(16, 48) and gram_side(48, 16) and gram_side(64, 576)
    assert not gram_side(40, 41) and not gram_side(64, 191) and not gram_side(191, 64)


@pytest.mark.parametrize("shape", [(64, 576), (576, 64)])
def test_a_long_matrix_costs_the_gram_flops(shape):
    """A 3×3 convolution's view (9 times longer than wide): ``12r²c + 22r³`` FLOPs, about half
    the plain iteration's ``20r²c + 10r³``."""
    r, c = min(shape), max(shape)
    x = torch.randn(shape)
    with FlopCounterMode(display=False) as counter:
        newton_schulz(x)
    assert counter.get_total_flops() == 12 * r * r * c + 22 * r**3
    assert counter.get_total_flops() < (20 * r * r * c + 10 * r**3) / 1.4


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (40, 41), (96, 40), (1, 7)])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_cost_model_counts_the_products_newton_schulz_runs(shape, steps):
    """:func:`newton_schulz_flops` (per coordinate) against the products torch counts, with its
    elementwise terms (6 for the normalisation, ``3r²/c + 2`` a plain step) added back."""
    r, c = min(shape), max(shape)
    with FlopCounterMode(display=False) as counter:
        newton_schulz(torch.randn(shape), steps)
    plain = min(2, steps) if gram_side(r, c) else steps
    elementwise = 6 * r * c + plain * (3 * r * r + 2 * r * c)
    assert newton_schulz_flops(*shape, steps) * r * c == pytest.approx(
        counter.get_total_flops() + elementwise, rel=1e-12
    )
    assert newton_schulz_flops(0, 5) == 0.0


class _Orthogonalized(torch.nn.Module):
    """The packaged rule's Newton–Schulz as the exporters trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = NormalizedMLP(orthogonalize=True)

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.transform._traced_newton_schulz(matrix)


def test_an_exported_graph_of_symbolic_sizes_takes_the_gram_side_of_a_long_matrix():
    """One exported program serves tall, wide, long and square matrices with the formulation
    the eager rule takes: the same FLOPs as ``newton_schulz`` on each (it ran the five plain
    steps on every shape) and its values."""
    dims = {0: torch.export.Dim("rows", min=2), 1: torch.export.Dim("cols", min=2)}
    program = torch.export.export(_Orthogonalized(), (torch.randn(8, 12),), dynamic_shapes=(dims,))
    for shape in [(64, 576), (576, 64), (40, 41), (96, 40)]:
        x = _matrix(*shape, condition=100.0).float()
        got, exported = _products(program.module(), x)
        want, eager = _products(newton_schulz, x)
        assert exported == eager and len(eager) > 0, shape
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def _products(fn, x):
    """``fn(x)`` and the operand shapes of every matrix product it ran, in order (read by the
    profiler: FlopCounterMode counts a ``torch.cond`` by its branches' traced graphs, not by
    the branch taken, and a dispatch mode does not see inside one)."""
    with torch.profiler.profile(record_shapes=True) as profile:
        out = fn(x)
    products = [e.input_shapes for e in profile.events() if e.name in ("aten::mm", "aten::addmm")]
    return out, products


def test_zero_oddness_and_zero_padding_are_kept():
    matrix = _matrix(12, 100, 10.0)
    assert torch.equal(newton_schulz(torch.zeros(12, 100)), torch.zeros(12, 100))
    torch.testing.assert_close(newton_schulz(-matrix), -newton_schulz(matrix), rtol=0, atol=0)
    padded = torch.zeros(16, 130)
    padded[:12, :100] = matrix
    got = newton_schulz(padded)
    assert torch.equal(got[12:], torch.zeros(4, 130))
    assert torch.equal(got[:, 100:], torch.zeros(16, 30))
    torch.testing.assert_close(got[:12, :100], newton_schulz(matrix), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 72, 1), (300, 20), (50, 60)])
def test_the_blocked_and_scripted_updates_agree_with_the_update(shape):
    """The blocked path (eager on large tensors, an exported TorchScript rule) takes the Gram
    side too, in place."""
    torch.manual_seed(0)
    transform = NormalizedMLP(orthogonalize=True, adam_vectors=True)
    param, grad = torch.randn(shape), torch.randn(shape)
    state = [torch.randn(shape) * 0.1, torch.randn(shape) * 0.1, torch.rand(shape)]
    step = torch.tensor(4)
    want, want_state = transform.update(grad, param, state, step)
    got, got_state = blocked_update(transform, grad, param, state, step, 256)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b)
    scripted = torch.jit.script(transform)
    direction, _ = scripted.update(grad, param, state, step)
    torch.testing.assert_close(direction, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1024, 1100), (1100, 1024)])
def test_a_large_matrix_iterates_in_place_and_agrees(shape):
    """From a million coordinates the blocked path iterates in the direction itself (chunks of
    columns or rows): still the update's direction."""
    assert shape[0] * shape[1] >= IN_PLACE_FROM
    generator = torch.Generator().manual_seed(1)
    transform = NormalizedMLP(orthogonalize=True, adam_vectors=True)
    param, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    state = [torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)]
    step = torch.tensor(0)
    want, _ = transform.update(grad, param, state, step)
    got, _ = blocked_update(transform, grad, param, state, step)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
