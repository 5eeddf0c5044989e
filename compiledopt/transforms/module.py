"""Transforms made of an arbitrary ``nn.Module`` applied to a reshaped gradient."""

import math
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from compiledopt.transforms.base import Cost, Transform, check_grad_shape
from compiledopt.transforms.shapes import check_supported


def as_module(made: object, maker: object, what: str) -> nn.Module:
    if not isinstance(made, nn.Module):
        raise TypeError(
            f"{what}: {maker!r} returned {type(made).__name__}, expected an nn.Module instance"
        )
    return made


class ReshapedTransform(Transform):
    """Applies ``transform`` to the gradient viewed as ``shape``, and returns the parameter's shape.

    ``direction = transform(grad.reshape(shape)).reshape(grad.shape)``; stateless. Reshaping (rather
    than ``view``) accepts gradients in any memory format, channels_last included.

    Args:
        transform (nn.Module): maps a tensor of ``shape`` to a tensor with the same number of
            elements.
        shape (sequence of int): the shape ``transform`` expects.
        param_shape (sequence of int, optional): the parameter shape this transform is bound to;
            when given, gradients of any other shape raise ``ValueError``. (default: None)

    Example:
        >>> t = ReshapedTransform(torch.nn.Identity(), shape=(1, 12), param_shape=(3, 4))
        >>> t(torch.ones(3, 4)).shape
        torch.Size([3, 4])
    """

    shape: List[int]
    param_shape: List[int]

    def __init__(
        self,
        transform: nn.Module,
        shape: Sequence[int],
        param_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.transform = as_module(transform, transform, "ReshapedTransform")
        self.shape = [int(d) for d in shape]
        self.check_shape = param_shape is not None
        self.param_shape = [] if param_shape is None else [int(d) for d in param_shape]
        if self.check_shape and math.prod(self.param_shape) != math.prod(self.shape):
            raise ValueError(
                f"ReshapedTransform: shape {tuple(self.shape)} does not hold a parameter of shape "
                f"{tuple(self.param_shape)}"
            )

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        if self.check_shape:
            check_grad_shape(grad, self.param_shape)
        return self.transform(grad.reshape(self.shape)).reshape(grad.shape), state

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """The wrapped module's linear layers (``2·in·out`` FLOPs and the weights read, a bias
        ``out``) and the update 2 a coordinate; ``g``, ``p`` in, ``p`` out. Only modules built of
        ``nn.Linear`` and parameter-free layers have a cost model."""
        numel = math.prod(shape)
        flops, weights = 2.0 * numel, 0
        for module in self.transform.modules():
            if isinstance(module, nn.Linear):
                flops += (
                    2 * module.in_features * module.out_features * (numel // module.in_features)
                )
                flops += (
                    module.out_features * (numel // module.in_features) * (module.bias is not None)
                )
                weights += module.weight.numel()
            elif next(module.parameters(recurse=False), None) is not None:
                raise NotImplementedError(
                    f"ReshapedTransform has no cost model for {type(module).__name__} weights"
                )
        return Cost(flops, float(itemsize * (weights + 3 * numel)), flops)


class ModuleTransform:
    """Builds a transform from any module class: ``module_cls(numel, numel)`` on the flat gradient.

    Calling the factory with a parameter ``p`` returns a :class:`ReshapedTransform` that feeds
    ``grad.reshape(1, p.numel())`` to ``module_cls(p.numel(), p.numel())`` (built in ``p``'s dtype
    and device) and reshapes the result back.

    Cost: a dense module on the flat gradient has ``numel²`` weights, which is quadratic in the
    parameter's size (a 784×10 weight needs a 7840×7840 matrix, 245 MB). For large layers use
    :class:`KroneckerTransform`, whose cost is ``n² + m²``.

    Starting from the identity: ``nn.Linear`` initialises randomly, so
    ``ModuleTransform(nn.Linear)`` starts as a random map. Pass a constructor that starts at the
    identity instead::

        def identity_linear(n, m):
            layer = torch.nn.Linear(n, m)
            torch.nn.init.eye_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
            return layer

        transform = ModuleTransform(identity_linear)   # T(g) = g until it is trained

    Args:
        module_cls (callable): ``module_cls(in_features, out_features)`` returns an ``nn.Module``.

    Example:
        >>> classifier = torch.nn.Linear(784, 10, bias=False)
        >>> linear_update = ModuleTransform(torch.nn.Linear)(classifier.weight)
        >>> linear_update(torch.randn(10, 784)).shape
        torch.Size([10, 784])
    """

    def __init__(self, module_cls: Callable[[int, int], nn.Module]) -> None:
        if not callable(module_cls):
            raise TypeError(f"ModuleTransform expects a callable module_cls, got {module_cls!r}")
        self.module_cls = module_cls

    def __call__(self, param: Tensor) -> ReshapedTransform:
        check_supported(param, "ModuleTransform")
        numel = param.numel()
        module = as_module(self.module_cls(numel, numel), self.module_cls, "ModuleTransform")
        module = module.to(device=param.device, dtype=param.dtype)
        return ReshapedTransform(module, shape=(1, numel), param_shape=tuple(param.shape))

    def __repr__(self) -> str:
        return f"ModuleTransform({self.module_cls!r})"
