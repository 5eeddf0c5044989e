"""How shape-bound transforms factorise a parameter's shape.

Every supported rank, in one table (``d0`` is the output dimension, as in ``nn.Linear`` and
``nn.ConvNd`` weights):

==============================  ===================  =============================================
parameter                       Kronecker ``(n, m)``  Meta-Curvature modes
==============================  ===================  =============================================
0-D scalar ``()``               ``(1, 1)``            element-wise (one scale)
1-D bias ``(d0,)``              ``(d0, 1)``           element-wise (``d0`` scales)
2-D ``Linear`` ``(d0, d1)``     ``(d0, d1)``          ``M_out (d0, d0)``, ``M_in (d1, d1)``
3-D ``Conv1d`` ``(d0, d1, k)``  ``(d0, d1·k)``        ``M_out``, ``M_in``, ``M_fan (k, k)``
4-D ``Conv2d`` ``(d0, d1, kh, kw)``  ``(d0, d1·kh·kw)``  ``M_fan`` of size ``kh·kw``
5-D ``Conv3d``                  ``(d0, d1·kd·kh·kw)``  ``M_fan`` of size ``kd·kh·kw``
==============================  ===================  =============================================

Higher ranks and empty parameters raise ``ValueError`` naming the shape.
"""

import math
from typing import Sequence, Tuple

import torch

MAX_RANK = 5


def check_supported(param: torch.Tensor, what: str) -> None:
    """Raise unless ``param`` is a non-empty floating tensor of rank 0 to :data:`MAX_RANK`."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{what} expects a parameter tensor, got {type(param).__name__}")
    shape = tuple(param.shape)
    if param.dim() > MAX_RANK:
        raise ValueError(
            f"{what} supports parameters of rank 0 to {MAX_RANK}, got shape {shape} "
            f"(rank {param.dim()})"
        )
    if param.numel() == 0:
        raise ValueError(f"{what} cannot be built for an empty parameter of shape {shape}")
    if not (param.is_floating_point() and not param.is_complex()):
        raise ValueError(f"{what} needs a real floating-point parameter, got dtype {param.dtype}")


def kronecker_factors(shape: Sequence[int]) -> Tuple[int, int]:
    """The ``(n, m)`` matrix view of a parameter of ``shape`` (see the module table)."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def curvature_modes(shape: Sequence[int]) -> Tuple[int, int, int]:
    """The ``(out, in, fan)`` mode sizes of a rank-2+ parameter (``fan`` is 1 for 2-D)."""
    if len(shape) < 2:
        raise ValueError(f"Meta-Curvature modes need a rank-2+ shape, got {tuple(shape)}")
    return int(shape[0]), int(shape[1]), math.prod(int(d) for d in shape[2:])
