"""NormalizedMLP's update computed in blocks of coordinates (CPU inference: the eager backend,
and an exported TorchScript rule on large tensors).

:meth:`NormalizedMLP.update <compiledopt.learned.normalized.NormalizedMLP.update>` builds whole
tensor intermediates: the five feature columns, every hidden layer (``(N, 8)`` by default) and
their temporaries, over ten times the optimizer state for a large parameter. :func:`blocked_update`
computes the same maths with only its outputs at full size (the three new state tensors and the
direction) and every intermediate the size of one block of coordinates, in five passes over the
flattened tensors:

A. the new accumulators, written block by block into the new state tensors, and the running
   ``max|g|`` and ``max|m₁|``;
B. the float64 sums of ``(g / max|g|)²`` and ``(m₁ / max|m₁|)²`` (the two normalised features);
C. per block the features, their clamps and the network, ``out`` written into the direction
   tensor, and the running ``max|out|``;
D. the float64 sum of ``(out / max|out|)²``;
E. the direction scaled in place to unit RMS, block by block.

Formulation: the fused one (``fused = True``): the per-tensor mean squares are accumulated in
float64, as ``normalize(x, wide=True)`` (the sum over blocks, so in another order), and every
elementwise operation is the one ``update`` performs. The network is evaluated per block as
matrix products on feature-major buffers (measured faster per block than the unrolled
multiply-adds), so the direction agrees with the fused form to rounding of the compute dtype, not
bit for bit; the new state is bit for bit the same.

Memory (``N`` coordinates, contiguous inputs, the gradient in the network's dtype): the outputs,
``4N`` values, plus about ``25·b`` values for a block of ``b`` coordinates with the default
``(8, 8)`` network. ``b`` is ``block``, or ``⌈N/16⌉`` (at least 4096) for tensors smaller than
``16·block``, so the rise stays within ``6N`` values, twice the state, for ``N ≥ 65536`` (and
within ``4N`` values plus half a megabyte below that). With ``orthogonalize``, Newton–Schulz
runs in the direction itself (each step is linear in the matrix's columns, so it is taken a
block of columns at a time, in place): it adds the Gram matrices of the smaller side ``r``
(``2r²`` values, ``4r²`` for a long matrix: ``2N`` for a square one, less the longer its other
side) and one block. (Below a million coordinates it iterates on new matrices, each step one of
the parameter's size: faster there, and at most a few megabytes.)

:func:`blocked_rule` is written for TorchScript as well as Python, so the scripted rule of an
artifact runs this same code.
"""

import math
from typing import TYPE_CHECKING, List, Tuple

import torch
from torch import Tensor

from compiledopt._validation import check_int
from compiledopt.learned.mlp import check_shapes
from compiledopt.learned.normalized_ops import (
    BLOCK_SIZE,
    NS_STEPS,
    bias_scales,
    ns_in_place,
    ns_iterate,
)

if TYPE_CHECKING:  # the transform imports this module: annotations only
    from compiledopt.learned.normalized import NormalizedMLP

#: Newton–Schulz runs in place on matrices of at least this many coordinates (see
#: ``_newton_schulz_in_place``): 8% slower on a 2,000 × 5,000 matrix, and one matrix of the
#: parameter's size less.
IN_PLACE_FROM = 1 << 20
#: A tensor of fewer than ``PIECES · block`` coordinates is cut into ``PIECES`` blocks (of at least
#: ``MIN_BLOCK`` coordinates), so that the block's intermediates (about 30 values a coordinate
#: with the default network) stay under 2 values a coordinate of the tensor.
PIECES = 16
MIN_BLOCK = 4096


def _spans(numel: int, block: int) -> List[Tuple[int, int]]:
    return [(lo, min(lo + block, numel)) for lo in range(0, numel, block)]


def _safe(value: Tensor) -> Tensor:
    """``value`` where it is > 0, else 1 (the guard of ``normalize``)."""
    return torch.where(value > 0, value, torch.ones_like(value))


def _root_mean_square(x: Tensor, scale: Tensor, spans: List[Tuple[int, int]]) -> Tensor:
    """``sqrt(mean((x / scale)²))`` (guarded against 0) with the mean accumulated in float64
    block by block and rounded to ``x``'s dtype, as ``normalize(x, wide=True)`` does."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for span in spans:
        total += (x[span[0] : span[1]] / scale).square().sum(dtype=torch.float64)
    mean = (total / x.numel()).to(x.dtype)
    return torch.sqrt(_safe(mean))


def _unit_rms_in_place(out: Tensor, spans: List[Tuple[int, int]]) -> None:
    """Passes D and E: ``out ← out / max|out| / sqrt(mean(…²))`` in place, block by block."""
    peak = torch.zeros((), dtype=out.dtype, device=out.device)
    for span in spans:
        peak = torch.maximum(peak, out[span[0] : span[1]].abs().max())
    scale = _safe(peak)
    root = _root_mean_square(out, scale, spans)
    for span in spans:
        out[span[0] : span[1]].div_(scale).div_(root)


def blocked_update(
    transform: "NormalizedMLP",
    grad: Tensor,
    param: Tensor,
    state: List[Tensor],
    step: Tensor,
    block: int = BLOCK_SIZE,
) -> Tuple[Tensor, List[Tensor]]:
    """``transform.update(grad, param, state, step)`` of the fused formulation, computed in blocks
    of at most ``block`` coordinates (see the module doc): the same ``(direction, new_state)``.

    Allocates the direction and the three new state tensors (contiguous) and, besides them, only
    intermediates of ``O(block)`` values. Non-contiguous inputs are first copied to contiguous
    ones (one copy each). With ``orthogonalize`` on a rank ≥ 2 parameter the network's output is
    computed in blocks, but Newton–Schulz needs the whole matrix: it runs in the direction and one
    more matrix of its size (normalised in place, then iterations alternating between the two),
    so the bound is one tensor more there. Empty tensors give empty outputs (``update`` raises
    there, on the maximum of an empty tensor).

    Not differentiable (runs under ``torch.no_grad()``): use ``update`` for meta-training.

    Raises:
        ValueError: ``block`` is not a positive int, ``grad`` does not have ``param``'s shape, or
            ``state`` is not three tensors.
    """
    check_shapes(grad, param, state, 3)
    block = check_int(block, "block", 1)
    with torch.no_grad():
        return transform.in_blocks(grad, state, step, block)


def blocked_rule(
    grad: Tensor,
    state: List[Tensor],
    step: Tensor,
    decays: Tuple[float, float, float],
    clip: float,
    eps: float,
    vectors: bool,
    orthogonalize: bool,
    weights: List[Tensor],
    head: Tensor,
    skip: Tensor,
    block: int,
    pieces: int = PIECES,
    min_block: int = MIN_BLOCK,
) -> Tuple[Tensor, List[Tensor]]:
    """The five passes of the module doc on ``grad`` and ``state`` (the transform's options and
    weights given one by one; ``vectors``: the Adam-like rule). Written for TorchScript as well as
    Python: an exported TorchScript rule computes a large tensor with it. No checks here: the
    callers check. ``pieces`` and ``min_block``: :data:`PIECES` and :data:`MIN_BLOCK` (arguments
    because TorchScript reads no global constants)."""
    beta1, beta2, beta3 = decays
    shape, device = grad.shape, grad.device
    g = grad.reshape(-1)
    old = [s.reshape(-1) for s in state]
    new_state = [
        torch.empty(shape, dtype=torch.promote_types(s.dtype, grad.dtype), device=device)
        for s in state
    ]
    fast, slow, absolute = new_state[0].view(-1), new_state[1].view(-1), new_state[2].view(-1)
    numel = g.numel()
    spans = _spans(numel, min(block, max(min_block, -(-numel // pieces))))

    scales = bias_scales(step, beta1, beta2, beta3).to(grad.dtype)
    k1, k2, k3 = scales[0], scales[1], scales[2]

    # Pass A: the accumulators (and, for the Adam-like rule, the whole direction).
    g_peak = torch.zeros((), dtype=g.dtype, device=device)
    f_peak = torch.zeros((), dtype=fast.dtype, device=device)
    flat = torch.empty(numel if vectors else 0, dtype=fast.dtype, device=device)
    for lo, hi in spans:
        gb = g[lo:hi]
        fb = torch.mul(old[0][lo:hi], beta1, out=fast[lo:hi]).add_(gb * (1.0 - beta1))
        torch.mul(old[1][lo:hi], beta2, out=slow[lo:hi]).add_(gb * (1.0 - beta2))
        ab = torch.mul(old[2][lo:hi], beta3, out=absolute[lo:hi]).add_(gb.abs() * (1.0 - beta3))
        if vectors:
            torch.clamp(fb / (ab + eps) * k1, -clip, clip, out=flat[lo:hi])
        else:
            g_peak = torch.maximum(g_peak, gb.abs().max())
            f_peak = torch.maximum(f_peak, fb.abs().max())
    if vectors:
        return flat.view(shape), new_state
    if numel == 0:
        return torch.empty(shape, dtype=grad.dtype, device=device), new_state

    # Pass B: the RMS of the two normalised features.
    g_scale, f_scale = _safe(g_peak), _safe(f_peak)
    g_root = _root_mean_square(g, g_scale, spans)
    f_root = _root_mean_square(fast, f_scale, spans)

    # Pass C: features and network per block, out into the direction (or a buffer of the
    # network's dtype when it differs from the gradient's).
    dtype, size = skip.dtype, spans[0][1]
    out = torch.empty(numel, dtype=dtype, device=device)
    features = torch.empty(skip.shape[0], size, dtype=dtype, device=device)
    hidden = [torch.empty(w.shape[0], size, dtype=dtype, device=device) for w in weights]
    for lo, hi in spans:
        gb, fb, sb, ab = g[lo:hi], fast[lo:hi], slow[lo:hi], absolute[lo:hi]
        x = features[:, : hi - lo]
        den = ab + eps
        _clamp_into(x[0], fb / den * k1, clip)
        _clamp_into(x[1], sb / den * k2, clip)
        _clamp_into(x[2], gb / den * k3, clip)
        _clamp_into(x[3], gb / g_scale / g_root, clip)
        _clamp_into(x[4], fb / f_scale / f_root, clip)
        _network_into(x, out[lo:hi], weights, hidden, head, skip)

    if orthogonalize and grad.dim() >= 2:
        out = _newton_schulz_in_place(out, shape[0], spans)
    # Passes D and E.
    _unit_rms_in_place(out, spans)
    return out.view(shape).to(grad.dtype), new_state


def _newton_schulz_in_place(
    out: Tensor,
    rows: int,
    spans: List[Tuple[int, int]],
    steps: int = NS_STEPS,
    in_place_from: int = IN_PLACE_FROM,
) -> Tensor:
    """:func:`newton_schulz` of ``out`` viewed as a matrix of ``rows`` rows: normalised in place
    (``out / max|out|`` over its Frobenius norm, the mean of squares accumulated in float64),
    then iterated in ``out`` itself (:func:`ns_in_place`, chunks of the blocks' size) from
    :data:`IN_PLACE_FROM` coordinates; a smaller matrix takes the allocating iteration, faster
    there (up to twice on a 300 × 230 matrix) for a few matrices of at most 4 MB. Returns the
    flat result."""
    _unit_rms_in_place(out, spans)
    out.div_(math.sqrt(out.numel()))
    matrix = out.view(rows, -1)
    if out.numel() < in_place_from:
        return ns_iterate(matrix, steps).reshape(-1)
    ns_in_place(matrix, steps, max(hi - lo for lo, hi in spans))
    return out


def _network_into(
    x: Tensor, out: Tensor, weights: List[Tensor], hidden: List[Tensor], head: Tensor, skip: Tensor
) -> None:
    """``out ← x·skip + head(tanh(… tanh(W₁ x)))`` for the features ``x`` (``(5, m)``), as
    matrix products on feature-major buffers: each hidden layer is ``(hᵢ, B)`` (``hidden``), so
    every column write is contiguous."""
    m = out.shape[0]
    h = x
    for w, buffer in zip(weights, hidden):
        h = torch.mm(w, h, out=buffer[:, :m]).tanh_()
    row = out.view(1, m)
    torch.mm(skip.view(1, -1), x, out=row)
    row.addmm_(head, h)


def _clamp_into(target: Tensor, value: Tensor, clip: float) -> None:
    """``target ← clamp(value, ±clip)`` converted to ``target``'s dtype (as ``update`` clamps,
    then converts)."""
    if value.dtype == target.dtype:
        torch.clamp(value, -clip, clip, out=target)
    else:
        target.copy_(torch.clamp(value, -clip, clip))
