"""Kronecker-factored transforms (Arnold et al. 2019)."""

from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

from compiledopt.transforms.base import Transform, check_grad_shape
from compiledopt.transforms.module import _as_module
from compiledopt.transforms.shapes import check_supported, kronecker_factors


class KroneckerUpdate(Transform):
    """A Kronecker layer applied to the ``(n, m)`` matrix view of one parameter's gradient.

    ``direction = layer.step(grad.reshape(n, m), state)`` reshaped back to the parameter's shape,
    with ``(n, m)`` from :func:`~compiledopt.transforms.shapes.kronecker_factors`. The state is the
    layer's: ``[]`` for ``KroneckerLinear``, ``[hidden]`` for ``KroneckerRNN``, ``[hidden, cell]``
    for ``KroneckerLSTM``, each ``(n, m)``.

    Args:
        layer (nn.Module): a layer with ``init_state(x)`` and ``step(x, state)`` methods, such as
            :class:`compiledopt.nn.KroneckerLinear`.
        param_shape (sequence of int): the parameter shape this transform is bound to.
    """

    param_shape: List[int]

    def __init__(self, layer: nn.Module, param_shape: List[int]) -> None:
        super().__init__()
        for method in ("init_state", "step"):
            if not callable(getattr(layer, method, None)):
                raise TypeError(
                    f"KroneckerTransform needs a layer with init_state(x) and step(x, state) "
                    f"(see compiledopt.nn.KroneckerLinear); "
                    f"{type(layer).__name__} has no {method}()"
                )
        self.layer = layer
        self.param_shape = [int(d) for d in param_shape]
        n, m = kronecker_factors(self.param_shape)
        self.n = n
        self.m = m

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        check_grad_shape(param, self.param_shape)
        return self.layer.init_state(param.reshape(self.n, self.m))

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, self.param_shape)
        direction, new_state = self.layer.step(grad.reshape(self.n, self.m), state)
        return direction.reshape(grad.shape), new_state

    def state_names(self) -> List[str]:
        count = len(self.layer.init_state(torch.zeros(self.n, self.m)))
        return ["hidden", "cell"][:count]


class KroneckerTransform:
    """Factory of Kronecker-factored transforms, one per parameter.

    For a parameter of shape ``(d0, d1, ...)`` it builds ``kronecker_cls(n, m, bias=bias, psd=psd)``
    on the ``(n, m) = (d0, d1·...)`` matrix view of the gradient (0-D: ``(1, 1)``, 1-D: ``(d0, 1)``;
    see :mod:`compiledopt.transforms.shapes`), in the parameter's dtype and device. A ``(n, m)``
    weight then costs ``n² + m²`` transform weights instead of ``(n·m)²``.

    Args:
        kronecker_cls (callable): ``kronecker_cls(n, m, bias=..., psd=...)`` returns a layer with
            ``init_state``/``step``, e.g. :class:`compiledopt.nn.KroneckerLinear`,
            :class:`~compiledopt.nn.KroneckerRNN` or :class:`~compiledopt.nn.KroneckerLSTM`.
        bias (bool, optional): passed to ``kronecker_cls``. (default: False)
        psd (bool, optional): passed to ``kronecker_cls``; positive semi-definite factors.
            (default: True)

    Reference:
        Arnold et al. 2019. "When MAML can adapt fast and how to assist when it cannot."

    Example:
        >>> classifier = torch.nn.Linear(784, 10, bias=False)
        >>> kronecker_update = KroneckerTransform(compiledopt.nn.KroneckerLinear)(classifier.weight)
        >>> kronecker_update(torch.ones(10, 784)).shape
        torch.Size([10, 784])
    """

    def __init__(
        self, kronecker_cls: Callable[..., nn.Module], bias: bool = False, psd: bool = True
    ) -> None:
        if not callable(kronecker_cls):
            raise TypeError(
                f"KroneckerTransform expects a callable kronecker_cls, got {kronecker_cls!r}"
            )
        self.kronecker_cls = kronecker_cls
        self.bias = bool(bias)
        self.psd = bool(psd)

    def __call__(self, param: Tensor) -> KroneckerUpdate:
        check_supported(param, "KroneckerTransform")
        n, m = kronecker_factors(param.shape)
        layer = self.kronecker_cls(n, m, bias=self.bias, psd=self.psd)
        layer = _as_module(layer, self.kronecker_cls, "KroneckerTransform")
        layer = layer.to(device=param.device, dtype=param.dtype)
        return KroneckerUpdate(layer, list(param.shape))

    def __repr__(self) -> str:
        return f"KroneckerTransform({self.kronecker_cls!r}, bias={self.bias}, psd={self.psd})"
