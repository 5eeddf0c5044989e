r"""Learnable step sizes: fixed learned ones (Meta-SGD) and online rules (HD, IDBD).

Every transform here returns ``direction = α ⊙ g``; the caller applies ``θ ← θ − lr · direction``,
so the caller's ``lr`` multiplies whatever step size ``α`` the rule produces. The online rules adapt
``α`` from the gradients alone and do not see ``lr``: they are exactly the published rules when
``lr = 1`` (set the initial step size through the transform then), and with another ``lr`` the
step is scaled while the adaptation runs as it would with ``lr = 1``.

State layout (per parameter; dtype and device of the parameter):

========================  ==========================================  ============================
transform                 state                                       shapes
========================  ==========================================  ============================
LearnedStepSize           ``[]``                                      —
HypergradientDescent      ``[hypergradient_sum, previous_grad]``      ``()`` or param shape (per
                                                                      element), param shape
IDBD                      ``[hypergradient_sum, trace]``              param shape, param shape
========================  ==========================================  ============================

The online rules keep the accumulated hypergradient ``H`` rather than the step size itself; the
step size is recomputed from the learnable meta-weights at every call (``α_t = α_0 − β H_t`` for
HD, ``log α_t = log α_0 − θ H_t`` for IDBD). For fixed meta-weights this is the published
recursion exactly; the point is that the meta-weights then enter every step's direction, so the
one-step meta-gradient of :class:`~compiledopt.optim.LearnableOptimizer` (which treats the state as
a constant) reaches the initial step size and the hyper-learning-rate at every step, not only
through ``init_state``. :meth:`step_size` returns the step size of the last update from a state.

The shared (0-d) meta-weights are created in the default dtype and cast to the gradient's dtype
where they are used; call ``.double()`` on the transform for float64 meta-weights.
"""

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from compiledopt._validation import check_flag, check_positive
from compiledopt.transforms.base import Cost, Transform, check_grad_shape


def _scalar_weight(value: float) -> nn.Parameter:
    """A 0-d learnable weight holding ``log(value)``."""
    return nn.Parameter(torch.tensor(math.log(value)))


class LearnedStepSize(Transform):
    r"""A learnable step size, per tensor or per element (Meta-SGD).

    .. math:: \text{direction} = e^{\log α} ⊙ g

    ``log α`` is the learnable weight ``log_lr``: one scalar shared by every parameter (the
    default; shape-agnostic), or one per element of a given shape (Meta-SGD; shape-bound, built by
    :meth:`per_element`). Learning the logarithm keeps the step size positive. Stateless.

    Args:
        step_size (float, optional): the initial step size α (``log_lr = log α``). (default: 1.0)
        shape (sequence of int, optional): bind the transform to parameters of this shape with one
            step size per element; ``None`` for one scalar shared by every parameter.
            (default: None)
        dtype (torch.dtype, optional): dtype of ``log_lr``. (default: the default dtype)
        device (torch.device, optional): device of ``log_lr``. (default: the default device)

    Reference:
        Li, Zhou, Chen & Li. 2017. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning."

    Example:
        >>> shared = LearnedStepSize(step_size=0.5)  # one scalar for every parameter
        >>> shared(torch.ones(2))
        tensor([0.5000, 0.5000], grad_fn=<MulBackward0>)
        >>> weight = torch.nn.Parameter(torch.zeros(3, 2))
        >>> meta_sgd = LearnedStepSize.per_element(weight)  # log_lr of shape (3, 2)
        >>> tuple(meta_sgd.log_lr.shape)
        (3, 2)
    """

    shape_agnostic = True
    view_invariant = True

    def __init__(
        self,
        step_size: float = 1.0,
        shape: Optional[Sequence[int]] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        step_size = check_positive(step_size, "step_size")
        self.shape_agnostic = shape is None
        size: Tuple[int, ...] = ()
        if shape is not None:
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
                raise ValueError(f"Invalid shape: {shape!r} (expected a sequence of int)")
            for d in shape:
                if isinstance(d, bool) or not isinstance(d, numbers.Integral) or int(d) < 0:
                    raise ValueError(f"Invalid shape: {tuple(shape)!r} (dimension {d!r})")
            size = tuple(int(d) for d in shape)
        self.log_lr = nn.Parameter(
            torch.full(size, math.log(step_size), dtype=dtype, device=device)
        )

    @classmethod
    def per_element(cls, param: Tensor, step_size: float = 1.0) -> "LearnedStepSize":
        """Meta-SGD: one learnable step size per element of ``param`` (its shape, dtype, device).

        Args:
            param (Tensor): the parameter whose gradients will be scaled.
            step_size (float, optional): the initial step size of every element. (default: 1.0)
        """
        if not isinstance(param, Tensor):
            raise TypeError(f"LearnedStepSize.per_element expects a tensor, got {type(param)}")
        if not param.is_floating_point():
            raise ValueError(
                f"LearnedStepSize.per_element needs a real floating-point parameter, "
                f"got dtype {param.dtype}"
            )
        return cls(step_size, param.shape, param.dtype, param.device)

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        if not self.shape_agnostic:
            check_grad_shape(grad, list(self.log_lr.shape))
        else:
            check_grad_shape(grad, list(param.shape))
        return torch.exp(self.log_lr).to(grad.dtype) * grad, state

    def pointwise(self, rank: int) -> bool:
        """One shared step size is pointwise; a step size per element is bound to its tensor."""
        return self.shape_agnostic

    @torch.jit.export
    def step_size(self, state: List[Tensor]) -> Tensor:
        """The step size α (``exp(log_lr)``); ``state`` is unused (``[]``)."""
        return torch.exp(self.log_lr)

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """``α·g`` 1 FLOP and the update 2 a coordinate; ``g``, ``p`` in, ``p`` out (and the
        per-element step sizes read)."""
        return Cost.elementwise(shape, 3, 3 + (not self.shape_agnostic), itemsize)

    def extra_repr(self) -> str:
        return f"shape={None if self.shape_agnostic else tuple(self.log_lr.shape)}"


class HypergradientDescent(Transform):
    r"""Hypergradient descent on the step size (SGD-HD, Baydin et al. 2018).

    Baydin et al.'s SGD-HD, with ``g_t`` the gradient at step ``t`` (``g_{-1} = 0``), updates the
    step size before each step with the hypergradient ``∂f(θ_t)/∂α = −g_t · g_{t−1}`` and then
    steps with it:

    .. math::

        α_t &= α_{t−1} − β\,\frac{∂f(θ_t)}{∂α} = α_{t−1} + β\, g_t · g_{t−1} \\
        \text{direction} &= α_t\, g_t \qquad (θ_{t+1} = θ_t − \mathrm{lr} · α_t\, g_t)

    So α grows while consecutive gradients align and shrinks while they oppose (it is not
    clamped and may become negative, as in the paper). ``g_t · g_{t−1}`` is the dot product over
    the parameter tensor (one α per tensor; the paper uses one α for all parameters), or the
    element-wise product with ``per_element=True`` (one α per element). The hypergradient
    ignores the caller's ``lr``: with ``lr = 1`` this is SGD-HD with ``α_0 = step_size`` and
    ``β = hyper_lr``; another ``lr`` scales the step and is equivalent to SGD-HD with
    ``α_0 · lr`` and ``β · lr``.

    Stored form: ``H_t = H_{t−1} − g_t · g_{t−1}`` (``H_{−1} = 0``) and ``α_t = α_0 − β H_t``,
    identical for fixed weights and differentiable in both meta-weights at every step (see the
    module notes). Learnable weights: ``log_lr = log α_0`` and ``log_hyper_lr = log β``.
    State: ``[hypergradient_sum, previous_grad]`` = ``[H_{t}, g_{t}]`` after step ``t``;
    ``hypergradient_sum`` is 0-d (or of the parameter's shape with ``per_element``). Shape-agnostic.

    Args:
        step_size (float, optional): the initial step size α_0. (default: 1.0)
        hyper_lr (float, optional): the hypergradient learning rate β. (default: 1e-3)
        per_element (bool, optional): one step size per element instead of per tensor.
            (default: False)

    Reference:
        Baydin, Cornish, Martínez Rubio, Schmidt & Wood. 2018. "Online Learning Rate Adaptation
        with Hypergradient Descent." ICLR (arXiv:1703.04782, 2017).

    Example:
        >>> hd = HypergradientDescent(step_size=0.1, hyper_lr=0.01)
        >>> param, step = torch.zeros(2), torch.tensor(0)
        >>> state = hd.init_state(param)
        >>> for _ in range(3):  # the same gradient three times: α grows
        ...     direction, state = hd.update(torch.ones(2), param, state, step)
        ...     step = step + 1
        >>> round(hd.step_size(state).item(), 4)  # 0.1 + 2 · 0.01 · 2
        0.14
    """

    shape_agnostic = True
    view_invariant = True

    def __init__(
        self, step_size: float = 1.0, hyper_lr: float = 1e-3, per_element: bool = False
    ) -> None:
        super().__init__()
        self.log_lr = _scalar_weight(check_positive(step_size, "step_size"))
        self.log_hyper_lr = _scalar_weight(check_positive(hyper_lr, "hyper_lr"))
        self.per_element = check_flag(per_element, "per_element")

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        if self.per_element:
            hypergradient_sum = torch.zeros_like(param)
        else:
            hypergradient_sum = torch.zeros((), dtype=param.dtype, device=param.device)
        return [hypergradient_sum, torch.zeros_like(param)]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, list(param.shape))
        product = grad * state[1]
        if not self.per_element:
            product = product.sum()
        hypergradient_sum = state[0] - product
        alpha = self._alpha(hypergradient_sum, grad.dtype)
        return alpha * grad, [hypergradient_sum, grad.clone()]

    def _alpha(self, hypergradient_sum: Tensor, dtype: torch.dtype) -> Tensor:
        alpha0 = torch.exp(self.log_lr).to(dtype)
        return alpha0 - torch.exp(self.log_hyper_lr).to(dtype) * hypergradient_sum

    def pointwise(self, rank: int) -> bool:
        """With a step size per element; one shared α sums ``g·g_prev`` over the tensor."""
        return self.per_element

    @torch.jit.export
    def step_size(self, state: List[Tensor]) -> Tensor:
        """α_t, the step size of the update that returned ``state`` (α_0 for the initial state)."""
        return self._alpha(state[0], state[0].dtype)

    def state_names(self) -> List[str]:
        return ["hypergradient_sum", "previous_grad"]

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """Per coordinate: ``g·g_prev`` and its sum 2 (per element: product and difference 2,
        ``α`` 2), ``α·g`` 1, update 2. Bytes: ``g``, ``p``, ``g_prev`` in, ``g_prev``, ``p`` out
        (and the per-element hypergradient sum in and out)."""
        if self.per_element:
            return Cost.elementwise(shape, 7, 7, itemsize)
        return Cost.elementwise(shape, 5, 5, itemsize)

    def extra_repr(self) -> str:
        return f"per_element={self.per_element}"


class IDBD(Transform):
    r"""Incremental Delta-Bar-Delta (Sutton 1992), generalised from LMS to any gradient.

    Sutton's IDBD adapts one log step size ``β_i`` per weight of a linear unit ``y = w·x`` trained
    on ``½δ²`` (``δ = y* − y``), with a trace ``h_i`` (an estimate of ``∂w_i/∂β_i``) and meta step
    size ``θ``:

    .. math::

        β_i &← β_i + θ\, δ x_i\, h_i, \qquad α_i = e^{β_i} \\
        w_i &← w_i + α_i\, δ x_i \\
        h_i &← h_i\, [1 − α_i x_i^2]^+ + α_i\, δ x_i

    Generalised here by substituting the gradient ``g_i = ∂L/∂w_i`` (``= −δ x_i`` for LMS) and,
    for the curvature term ``x_i² = ∂²(½δ²)/∂w_i²``, the squared gradient ``g_i²`` (a
    one-sample empirical-Fisher estimate of the diagonal curvature):

    .. math::

        β_{t,i} &= β_{t−1,i} − θ\, g_{t,i}\, h_{t−1,i}, \qquad α_{t,i} = e^{β_{t,i}} \\
        \text{direction}_i &= α_{t,i}\, g_{t,i} \qquad (w ← w − \mathrm{lr} · \text{direction}) \\
        h_{t,i} &= h_{t−1,i}\, [1 − α_{t,i}\, g_{t,i}^2]^+ − α_{t,i}\, g_{t,i}

    with ``h_{−1} = 0`` and ``β_{−1} = log(step_size)``. The approximation: for LMS
    ``g_i² = δ² x_i²`` is Sutton's term scaled by ``δ²``, so the trace decays more slowly than in
    IDBD once ``|δ| < 1`` and faster while ``|δ| > 1``; the positive-part clamp ``[·]⁺`` keeps the
    decay factor in ``[0, 1]`` when ``α g²`` overshoots 1, as in the paper. The rule is exact
    for ``lr = 1``; another ``lr`` scales the step, not the trace.

    Stored form: ``H_{t,i} = H_{t−1,i} + g_{t,i} h_{t−1,i}`` (the summed hypergradient
    ``∂L/∂β_i``) and ``β_{t,i} = log(step_size) − θ H_{t,i}``, identical for fixed weights and
    differentiable in both meta-weights at every step (see the module notes). Learnable
    weights: ``log_lr`` (the initial log step size, one scalar) and ``log_meta_lr = log θ``.
    State: ``[hypergradient_sum, trace]`` = ``[H_t, h_t]``, both of the parameter's shape.
    Shape-agnostic.

    Args:
        step_size (float, optional): the initial step size of every element, ``e^{β_{−1}}``.
            (default: 1.0)
        meta_lr (float, optional): the meta step size θ. (default: 1e-2)

    Reference:
        Sutton. 1992. "Adapting Bias by Gradient Descent: An Incremental Version of
        Delta-Bar-Delta." AAAI-92, 171–176.

    Example:
        >>> idbd = IDBD(step_size=0.1, meta_lr=0.1)
        >>> param, step = torch.zeros(2), torch.tensor(0)
        >>> state = idbd.init_state(param)
        >>> for _ in range(3):  # the same gradient three times: the step sizes grow
        ...     direction, state = idbd.update(torch.ones(2), param, state, step)
        ...     step = step + 1
        >>> bool((idbd.step_size(state) > 0.1).all())
        True
    """

    shape_agnostic = True
    view_invariant = True

    def __init__(self, step_size: float = 1.0, meta_lr: float = 1e-2) -> None:
        super().__init__()
        self.log_lr = _scalar_weight(check_positive(step_size, "step_size"))
        self.log_meta_lr = _scalar_weight(check_positive(meta_lr, "meta_lr"))

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        return [torch.zeros_like(param), torch.zeros_like(param)]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_grad_shape(grad, list(param.shape))
        trace = state[1]
        hypergradient_sum = state[0] + grad * trace
        alpha = self._alpha(hypergradient_sum, grad.dtype)
        direction = alpha * grad
        decay = torch.clamp(1.0 - alpha * (grad * grad), min=0.0)
        return direction, [hypergradient_sum, trace * decay - direction]

    def _alpha(self, hypergradient_sum: Tensor, dtype: torch.dtype) -> Tensor:
        meta_lr = torch.exp(self.log_meta_lr).to(dtype)
        return torch.exp(self.log_lr.to(dtype) - meta_lr * hypergradient_sum)

    def pointwise(self, rank: int) -> bool:
        """Elementwise at every rank."""
        return True

    @torch.jit.export
    def step_size(self, state: List[Tensor]) -> Tensor:
        """α_t (per element), the step sizes of the update that returned ``state``."""
        return self._alpha(state[0], state[0].dtype)

    def state_names(self) -> List[str]:
        return ["hypergradient_sum", "trace"]

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """Per coordinate: hypergradient sum 2, ``α`` 3 (with its exp), ``α·g`` 1, the trace's
        decay 4 and update 2, the parameter update 2. Bytes: ``g``, ``p`` and two state tensors
        in, the state and ``p`` out."""
        return Cost.elementwise(shape, 14, 7, itemsize)
