"""The tensor functions of :class:`~compiledopt.learned.normalized.NormalizedMLP`, shared by its
whole-tensor update and its blockwise one (:mod:`compiledopt.learned.normalized_blocked`):
bias corrections, the per-tensor normalisation, the rational ``tanh`` and Newton–Schulz."""

from typing import Optional

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


def ns_rows(x: Tensor, steps: int, spare: Optional[Tensor] = None) -> Tensor:
    """The quintic step ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` (the rows side), ``steps``
    times. Each step writes one new matrix of ``X``'s size (``aX``, the product and their sum
    in one ``addmm``). With ``spare`` (a contiguous matrix of ``x``'s shape; not differentiable)
    it allocates none: the steps alternate between ``x`` and ``spare``, overwriting both, and the
    result is one of them."""
    a, b, c = 3.4445, -4.7750, 2.0315  # locals: TorchScript reads no global floats
    for _ in range(steps):
        gram = torch.mm(x, x.t())
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        if spare is None:
            x = torch.addmm(x, poly, x, beta=a)
        else:
            x, spare = torch.addmm(x, poly, x, beta=a, out=spare), x
    return x


def ns_cols(x: Tensor, steps: int, spare: Optional[Tensor] = None) -> Tensor:
    """The same polynomial on the columns side, ``X ← aX + X(bB + cB²)`` with ``B = XᵀX``
    (``A^k X = X B^k``); no transposed result, so both sides give the same memory layout.
    ``spare`` as in :func:`ns_rows`."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = torch.mm(x.t(), x)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        if spare is None:
            x = torch.addmm(x, x, poly, beta=a)
        else:
            x, spare = torch.addmm(x, x, poly, beta=a, out=spare), x
    return x


def unit_frobenius(matrix: Tensor) -> Tensor:
    y = unit_max(matrix)
    norm = torch.sqrt(y.square().sum())
    return y / torch.where(norm > 0, norm, torch.ones_like(norm))


def newton_schulz(matrix: Tensor, steps: int = NS_STEPS) -> Tensor:
    """``steps`` quintic Newton–Schulz iterations from ``matrix`` toward the nearest semi-orthogonal
    matrix, after a safe Frobenius normalisation; the Gram matrix is taken on the smaller side.

    An odd function of ``matrix``: zero stays zero. The singular values end near 1 (within about
    [0.7, 1.2]), not exactly at 1: the coefficients trade accuracy for speed.
    """
    x = unit_frobenius(matrix)
    if x.shape[0] > x.shape[1]:
        return ns_cols(x, steps)
    return ns_rows(x, steps)


def ns_tall(x: Tensor) -> Tensor:
    return ns_cols(x, NS_STEPS)


def ns_wide(x: Tensor) -> Tensor:
    return ns_rows(x, NS_STEPS)
