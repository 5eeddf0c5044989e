"""The coordinate-wise two-layer LSTM optimizer of Andrychowicz et al. (2016).

One :class:`CoordinateLSTM` is shared by every parameter of a model, whatever its shape (rank 0
to 5): the same LSTM weights run on every coordinate independently, each coordinate with its own
hidden and cell state.

State layout (one list per parameter ``p``; ``N = p.numel()``, ``H = hidden_size``; coordinates
in ``p.reshape(-1)`` order; dtype of the LSTM weights, device of ``p``):

=====  ============  ==========  ===========================
index  name          shape       meaning
=====  ============  ==========  ===========================
0      ``hidden_0``  ``(N, H)``  hidden state of LSTM layer 0
1      ``cell_0``    ``(N, H)``  cell state of LSTM layer 0
2      ``hidden_1``  ``(N, H)``  hidden state of LSTM layer 1
3      ``cell_1``    ``(N, H)``  cell state of LSTM layer 1
=====  ============  ==========  ===========================
"""

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from compiledopt._validation import check_flag, check_positive
from compiledopt.learned.mlp import check_shapes
from compiledopt.transforms.base import Cost, Transform


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> Tuple[Tensor, Tensor]:
    """One LSTM step on a batch of coordinates, gates in ``nn.LSTM``'s order ``(i, f, g, o)``.

    Args:
        x (Tensor): inputs ``(N, I)``.
        h (Tensor): hidden state ``(N, H)``.
        c (Tensor): cell state ``(N, H)``.
        weight_ih (Tensor): ``(4H, I)``.
        weight_hh (Tensor): ``(4H, H)``.
        bias (Tensor): ``(4H,)``.

    Returns:
        The new ``(h, c)``.
    """
    gates = torch.addmm(bias, x, weight_ih.t()) + h @ weight_hh.t()
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class CoordinateLSTM(Transform):
    r"""Coordinate-wise two-layer LSTM optimizer ("learning to learn by gradient descent by
    gradient descent").

    For every coordinate ``k`` of a parameter, with shared weights:

    .. math::

        x_k &= \text{preprocess}(g_k) \\
        (h^0_k, c^0_k) &= \text{LSTM}_0(x_k, h^0_k, c^0_k), \quad
        (h^1_k, c^1_k) = \text{LSTM}_1(h^0_k, h^1_k, c^1_k) \\
        \text{direction}_k &= \text{output\_scale} \cdot (w_{out} \cdot h^1_k + b_{out})

    and the caller applies ``p ← p − lr · direction`` (the paper adds its output, ``θ + g_t``;
    the sign is learned, so the two are the same family). Each LSTM step is
    ``gates = W_ih x + W_hh h + b``, ``(i, f, g, o)`` as in ``nn.LSTM``,
    ``c ← σ(f) c + σ(i) tanh(g)``, ``h ← σ(o) tanh(c)``, written with explicit weights (one bias
    per layer: ``nn.LSTM``'s two biases only ever appear summed).

    Gradient preprocessing (the paper's appendix A, ``p = preprocess_p``), two inputs per
    coordinate:

    .. math::

        g \mapsto \begin{cases} (\log|g| / p,\ \operatorname{sign}(g)) & |g| \ge e^{-p} \\
        (-1,\ e^{p} g) & \text{otherwise} \end{cases}

    With ``preprocess=False`` the single input is ``g`` itself.

    Weights: ``weight_ih_0 (4H, I)``, ``weight_hh_0 (4H, H)``, ``bias_0 (4H,)``,
    ``weight_ih_1 (4H, H)``, ``weight_hh_1 (4H, H)``, ``bias_1 (4H,)``, ``output_weight (1, H)``,
    ``output_bias (1,)``; all drawn from ``U(−1/√H, 1/√H)`` as ``nn.LSTM`` does. A fresh
    transform is an untrained network, so its direction is not a descent direction: it needs
    meta-training. The hidden state lives in the weights' dtype, the direction in the gradient's.

    Args:
        hidden_size (int, optional): ``H``, the width of both LSTM layers. (default: 20)
        preprocess (bool, optional): use the log-magnitude and sign preprocessing.
            (default: True)
        preprocess_p (float, optional): ``p`` of the preprocessing, > 0. (default: 10.0)
        output_scale (float, optional): multiplier of the linear output head, > 0. (default: 0.1)

    Reference:
        Andrychowicz, Denil, Gómez, Hoffman, Pfau, Schaul, Shillingford, de Freitas. 2016.
        "Learning to learn by gradient descent by gradient descent."

    Example:
        >>> opt = CoordinateLSTM()  # one instance for every parameter
        >>> w, g = torch.randn(4, 3), torch.randn(4, 3)
        >>> direction, state = opt.update(g, w, opt.init_state(w), torch.tensor(0))
        >>> direction.shape, state[0].shape
        (torch.Size([4, 3]), torch.Size([12, 20]))
    """

    shape_agnostic = True
    view_invariant = True

    def __init__(
        self,
        hidden_size: int = 20,
        preprocess: bool = True,
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size!r} (needs an int >= 1)")
        self.hidden_size = hidden_size
        self.preprocess = check_flag(preprocess, "preprocess")
        self.preprocess_p = check_positive(preprocess_p, "preprocess_p")
        self.output_scale = check_positive(output_scale, "output_scale")
        # Preprocessing constants, computed once: threshold e^-p and small-gradient scale e^p.
        self.min_magnitude = math.exp(-self.preprocess_p)
        self.small_scale = math.exp(self.preprocess_p)

        inputs = 2 if preprocess else 1
        four = 4 * hidden_size
        self.weight_ih_0 = nn.Parameter(torch.empty(four, inputs))
        self.weight_hh_0 = nn.Parameter(torch.empty(four, hidden_size))
        self.bias_0 = nn.Parameter(torch.empty(four))
        self.weight_ih_1 = nn.Parameter(torch.empty(four, hidden_size))
        self.weight_hh_1 = nn.Parameter(torch.empty(four, hidden_size))
        self.bias_1 = nn.Parameter(torch.empty(four))
        self.output_weight = nn.Parameter(torch.empty(1, hidden_size))
        self.output_bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every weight from ``U(−1/√H, 1/√H)`` (``nn.LSTM``'s initialisation)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for weight in self.parameters():
                weight.uniform_(-bound, bound)

    def state_names(self) -> List[str]:
        """Names of the state tensors, in the order of :meth:`init_state` (see the module doc)."""
        return ["hidden_0", "cell_0", "hidden_1", "cell_1"]

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        shape = [param.numel(), self.hidden_size]
        dtype = self.bias_0.dtype
        return [torch.zeros(shape, dtype=dtype, device=param.device) for _ in range(4)]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_shapes(grad, param, state, 4)
        g = grad.reshape(-1, 1).to(self.bias_0.dtype)
        if self.preprocess:
            magnitude = g.abs()
            large = magnitude >= self.min_magnitude
            # clamp keeps log() finite (and its gradient) where the other branch is taken.
            log_part = torch.log(magnitude.clamp_min(self.min_magnitude)) / self.preprocess_p
            x = torch.cat(
                [
                    torch.where(large, log_part, -torch.ones_like(g)),
                    torch.where(large, torch.sign(g), g * self.small_scale),
                ],
                dim=1,
            )
        else:
            x = g
        h0, c0 = lstm_cell(x, state[0], state[1], self.weight_ih_0, self.weight_hh_0, self.bias_0)
        h1, c1 = lstm_cell(h0, state[2], state[3], self.weight_ih_1, self.weight_hh_1, self.bias_1)
        out = torch.addmm(self.output_bias, h1, self.output_weight.t())
        direction = (out * self.output_scale).reshape(grad.shape).to(grad.dtype)
        return direction, [h0, c0, h1, c1]

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """Per coordinate (hidden ``H``, ``I`` inputs): preprocessing 8; each of the two layers
        ``2·(in + H)·4H`` (its two matmuls) ``+ 17H`` (biases, 3 sigmoids, 2 tanh, the cell and
        hidden updates); output ``2H + 2``; update 2. Bytes: ``g``, ``p``, 4 state tensors of
        ``H`` values in and out, ``p`` out."""
        hidden, inputs = self.hidden_size, 2 if self.preprocess else 1
        flops = 8 + 2 * (inputs + hidden) * 4 * hidden + 17 * hidden
        flops += 2 * (2 * hidden) * 4 * hidden + 17 * hidden + 2 * hidden + 2 + 2
        return Cost.elementwise(shape, flops, 3 + 8 * hidden, itemsize)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, preprocess={self.preprocess}, "
            f"preprocess_p={self.preprocess_p}, output_scale={self.output_scale}"
        )
