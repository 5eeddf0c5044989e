"""NormalizedMLP's network in an exported graph of the matmul form (ONNX), in pieces.

An exported graph computes a tensor in one call, and onnxruntime materialises every intermediate
of the matmul form: the five feature columns and the hidden layers, about 30 values a coordinate
with the default ``(8, 8)`` network, eleven times the optimizer state on a large matrix.
:func:`exported_network` computes the two normalised features' per-tensor divisors on the whole
tensor, then the features and the network of a tensor of at least ``PIECES · MIN_BLOCK``
(65,536) coordinates in ``PIECES`` (16) pieces of ``shape[0] // 16`` rows and one of the rest,
one after another, so those intermediates exist a piece at a time; a smaller tensor is one
piece, and so is one of fewer than 16 rows (a few long rows, rare at that size). The choice is
a ``torch.cond`` on the size, so one dynamic graph serves every size. Each coordinate gets the
arithmetic of :meth:`NormalizedMLP.update <compiledopt.learned.normalized.NormalizedMLP.update>`
(``normalize(x)`` is ``x / scale / root``, :func:`scale_and_root`).

The pieces are cut from the tensors as the graph gets them (the gradient) and makes them (the
new accumulators, which are outputs): flattened first, onnxruntime copied all four, since a
Reshape of a graph input or output cannot share its buffer. A piece is flattened after the cut.

Measured (``python -m benchmarks.step_speed.targets --backends onnx --memory-shape 2000x5000``):
on a 2000 × 5000 parameter the rank-2 graph's peak beyond the state fell from 11.4 times the
state to 3.84 with the pieces, and to 3.13 with the cut from the unflattened tensors (the eager
and TorchScript steps: 1.92); Newton–Schulz, which needs the whole matrix and cannot iterate in
place in a graph, is most of what remains.
"""

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiledopt.learned.normalized_blocked import MIN_BLOCK, PIECES
from compiledopt.learned.normalized_ops import (
    NS_STEPS,
    ns_cols,
    ns_gram,
    ns_rows,
    scale_and_root,
    unit_frobenius,
)

if TYPE_CHECKING:  # the transform imports this module: annotations only
    from compiledopt.learned.normalized import NormalizedMLP


def exported_network(
    transform: "NormalizedMLP",
    grad: Tensor,
    fast: Tensor,
    slow: Tensor,
    absolute: Tensor,
    scales: Tensor,
) -> Tensor:
    """The network's flat output (before Newton–Schulz and the normalisation) for the gradient
    and the new accumulators, in pieces on a large tensor (see the module doc). For tracing by
    ``torch.export``; eager code gets the same values from ``update``'s whole-tensor path."""

    def piece(g: Tensor, f: Tensor, s: Tensor, a: Tensor, factors: Tensor, norms: Tensor) -> Tensor:
        # contiguous(): a cond branch's operands have unknown strides, and a reshape would ask
        # for them (an aten.sym_stride the ONNX exporter cannot translate).
        g, f, s, a = (t.contiguous().reshape(-1) for t in (g, f, s, a))
        normalized = (g / norms[0] / norms[1], f / norms[2] / norms[3])
        columns = transform.feature_columns(g, f, s, a, factors, *normalized)
        return transform.network_of(torch.stack(columns, dim=1))

    def pieces(
        g: Tensor, f: Tensor, s: Tensor, a: Tensor, factors: Tensor, norms: Tensor
    ) -> Tensor:
        # PIECES pieces of shape[0] // PIECES rows, then the rows left over, by narrow (a
        # tensor of fewer rows than pieces is one piece: cutting it otherwise asks for its
        # strides, which the ONNX exporter cannot translate in a branch). Measured against the
        # alternatives: tensor_split of a dynamic size that PIECES does not divide lost
        # elements in the ONNX exporter (74,996 of 75,000); unbind or select of a (PIECES, m)
        # view let onnxruntime copy every piece's inputs first; ceil-sized slices traced 2x
        # slower.
        size = g.shape[0] // PIECES
        parts = []
        for k in range(PIECES + 1):
            length = size if k < PIECES else g.shape[0] - PIECES * size
            g_, f_, s_, a_ = (t.narrow(0, k * size, length) for t in (g, f, s, a))
            parts.append(piece(g_, f_, s_, a_, factors, norms))
        return torch.cat(parts)

    norms = torch.stack([*scale_and_root(grad), *scale_and_root(fast)])
    operands = (grad, fast, slow, absolute, scales, norms)
    many = grad.numel() >= PIECES * MIN_BLOCK
    if statically_known_true(many):
        return pieces(*operands)
    if statically_known_true(torch.sym_not(many)):
        return piece(*operands)
    return torch.cond(many, pieces, piece, operands)


def exported_newton_schulz(matrix: Tensor) -> Tensor:
    """:func:`~compiledopt.learned.normalized_ops.newton_schulz` in an exported graph of symbolic
    sizes: the side (rows or columns) and whether the matrix is long enough to end on the Gram
    matrix of its short side (:func:`~compiledopt.learned.normalized_ops.gram_side`) chosen by
    ``torch.cond``, so one graph serves every shape with the formulation the eager rule takes
    (a 3×3 convolution's view, 512 × 4,608: about a third fewer FLOPs than five plain steps)."""
    return torch.cond(matrix.shape[0] > matrix.shape[1], _tall, _wide, (unit_frobenius(matrix),))


def _tall(x: Tensor) -> Tensor:
    return torch.cond(x.shape[0] >= 3 * x.shape[1], _gram_tall, _plain_tall, (x,))


def _wide(x: Tensor) -> Tensor:
    return torch.cond(x.shape[1] >= 3 * x.shape[0], _gram_wide, _plain_wide, (x,))


def _gram_tall(x: Tensor) -> Tensor:
    return ns_gram(x, NS_STEPS, True)


def _gram_wide(x: Tensor) -> Tensor:
    return ns_gram(x, NS_STEPS, False)


def _plain_tall(x: Tensor) -> Tensor:
    return ns_cols(x, NS_STEPS)


def _plain_wide(x: Tensor) -> Tensor:
    return ns_rows(x, NS_STEPS)
