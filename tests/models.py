"""Small float64 models and data shared by the optimizer tests."""

from typing import List, Tuple

import torch
from torch import Tensor, nn

import compiledopt as co


def conv_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Conv2d (4-D weight, bias) -> Linear (2-D weight, bias): every rank the seed covers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).to(
        dtype
    )


def batch(seed: int, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 5, 5, generator=generator, dtype=dtype)
    y = torch.randn(6, 2, generator=generator, dtype=dtype)
    return x, y


def mse(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).mean()


class ScalarScale(co.transforms.Transform):
    """direction = exp(log_scale) · g: a user-written shape-agnostic transform, one weight."""

    shape_agnostic = True

    def __init__(self, log_scale: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(log_scale, dtype=dtype))

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return torch.exp(self.log_scale) * grad, state
