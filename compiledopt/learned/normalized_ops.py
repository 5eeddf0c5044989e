"""The tensor functions of :class:`~compiledopt.learned.normalized.NormalizedMLP`, shared by its
whole-tensor update and its blockwise one (:mod:`compiledopt.learned.normalized_blocked`):
bias corrections, the per-tensor normalisation, the rational ``tanh`` and Newton–Schulz."""

from typing import Optional, Tuple

import torch
from torch import Tensor

NS_STEPS = 5
#: The largest block of :meth:`NormalizedMLP.update_blocked`, in coordinates (measured fastest,
#: with 32768, on one and two threads; see normalized_blocked for the memory it takes).
BLOCK_SIZE = 65536


def rational_tanh(x: Tensor) -> Tensor:
    """``tanh`` as a rational function ``x·P(x²)/Q(x²)`` on ``|x| ≤ 7.905`` (beyond it ``tanh``
    rounds to ``±1`` in float32): about 10 multiply-adds and one division, a fraction of the
    cost of ``torch.tanh``'s accurate vectorised kernel on the CPU. The coefficients are a
    rational fit (linearised least squares with Loeb reweighting, in float64); evaluated in
    float32 it is within ``9e-7`` of ``tanh`` everywhere (float32 rounds ``tanh`` itself to
    ``6e-8``), odd, bounded by 1 and 0 at 0. Used by the fused formulation only; float64 inputs
    get ``torch.tanh`` (the approximation is a float32 one)."""
    if x.dtype == torch.float64:
        return torch.tanh(x)
    # Literals, not module constants: TorchScript reads no global floats.
    x = torch.clamp(x, -7.90531110763549805, 7.90531110763549805)
    z = x * x
    p = z * -6.457220223418922e-09 + 7.3358141142702555e-06
    p = z * p + 0.002719290540586296
    p = z * p + 0.12734702511491375
    p = z * p + 0.9999998394372162
    q = z * 0.00019969575637282468 + 0.022947447570746394
    q = z * q + 0.46067904621446004
    q = z * q + 1.0
    return x * p / q


def bias_scales(step: Tensor, beta1: float, beta2: float, beta3: float) -> Tensor:
    """The three per-tensor factors of the ratio features, ``[c₃/c₁, c₃/c₂, c₃]`` with
    ``cₖ = 1 − βₖ^(t+1)`` and ``t = step``, computed in float64 and returned as one float64
    tensor of three elements.

    One stacked tensor, not three scalars: a compiler stores it once before its loop over the
    coordinates (Inductor computes a scalar expression of the step inside the loop, three
    ``pow`` calls for every vector of coordinates, which was a third of a compiled step)."""
    t = (step + 1).to(torch.float64)
    c1 = 1.0 - torch.pow(beta1, t)
    c2 = 1.0 - torch.pow(beta2, t)
    c3 = 1.0 - torch.pow(beta3, t)
    return torch.stack([c3 / c1, c3 / c2, c3])


def unit_max(x: Tensor) -> Tensor:
    """``x / max|x|``, or zeros where ``x`` is all zero (no large value is ever squared)."""
    scale = x.abs().max()
    return x / torch.where(scale > 0, scale, torch.ones_like(scale))


def scale_and_root(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The two per-tensor divisors of :func:`normalize` (not ``wide``, no ``count``): ``x /
    scale / root`` is ``normalize(x)``, operation for operation (``scale = max|x|`` and ``root =
    sqrt(mean((x / scale)²))``, each 1 where it would be 0)."""
    peak = x.abs().max()
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    mean = (x / scale).square().mean()
    return scale, torch.sqrt(torch.where(mean > 0, mean, torch.ones_like(mean)))


def normalize(x: Tensor, wide: bool = False, count: Optional[Tensor] = None) -> Tensor:
    """``x`` rescaled to an RMS of 1 over the whole tensor, or zeros where ``x`` is all zero.

    Overflow-safe: ``y = x / max|x|`` first, then ``y / sqrt(mean(y²))`` (``mean(y²) ≥ 1/numel``
    whenever ``y`` is not zero). With ``wide`` the mean is accumulated in float64. With
    ``count``, ``x`` is a tensor of ``count`` elements zero-padded: the mean is over those.
    """
    y = unit_max(x)
    if count is not None:
        if wide:
            total = y.square().sum(dtype=torch.float64)
        else:
            total = y.square().sum()
        mean = (total / count.to(total.dtype)).to(y.dtype)
    elif wide:
        mean = y.square().mean(dtype=torch.float64).to(y.dtype)
    else:
        mean = y.square().mean()
    return y / torch.sqrt(torch.where(mean > 0, mean, torch.ones_like(mean)))


def ns_rows(x: Tensor, steps: int) -> Tensor:
    """The quintic step ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` (the rows side), ``steps``
    times. Each step writes one new matrix of ``X``'s size (``aX``, the product and their sum
    in one ``addmm``; :func:`ns_in_place` writes none)."""
    a, b, c = 3.4445, -4.7750, 2.0315  # locals: TorchScript reads no global floats
    for _ in range(steps):
        gram = torch.mm(x, x.t())
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        x = torch.addmm(x, poly, x, beta=a)
    return x


def ns_cols(x: Tensor, steps: int) -> Tensor:
    """The same polynomial on the columns side, ``X ← aX + X(bB + cB²)`` with ``B = XᵀX``
    (``A^k X = X B^k``); no transposed result, so both sides give the same memory layout."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = torch.mm(x.t(), x)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        x = torch.addmm(x, x, poly, beta=a)
    return x


def ns_gram(x: Tensor, steps: int, tall: bool, plain: int = 2) -> Tensor:
    """:func:`ns_rows` (``tall`` False) or :func:`ns_cols` (``tall`` True) for a long matrix: the
    first ``plain`` steps on ``X``, the rest carried out on the Gram matrix of the short side.

    With ``A = XXᵀ`` (``XᵀX`` when ``tall``) every later iterate is ``QX`` (``XQ``) for a
    polynomial ``Q`` of ``A``: ``P = aI + bA + cA²``, then ``Q ← PQ`` and ``A ← PAP`` (all
    polynomials of the first ``A``, so they commute), and ``X`` is multiplied once, at the end.
    For ``r ≤ c`` the short and long side, 5 steps of which 2 plain take ``12r²c + 22r³`` FLOPs
    against ``20r²c + 10r³``: about half for ``c = 9r`` (a 3×3 convolution's view).

    Why plain steps first: the Gram matrix squares the condition number, so its float32 rounding
    (``ε·‖A‖``) swamps a squared singular value below ``√ε``. Two plain steps raise the small
    singular values about twelvefold first. On matrices of condition number 10⁴ the result is then
    within ``2·10⁻⁵`` of the float64 iteration, like the plain steps (5 Gram steps: ``5·10⁻⁴``).
    Zero stays zero, and so do zero rows or columns: a zero-padded matrix stays zero-padded."""
    head = min(plain, steps)
    if head > 0:
        x = ns_cols(x, head) if tall else ns_rows(x, head)
    if steps == head:
        return x
    product = gram_product(torch.mm(x.t(), x) if tall else torch.mm(x, x.t()), steps - head)
    return torch.mm(x, product) if tall else torch.mm(product, x)


def gram_product(gram: Tensor, steps: int) -> Tensor:
    """``Q`` after ``steps ≥ 1`` Gram steps from ``A`` (see :func:`ns_gram`): ``P = aI + bA +
    cA²``, ``Q ← PQ``, ``A ← PAP``."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # aI added whole (exact: a zero off the diagonal), not in place on a diagonal view, which an
    # exported graph would have to scatter.
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * a
    product = gram  # Q, set at the first step
    for k in range(steps):
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c) + identity  # P = aI + bA + cA²
        product = poly if k == 0 else torch.mm(poly, product)  # PQ
        if k < steps - 1:
            gram = torch.mm(torch.mm(poly, gram), poly)  # PAP
    return product


def gram_side(rows: int, cols: int, gram_from: int = 3) -> bool:
    """Whether Newton–Schulz on a ``rows × cols`` matrix ends on the Gram matrix of its short
    side (:func:`ns_gram`): when the long side is at least ``gram_from`` times the short one (it
    takes fewer FLOPs from 1.5 times; measured 1.3 times faster at 4 times on a CPU)."""
    return max(rows, cols) >= gram_from * min(rows, cols)


def newton_schulz_flops(rows: int, cols: int, steps: int = NS_STEPS) -> float:
    """FLOPs a coordinate of :func:`newton_schulz` on a ``rows × cols`` matrix (``r ≤ c`` its
    sides, the Gram matrix ``r × r``): the Frobenius normalisation 6, and per plain iteration
    the Gram matrix ``2r``, its square ``2r²/c``, ``bA + cA²`` ``3r/c``, the product with ``X``
    ``2r`` and ``aX +`` 2; a long matrix (:func:`gram_side`) takes two such steps, then the Gram
    matrix and the final product ``4r`` and ``(8s − 6)r³`` FLOPs of ``r × r`` products for the
    other ``s`` steps. 0 for an empty matrix."""
    r, c = min(rows, cols), max(rows, cols)
    if r == 0:
        return 0.0
    plain = min(2, steps) if gram_side(r, c) else steps
    flops = 6 + plain * (4 * r + (2 * r * r + 3 * r) / c + 2)
    if plain < steps:
        flops += 4 * r + (8 * (steps - plain) - 6) * r * r / c
    return flops


def unit_frobenius(matrix: Tensor) -> Tensor:
    y = unit_max(matrix)
    norm = torch.sqrt(y.square().sum())
    return y / torch.where(norm > 0, norm, torch.ones_like(norm))


def newton_schulz(matrix: Tensor, steps: int = NS_STEPS) -> Tensor:
    """``steps`` quintic Newton–Schulz iterations from ``matrix`` toward the nearest semi-orthogonal
    matrix, after a safe Frobenius normalisation; the Gram matrix is taken on the smaller side.

    An odd function of ``matrix``: zero stays zero. The singular values end near 1 (within about
    [0.7, 1.2]), not exactly at 1: the coefficients trade accuracy for speed. A long matrix (see
    :func:`gram_side`) iterates on its Gram matrix (:func:`ns_gram`): the same polynomial, in
    fewer FLOPs.
    """
    return ns_iterate(unit_frobenius(matrix), steps)


def ns_iterate(x: Tensor, steps: int) -> Tensor:
    """:func:`newton_schulz`'s iterations from ``x`` (already normalised): on the Gram matrix of
    a long matrix's short side, else on the rows or the columns side."""
    rows, cols = x.shape[0], x.shape[1]
    if gram_side(rows, cols):
        return ns_gram(x, steps, rows > cols)
    if rows > cols:
        return ns_cols(x, steps)
    return ns_rows(x, steps)


def ns_in_place(x: Tensor, steps: int, chunk: int) -> Tensor:
    """:func:`newton_schulz`'s iterations (``x`` already normalised) computed in ``x`` itself:
    besides ``x`` only the Gram matrices of its short side ``r`` (``2r²`` values, ``4r²`` for a
    long matrix) and one chunk of at most ``chunk`` values (at least one row or column). Each
    step ``X ← aX + PX`` (``XP`` on the columns side) is linear in ``X``'s columns (rows), so
    it is taken a chunk of columns (rows) at a time, in place. Returns ``x``, which TorchScript
    and Python alike can then reshape. Same formulations as :func:`newton_schulz` (the Gram
    side from :func:`gram_side`), so the same values up to the order of float32 sums."""
    a, b, c = 3.4445, -4.7750, 2.0315  # locals: TorchScript reads no global floats
    rows, cols = x.shape[0], x.shape[1]
    tall = rows > cols
    plain = min(2, steps) if gram_side(rows, cols) else steps
    for _ in range(plain):
        gram = torch.mm(x.t(), x) if tall else torch.mm(x, x.t())
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        _apply_in_place(x, poly, a, tall, chunk)
    if plain == steps:
        return x
    product = gram_product(torch.mm(x.t(), x) if tall else torch.mm(x, x.t()), steps - plain)
    _apply_in_place(x, product, 0.0, tall, chunk)
    return x


def _apply_in_place(x: Tensor, matrix: Tensor, a: float, tall: bool, chunk: int) -> None:
    """``x ← a·x + matrix·x`` (``x·matrix`` when ``tall``), a chunk of columns (rows) at a time
    (every column of the result depends on that column of ``x`` alone)."""
    side = x.shape[1] if tall else x.shape[0]  # the short side: the matrix is side × side
    length = x.shape[0] if tall else x.shape[1]
    width = max(1, chunk // max(1, side))
    buffer = torch.empty(side * min(width, length), dtype=x.dtype, device=x.device)
    for lo in range(0, length, width):
        hi = min(lo + width, length)
        if tall:
            part = x[lo:hi]
            result = torch.mm(part, matrix, out=buffer[: (hi - lo) * side].view(hi - lo, side))
        else:
            part = x[:, lo:hi]
            result = torch.mm(matrix, part, out=buffer[: side * (hi - lo)].view(side, hi - lo))
        if a == 0.0:
            part.copy_(result)
        else:
            part.mul_(a).add_(result)
