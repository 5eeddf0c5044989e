"""Non-learned baselines on the transform contract: SGD, Adam and AdamW.

Each one reproduces its ``torch.optim`` namesake step for step: the caller's
``p <- p - lr * direction`` gives the same parameters as ``torch.optim.X(..., lr=lr)``. They are
shape-agnostic (one instance serves every parameter) and have no learnable weights; they are the
reference points that learned transforms are compared against, and they ship through the same
export paths.

State layout (per parameter; every tensor has the parameter's shape, dtype and device):

=========  ==============================================  ===================================
transform  state (names as in ``torch.optim``)             when
=========  ==============================================  ===================================
SGD        ``[]``                                          ``momentum == 0``
SGD        ``[momentum_buffer]``                           ``momentum != 0``
Adam(W)    ``[exp_avg, exp_avg_sq]``                       ``amsgrad=False``
Adam(W)    ``[exp_avg, exp_avg_sq, max_exp_avg_sq]``       ``amsgrad=True``
=========  ==============================================  ===================================

``torch.optim``'s per-parameter ``step`` is not state here: the caller passes it as ``step``.
"""

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt._validation import check_real
from compiledopt.transforms.base import Cost, Transform, check_grad_shape


def _check_betas(betas: object) -> Tuple[float, float]:
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats)")
    return (
        check_real(betas[0], "beta parameter at index 0", 0.0, 1.0),
        check_real(betas[1], "beta parameter at index 1", 0.0, 1.0),
    )


def _scalar_dtype(grad: Tensor) -> torch.dtype:
    """The dtype bias corrections are computed in: float64 for float64, else float32."""
    if grad.dtype == torch.float64:
        return torch.float64
    return torch.float32


class SGD(Transform):
    r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    With ``g_t`` the gradient, ``λ`` the weight decay, ``μ`` the momentum and ``τ`` the dampening:

    .. math::

        d_t &= g_t + λ θ_t \\
        b_t &= d_t \text{ if } t = 0 \text{ else } μ b_{t-1} + (1 - τ) d_t \\
        \text{direction} &= d_t + μ b_t \text{ (Nesterov) or } b_t \text{ (else); } d_t
            \text{ when } μ = 0

    and the caller applies ``θ_{t+1} = θ_t − lr · direction``. State: ``[momentum_buffer]``
    (``b``), or ``[]`` when ``momentum == 0``. Reads ``param`` only when ``weight_decay != 0``.

    Args:
        momentum (float, optional): momentum factor μ. (default: 0.0)
        dampening (float, optional): dampening τ of the momentum. (default: 0.0)
        nesterov (bool, optional): Nesterov momentum; needs ``momentum > 0`` and
            ``dampening == 0``. (default: False)
        weight_decay (float, optional): L2 penalty λ, added to the gradient. (default: 0.0)

    Reference:
        Sutskever, Martens, Dahl & Hinton. 2013. "On the importance of initialization and
        momentum in deep learning." (the formulation of ``torch.optim.SGD``)

    Example:
        >>> sgd = SGD(momentum=0.9)
        >>> param, grad = torch.ones(3), torch.full((3,), 0.5)
        >>> state = sgd.init_state(param)
        >>> direction, state = sgd.update(grad, param, state, torch.tensor(0))
        >>> param = param - 0.1 * direction
        >>> param
        tensor([0.9500, 0.9500, 0.9500])
    """

    shape_agnostic = True
    view_invariant = True

    def __init__(
        self,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.momentum = check_real(momentum, "momentum value", 0.0)
        self.dampening = check_real(dampening, "dampening value", -math.inf)
        self.weight_decay = check_real(weight_decay, "weight_decay value", 0.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Invalid nesterov: {nesterov!r} (expected a bool)")
        if nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        self.nesterov = nesterov
        self.reads_param = self.weight_decay != 0.0

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        if self.momentum == 0.0:
            return []
        return [torch.zeros_like(param)]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, list(param.shape))
        d = grad
        if self.weight_decay != 0.0:
            d = d + self.weight_decay * param
        if self.momentum == 0.0:
            return d, state
        # torch.optim starts the buffer at the first gradient, undamped.
        buf = torch.where(step == 0, d, self.momentum * state[0] + (1.0 - self.dampening) * d)
        if self.nesterov:
            return d + self.momentum * buf, [buf]
        return buf, [buf]

    def pointwise(self, rank: int) -> bool:
        """Elementwise at every rank."""
        return True

    def state_names(self) -> List[str]:
        return [] if self.momentum == 0.0 else ["momentum_buffer"]

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """Per coordinate: weight decay 2, momentum 3, Nesterov 2 (each when on), update 2.
        Bytes: ``g``, ``p`` and the buffer in, the buffer and ``p`` out."""
        momentum = self.momentum != 0.0
        flops = 2 * (self.weight_decay != 0.0) + 3 * momentum + 2 * self.nesterov + 2
        return Cost.elementwise(shape, flops, 3 + 2 * momentum, itemsize)

    def extra_repr(self) -> str:
        return (
            f"momentum={self.momentum}, dampening={self.dampening}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay}"
        )


class Adam(Transform):
    r"""Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    With ``t`` the 0-based ``step`` and ``g`` the gradient:

    .. math::

        g'_t &= g_t + λ θ_t \quad (\text{coupled decay; } g'_t = g_t \text{ when decoupled}) \\
        m_t &= β_1 m_{t-1} + (1 − β_1) g'_t, \qquad v_t = β_2 v_{t-1} + (1 − β_2) g'^2_t \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (AMSGrad) or } v_t \\
        \text{direction} &= \frac{m_t / (1 − β_1^{t+1})}{\sqrt{\hat v_t} / \sqrt{1 − β_2^{t+1}}
            + ε} \; \big(+\, λ θ_t \text{ when decoupled}\big)

    and the caller applies ``θ_{t+1} = θ_t − lr · direction``. With decoupled weight decay this is
    ``torch.optim.AdamW``'s ``θ·(1 − lr·λ)`` followed by the Adam step (see :class:`AdamW`).
    State: ``[exp_avg, exp_avg_sq]`` (``m``, ``v``), plus ``max_exp_avg_sq`` (``\hat v``) with
    AMSGrad. Reads ``param`` only when ``weight_decay != 0``. Bias corrections are computed in
    float64 for float64 gradients and in float32 otherwise.

    Args:
        betas (Tuple[float, float], optional): decay rates ``(β_1, β_2)`` of the running averages
            of the gradient and of its square. (default: (0.9, 0.999))
        eps (float, optional): ε added to the denominator. (default: 1e-8)
        weight_decay (float, optional): weight decay λ. (default: 0.0)
        amsgrad (bool, optional): use the running maximum of ``v`` (AMSGrad). (default: False)
        decoupled_weight_decay (bool, optional): decay the parameter instead of adding ``λ θ`` to
            the gradient (AdamW). (default: False)

    References:
        Kingma & Ba. 2015. "Adam: A Method for Stochastic Optimization."
        Reddi, Kale & Kumar. 2018. "On the Convergence of Adam and Beyond." (AMSGrad)

    Example:
        >>> adam = Adam(betas=(0.9, 0.999))
        >>> param, grad = torch.zeros(2), torch.tensor([2.0, -3.0])
        >>> direction, state = adam.update(grad, param, adam.init_state(param), torch.tensor(0))
        >>> torch.allclose(direction, grad.sign())  # the first step is sign(g), up to eps
        True
    """

    shape_agnostic = True
    view_invariant = True

    def __init__(
        self,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__()
        self.beta1, self.beta2 = _check_betas(betas)
        self.eps = check_real(eps, "epsilon value", 0.0)
        self.weight_decay = check_real(weight_decay, "weight_decay value", 0.0)
        for name, flag in (
            ("amsgrad", amsgrad),
            ("decoupled_weight_decay", decoupled_weight_decay),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r} (expected a bool)")
        self.amsgrad = amsgrad
        self.decoupled_weight_decay = decoupled_weight_decay
        self.reads_param = self.weight_decay != 0.0

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        if self.amsgrad:
            return [torch.zeros_like(param), torch.zeros_like(param), torch.zeros_like(param)]
        return [torch.zeros_like(param), torch.zeros_like(param)]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, list(param.shape))
        g = grad
        if self.weight_decay != 0.0 and not self.decoupled_weight_decay:
            g = g + self.weight_decay * param
        exp_avg = torch.lerp(state[0], g, 1.0 - self.beta1)
        exp_avg_sq = self.beta2 * state[1] + (1.0 - self.beta2) * (g * g)
        count = (step + 1).to(_scalar_dtype(grad))
        bias_correction1 = 1.0 - torch.pow(self.beta1, count)
        bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(self.beta2, count))
        if self.amsgrad:
            second = torch.maximum(state[2], exp_avg_sq)
            new_state = [exp_avg, exp_avg_sq, second]
        else:
            second = exp_avg_sq
            new_state = [exp_avg, exp_avg_sq]
        denom = second.sqrt() / bias_correction2_sqrt + self.eps
        direction = (exp_avg / denom / bias_correction1).to(grad.dtype)
        if self.weight_decay != 0.0 and self.decoupled_weight_decay:
            direction = direction + self.weight_decay * param
        return direction, new_state

    def pointwise(self, rank: int) -> bool:
        """Elementwise at every rank."""
        return True

    def state_names(self) -> List[str]:
        names = ["exp_avg", "exp_avg_sq"]
        return [*names, "max_exp_avg_sq"] if self.amsgrad else names

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """Per coordinate: the moments 7, ``sqrt``, ``+ ε`` and the division 3 (bias corrections
        are scalars), weight decay 2 when on, AMSGrad's maximum 1, update 2. Bytes: ``g``,
        ``p`` and the moments in, the moments and ``p`` out (28 B in float32)."""
        flops = 7 + 3 + 2 * (self.weight_decay != 0.0) + self.amsgrad + 2
        return Cost.elementwise(shape, flops, 3 + 2 * len(self.state_names()), itemsize)

    def extra_repr(self) -> str:
        return (
            f"betas=({self.beta1}, {self.beta2}), eps={self.eps}, "
            f"weight_decay={self.weight_decay}, amsgrad={self.amsgrad}, "
            f"decoupled_weight_decay={self.decoupled_weight_decay}"
        )


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    ``torch.optim.AdamW`` first shrinks the parameter, ``θ ← θ·(1 − lr·λ)``, then takes the Adam
    step. Since the caller here applies ``θ ← θ − lr · direction`` (lr is not known to the
    transform), the decay is folded into the direction:

    .. math:: \text{direction} = \frac{\hat m_t}{\sqrt{\hat v_t} + ε} + λ θ_t,

    which gives ``θ_t − lr·λ·θ_t − lr·\hat m_t/(\sqrt{\hat v_t} + ε)``, AdamW's update exactly.
    The state and the rest of the rule are :class:`Adam`'s; ``param`` is read when
    ``weight_decay != 0``.

    Args:
        betas (Tuple[float, float], optional): ``(β_1, β_2)``. (default: (0.9, 0.999))
        eps (float, optional): ε added to the denominator. (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay λ. (default: 1e-2)
        amsgrad (bool, optional): use the running maximum of ``v`` (AMSGrad). (default: False)

    Reference:
        Loshchilov & Hutter. 2019. "Decoupled Weight Decay Regularization."

    Example:
        >>> adamw = AdamW(weight_decay=0.1)
        >>> param, grad = torch.ones(2), torch.tensor([2.0, -3.0])
        >>> direction, _ = adamw.update(grad, param, adamw.init_state(param), torch.tensor(0))
        >>> direction  # sign(g) + 0.1 * param
        tensor([ 1.1000, -0.9000])
    """

    def __init__(
        self,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(betas, eps, weight_decay, amsgrad, True)
