"""Meta-Curvature (Park & Oliva 2019)."""

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from compiledopt.transforms.base import Cost, Transform, check_grad_shape
from compiledopt.transforms.shapes import check_supported, curvature_modes


class MetaCurvatureTransform(Transform):
    r"""Learned curvature matrices acting on each mode of the gradient tensor.

    Update rule, with ``G`` the gradient and ``lr`` a fixed (non-learnable) scale:

    * 0-D and 1-D parameters: element-wise, ``U = lr · m ⊙ G`` with ``m`` of the parameter's shape;
    * 2-D ``(o, i)``: ``U = lr · M_out G M_in``;
    * 3-D to 5-D ``(o, i, k...)``, viewed as ``(o, i, f)`` with ``f = prod(k...)``:
      ``U[a, b, c] = lr · Σ M_out[a, x] G[x, y, z] M_in[y, b] M_fan[z, c]``.

    All factors start at the identity (``m`` at ones), so a fresh transform returns ``lr · G``.
    Stateless. Weights: ``scale`` (element-wise case) or ``out_curvature``, ``in_curvature`` and,
    for rank 3+, ``fan_curvature``.

    Args:
        param (Tensor): the parameter whose gradients will be transformed (shape, dtype, device).
        lr (float, optional): fixed scale of the update. (default: 1.0)

    Reference:
        Park & Oliva. 2019. "Meta-Curvature."

    Example:
        >>> classifier = torch.nn.Linear(784, 10, bias=False)
        >>> metacurvature_update = MetaCurvatureTransform(classifier.weight)
        >>> g = torch.randn(10, 784)
        >>> torch.allclose(metacurvature_update(g), g)
        True
    """

    param_shape: List[int]

    def __init__(self, param: Tensor, lr: float = 1.0) -> None:
        super().__init__()
        check_supported(param, "MetaCurvatureTransform")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"Invalid lr: {lr}")
        self.lr = float(lr)
        self.param_shape = list(param.shape)
        dtype, device = param.dtype, param.device
        if param.dim() < 2:
            self.scale = nn.Parameter(torch.ones(param.shape, dtype=dtype, device=device))
        else:
            out, inner, fan = curvature_modes(param.shape)
            self.out_curvature = nn.Parameter(torch.eye(out, dtype=dtype, device=device))
            self.in_curvature = nn.Parameter(torch.eye(inner, dtype=dtype, device=device))
            if param.dim() > 2:
                self.fan_curvature = nn.Parameter(torch.eye(fan, dtype=dtype, device=device))

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, self.param_shape)
        # hasattr is resolved when the module is compiled: each instance keeps one branch.
        if hasattr(self, "scale"):
            return self.lr * (self.scale * grad), state
        if hasattr(self, "fan_curvature"):
            out, inner = self.out_curvature.shape[0], self.in_curvature.shape[0]
            fan = self.fan_curvature.shape[0]
            u = (self.out_curvature @ grad.reshape(out, inner * fan)).reshape(out, inner, fan)
            u = torch.matmul(u.transpose(1, 2), self.in_curvature).transpose(1, 2)
            u = u @ self.fan_curvature
            return self.lr * u.reshape(grad.shape), state
        return self.lr * (self.out_curvature @ grad @ self.in_curvature), state

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """Rank < 2: ``lr·(s ⊙ g)`` and the update 4 FLOPs, ``s`` read. ``(o, i)``:
        ``2oi(o + i)`` for the two products plus ``3oi``; ``(o, i, f)``: ``2oif(o + i + f)``
        plus ``3oif``; the ``o² + i² (+ f²)`` curvature matrices read. Bytes also: ``g``, ``p``
        in, ``p`` out."""
        numel = math.prod(shape)
        if len(shape) < 2:
            return Cost.elementwise(shape, 4, 4, itemsize)
        modes = curvature_modes(shape)[: 2 if len(shape) == 2 else 3]
        flops = float(2 * numel * sum(modes) + 3 * numel)
        return Cost(flops, float(itemsize * (sum(d * d for d in modes) + 3 * numel)), flops)
