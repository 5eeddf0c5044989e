"""Kronecker-factored transforms (Arnold et al. 2019)."""

from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from compiledopt.nn.kronecker import KroneckerLinear, KroneckerLSTM, KroneckerRNN
from compiledopt.transforms.base import Cost, Transform, check_grad_shape
from compiledopt.transforms.module import as_module
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
        # A duck-typed layer: nn.Module types its attributes as Tensor | Module.
        return self.layer.init_state(param.reshape(self.n, self.m))  # type: ignore[operator]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, self.param_shape)
        # The duck-typed layer again (TorchScript wants a type-ignore comment to end its line).
        direction, new_state = self.layer.step(  # type: ignore[operator]
            grad.reshape(self.n, self.m), state
        )
        return direction.reshape(grad.shape), new_state

    def state_names(self) -> List[str]:
        count = len(self.layer.init_state(torch.zeros(self.n, self.m)))  # type: ignore[operator]
        return ["hidden", "cell"][:count]

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """On the ``(n, m)`` view, per Kronecker product ``L'·G·R'`` of the layer (frozen:
        ``psd`` factors folded): ``2nm(n + m)`` FLOPs, a bias ``nm``, the ``n² + m²`` weights
        read; the recurrent layers' gates ``2nm`` (RNN: sum, tanh) or ``13nm`` (LSTM: four sums,
        four nonlinearities, cell and hidden updates); update ``2nm``. Bytes: ``g``, ``p``, the
        state in, the state and ``p`` out. An eager call also forms each ``psd`` layer's ``LᵀL``
        and ``RᵀR``: ``2n³ + 2m³`` more (``eager_flops``)."""
        n, m = self.n, self.m
        numel = n * m
        products = [k for k in self.layer.modules() if isinstance(k, KroneckerLinear)]
        flops = eager = 0.0
        for product in products:
            flops += 2 * numel * (n + m) + numel * (product.bias is not None)
            eager += (2 * n**3 + 2 * m**3) * bool(product.psd)
        gates = {KroneckerLinear: 0, KroneckerRNN: 2, KroneckerLSTM: 13}.get(type(self.layer))
        if gates is None:
            raise NotImplementedError(
                f"KroneckerUpdate has no cost model for a {type(self.layer).__name__} layer"
            )
        flops += (gates + 2) * numel
        states = len(self.state_names())
        weights = len(products) * (n * n + m * m)
        total_bytes = itemsize * (weights + (3 + 2 * states) * numel)
        return Cost(float(flops), float(total_bytes), float(flops + eager))


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
        layer = as_module(layer, self.kronecker_cls, "KroneckerTransform")
        layer = layer.to(device=param.device, dtype=param.dtype)
        return KroneckerUpdate(layer, list(param.shape))

    def __repr__(self) -> str:
        return f"KroneckerTransform({self.kronecker_cls!r}, bias={self.bias}, psd={self.psd})"
