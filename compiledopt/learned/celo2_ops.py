"""The maths of :class:`~compiledopt.learned.celo2.Celo2` that does not depend on its weights:
the feature groups, Adafactor's factored statistics, Newton–Schulz on the last two axes, and the
two steps that depend on a matrix's orientation written for graphs of symbolic sizes.

Do not add ``from __future__ import annotations`` here: TorchScript needs real annotations.
"""

import itertools
from typing import List, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from compiledopt.transforms.base import is_exporting

__all__ = [
    "FEATURE_GROUPS",
    "NS_COEFFS",
    "check_exportable",
    "factored_axes",
    "factored_features",
    "factored_pair",
    "feature_widths",
    "newton_schulz_last2",
    "second_moment_normalize",
    "swapped_columns",
    "traced_factors",
    "traced_newton_schulz",
    "without_axis",
]

#: The input feature groups, in the order the first layer reads them (see :class:`Celo2`).
FEATURE_GROUPS = (
    "grad",
    "clipped_grad",
    "param",
    "momentum",
    "rms",
    "momentum_rsqrt",
    "rsqrt",
    "factored_grad",
    "grad_rsqrt",
    "row",
    "col",
    "row_rsqrt",
    "col_rsqrt",
    "factored_momentum",
)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def feature_widths(momenta: int, rms: int, adafactor: int) -> List[int]:
    """The width of each of :data:`FEATURE_GROUPS` for ``momenta``, ``rms`` and ``adafactor``
    decays (``[1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]`` for Celo2's 3, 1 and 3)."""
    k, r, a = momenta, rms, adafactor
    return [1, 1, 1, k, r, k, r, a, r, a, a, a, a, k]


def second_moment_normalize(x: Tensor, dims: List[int], eps: float = 1e-9) -> Tensor:
    """``x · rsqrt(eps + mean(x², dims))``: each slice over ``dims`` to an RMS of about 1."""
    return x * torch.rsqrt(eps + torch.mean(x * x, dim=dims, keepdim=True))


def newton_schulz_last2(
    x: Tensor, coeffs: List[float], steps: int, eps: float, transpose: bool
) -> Tensor:
    """``steps`` quintic Newton–Schulz iterations ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, on the
    last two axes of ``x`` (batched over the others), after dividing each matrix by its Frobenius
    norm plus ``eps``. With ``transpose`` the iteration runs on the transposed matrices (the
    caller passes it when they are tall, rows > columns) and the result is transposed back."""
    if transpose:
        x = x.transpose(-2, -1)
    x = x / (torch.linalg.vector_norm(x, 2.0, dim=[-2, -1], keepdim=True) + eps)
    a, b, c = coeffs[0], coeffs[1], coeffs[2]
    for _ in range(steps):
        gram = torch.matmul(x, x.transpose(-2, -1))
        poly = b * gram + c * torch.matmul(gram, gram)
        x = a * x + torch.matmul(poly, x)
    if transpose:
        x = x.transpose(-2, -1)
    return x


def factored_axes(shape: List[int]) -> Tuple[int, int]:
    """``(d1, d0)``: the second-largest and the largest axis of ``shape`` (rank ≥ 2), as a stable
    ascending sort of the sizes orders them (a tie goes to the later axis)."""
    d0 = 0
    for k in range(1, len(shape)):
        if shape[k] >= shape[d0]:
            d0 = k
    d1 = 1 if d0 == 0 else 0
    for k in range(len(shape)):
        if k != d0 and shape[k] >= shape[d1]:
            d1 = k
    return d1, d0


def factored_pair(shape: List[int]) -> Tuple[int, int]:
    """The two :func:`factored_axes` of ``shape`` in increasing order (``(0, 1)`` for a matrix,
    whichever side is larger: the statistics kept do not depend on the orientation)."""
    if len(shape) == 2:
        return 0, 1
    d1, d0 = factored_axes(shape)
    return min(d0, d1), max(d0, d1)


def factored_features(
    row_acc: Tensor, col_acc: Tensor, d1: int, d0: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The factored statistics as Celo2 reads them, for the factored axes ``(d1, d0)`` (see
    :func:`factored_axes`) and the accumulators of the module doc (``row_acc`` averaged over the
    later of the two axes, ``col_acc`` over the earlier): ``(r, c, f_row, f_col)``, each shaped to
    broadcast against ``p.shape + (A,)``. ``r`` is the accumulator averaged over ``d0``, ``c`` the
    one averaged over ``d1``, ``f_row = rsqrt(max(r / (mean_{d1} r + 1e-9), 1e-9))`` and
    ``f_col = rsqrt(max(c, 1e-9))``, so that ``g·f_row·f_col`` is Adafactor's normalised
    gradient."""
    if d0 > d1:
        v_row, v_col = row_acc, col_acc
    else:
        v_row, v_col = col_acc, row_acc
    reduced = d1 - 1 if d1 > d0 else d1  # d1's place once d0 is gone
    row_mean = v_row.mean(dim=reduced, keepdim=True)
    row_factor = torch.rsqrt(torch.clamp(v_row / (row_mean + 1e-9), min=1e-9))
    col_factor = torch.rsqrt(torch.clamp(v_col, min=1e-9))
    return (
        v_row.unsqueeze(d0),
        v_col.unsqueeze(d1),
        row_factor.unsqueeze(d0),
        col_factor.unsqueeze(d1),
    )


def without_axis(shape: List[int], axis: int) -> List[int]:
    out: List[int] = []
    for k in range(len(shape)):
        if k != axis:
            out.append(shape[k])
    return out


@torch.jit.unused
def check_exportable(shape: List[int]) -> None:
    """``ValueError`` when ``torch.export`` traces a rank ≥ 3 tensor with symbolic sizes: which
    two axes are the largest would be fixed by the example, and the graph wrong for other sizes.
    (``torch.compile`` guards on the sizes instead, and recompiles when they order otherwise.)"""
    if len(shape) >= 3 and is_exporting():
        if not all(is_concrete_int(s) for s in shape):
            raise ValueError(
                f"Celo2 cannot export a rank-{len(shape)} graph with dynamic sizes: its factored "
                "axes (the two largest) depend on the sizes; export ranks 0 to 2, or use "
                "TorchScript, which serves every rank"
            )


def swapped_columns(widths: List[int]) -> List[int]:
    """The first layer's columns (groups of ``widths``, :data:`FEATURE_GROUPS`) with the
    ``row``/``col`` and ``row_rsqrt``/``col_rsqrt`` groups exchanged."""
    starts = list(itertools.accumulate([0, *widths]))
    groups = [list(range(starts[k], starts[k + 1])) for k in range(len(widths))]
    at = {name: k for k, name in enumerate(FEATURE_GROUPS)}
    for first, second in (("row", "col"), ("row_rsqrt", "col_rsqrt")):
        i, j = at[first], at[second]
        groups[i], groups[j] = groups[j], groups[i]
    return [column for group in groups for column in group]


@torch.jit.unused
def traced_factors(
    row_acc: Tensor, col_acc: Tensor, weight: Tensor, widths: List[int]
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`factored_features` of a matrix of symbolic sizes (``torch.compile``,
    ``torch.export``), both orientations kept (``torch.cond`` on rows > columns): the two
    factors by the axis they vary along, ``(rows, 1, A)`` and ``(1, cols, A)``, rather than by
    role (their product is the same), and the first layer's ``weight`` with the ``row``/``col``
    groups (and their ``rsqrt``) swapped for a tall matrix, whose row statistics (averaged over
    its larger axis, the rows) vary along the columns.

    The branches take tensors as operands, never by closure, and return flat tensors: a
    captured tensor, or a 2-d output whose strides ``torch.cond`` compares, makes the trace
    guard sizes against 1, and the graph would refuse a matrix of one row or column."""
    rows, cols = row_acc.shape[0], col_acc.shape[0]

    def tall(row: Tensor, col: Tensor) -> Tuple[Tensor, Tensor]:
        _, _, f_row, f_col = factored_features(row, col, 1, 0)
        return f_col.reshape(-1), f_row.reshape(-1)

    def wide(row: Tensor, col: Tensor) -> Tuple[Tensor, Tensor]:
        _, _, f_row, f_col = factored_features(row, col, 0, 1)
        return f_row.reshape(-1), f_col.reshape(-1)

    f_rows, f_cols = torch.cond(rows > cols, tall, wide, (row_acc, col_acc))
    order = torch.tensor(swapped_columns(widths), device=weight.device)

    def swapped(w: Tensor, index: Tensor) -> Tensor:
        return w.index_select(1, index)

    def kept(w: Tensor, index: Tensor) -> Tensor:
        return w.clone()

    weight = torch.cond(rows > cols, swapped, kept, (weight, order))
    a = row_acc.shape[1]
    return f_rows.reshape(rows, 1, a), f_cols.reshape(1, cols, a), weight


@torch.jit.unused
def traced_newton_schulz(update: Tensor, coeffs: List[float], steps: int, eps: float) -> Tensor:
    """:func:`newton_schulz_last2` of a matrix of symbolic sizes, the Gram matrix's side chosen
    by ``torch.cond`` (rows > columns: the transposed iteration); flat branch outputs, as in
    :func:`traced_factors`."""

    def tall(x: Tensor) -> Tensor:
        return newton_schulz_last2(x, coeffs, steps, eps, True).reshape(-1)

    def wide(x: Tensor) -> Tensor:
        return newton_schulz_last2(x, coeffs, steps, eps, False).reshape(-1)

    pred = update.shape[0] > update.shape[1]
    return torch.cond(pred, tall, wide, (update,)).reshape(update.shape)
