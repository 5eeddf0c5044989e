"""Kronecker-factored layers acting on an ``(n, m)`` matrix view of a gradient.

A dense layer on the ``n·m`` entries of a gradient needs ``(n·m)²`` weights. A Kronecker-factored
one needs ``n² + m²``: it multiplies the ``(n, m)`` matrix ``X`` by a left factor ``L (n, n)`` and a
right factor ``R (m, m)``, ``Y = L X R``, which equals ``(L ⊗ Rᵀ) vec(X)`` (Arnold et al. 2019,
"When MAML can adapt fast and how to assist when it cannot").

Every layer here follows one explicit-state interface, so
:class:`~compiledopt.optim.KroneckerTransform` can drive stateless and recurrent layers alike:

* ``init_state(x) -> List[Tensor]`` — the initial state for an input shaped like ``x``;
* ``step(x, state) -> (y, new_state)`` — one application;
* ``forward`` — the layer's ordinary call.

State layouts: :class:`KroneckerLinear` ``[]``; :class:`KroneckerRNN` ``[hidden (n, m)]``;
:class:`KroneckerLSTM` ``[hidden (n, m), cell (n, m)]``.
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


def matrix_view(x: Tensor, n: int, m: int, layer: str) -> Tensor:
    """``x`` reshaped to ``(n, m)``; ``ValueError`` naming both shapes when it has another size."""
    if x.numel() != n * m:
        raise ValueError(
            f"{layer} works on ({n}, {m}) = {n * m} elements; got an input of shape {list(x.shape)}"
        )
    return x.reshape(n, m)


def _check_size(n: int, m: int, layer: str) -> None:
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{layer} needs a positive integer {name}, got {value!r}")


class KroneckerLinear(nn.Module):
    r"""``Y = L' X R' + B`` on the ``(n, m)`` view ``X`` of the input.

    With ``psd=True`` the factors are ``L' = LᵀL`` and ``R' = RᵀR``, positive semi-definite for any
    ``L, R``; otherwise ``L' = L`` and ``R' = R``. Factors start at ``init_scale`` times the
    identity (``sqrt(init_scale)`` for ``L`` when ``psd``, so that ``L'`` is the same) and the bias
    at zero, so a fresh layer with ``init_scale=1`` is the identity map.

    Args:
        n (int): rows of the matrix view.
        m (int): columns of the matrix view.
        bias (bool, optional): learn an ``(n, m)`` bias ``B``. (default: True)
        psd (bool, optional): use ``LᵀL`` and ``RᵀR``. (default: False)
        init_scale (float, optional): ``L' R'`` at initialisation, a multiple of the identity.
            (default: 1.0)

    Example:
        >>> layer = KroneckerLinear(3, 4, bias=False)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(layer(x), x)
        True
    """

    def __init__(
        self, n: int, m: int, bias: bool = True, psd: bool = False, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        _check_size(n, m, "KroneckerLinear")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"Invalid init_scale: {init_scale}")
        self.n = n
        self.m = m
        self.psd = bool(psd)
        left_scale = math.sqrt(init_scale) if psd else init_scale
        self.left = nn.Parameter(torch.eye(n) * left_scale)
        self.right = nn.Parameter(torch.eye(m))
        if bias:
            self.bias = nn.Parameter(torch.zeros(n, m))
        else:
            self.register_parameter("bias", None)

    @torch.jit.export
    def factors(self) -> Tuple[Tensor, Tensor]:
        """The effective ``(L', R')``."""
        if self.psd:
            return self.left.t() @ self.left, self.right.t() @ self.right
        return self.left, self.right

    def forward(self, x: Tensor) -> Tensor:
        left, right = self.factors()
        y = left @ matrix_view(x, self.n, self.m, "KroneckerLinear") @ right
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(x.shape)

    @torch.jit.export
    def init_state(self, x: Tensor) -> List[Tensor]:
        return []

    @torch.jit.export
    def step(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        return self.forward(x), state

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, bias={self.bias is not None}, psd={self.psd}"


class KroneckerRNN(nn.Module):
    r"""An Elman cell whose three maps are :class:`KroneckerLinear`.

    ``h' = tanh(W_x X + W_h h)`` and ``Y = W_y h'``. ``W_h`` starts at half the identity (a decaying
    memory), ``W_x`` at the identity; for small inputs a fresh cell therefore returns ``Y ≈ X`` on
    its first step.

    Args:
        n (int): rows of the matrix view.
        m (int): columns of the matrix view.
        bias (bool, optional): learn biases in ``W_x`` and ``W_y``. (default: True)
        psd (bool, optional): positive semi-definite factors in every map. (default: False)
    """

    def __init__(self, n: int, m: int, bias: bool = True, psd: bool = False) -> None:
        super().__init__()
        _check_size(n, m, "KroneckerRNN")
        self.n = n
        self.m = m
        self.input_map = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.hidden_map = KroneckerLinear(n, m, bias=False, psd=psd, init_scale=0.5)
        self.output_map = KroneckerLinear(n, m, bias=bias, psd=psd)

    def forward(self, x: Tensor, hidden: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Return ``(output, new_hidden)``; ``hidden`` defaults to zeros."""
        state = self.init_state(x) if hidden is None else [hidden]
        y, new_state = self.step(x, state)
        return y, new_state[0]

    @torch.jit.export
    def init_state(self, x: Tensor) -> List[Tensor]:
        return [x.new_zeros(self.n, self.m)]

    @torch.jit.export
    def step(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        x2 = matrix_view(x, self.n, self.m, "KroneckerRNN")
        hidden = torch.tanh(self.input_map(x2) + self.hidden_map(state[0]))
        return self.output_map(hidden).reshape(x.shape), [hidden]


class KroneckerLSTM(nn.Module):
    r"""An LSTM cell whose input, hidden and output maps are :class:`KroneckerLinear`.

    Gates ``i, f, o = σ(W_· X + U_· h)``, candidate ``c̃ = tanh(W_c X + U_c h)``,
    ``c' = f ⊙ c + i ⊙ c̃``, ``h' = o ⊙ tanh(c')`` and output ``Y = W_y h'``. ``W_y`` starts at four
    times the identity, so for small inputs a fresh cell returns ``Y ≈ X`` on its first step
    (both gates open halfway).

    Args:
        n (int): rows of the matrix view.
        m (int): columns of the matrix view.
        bias (bool, optional): learn biases in the input and output maps. (default: True)
        psd (bool, optional): positive semi-definite factors in every map. (default: False)
    """

    def __init__(self, n: int, m: int, bias: bool = True, psd: bool = False) -> None:
        super().__init__()
        _check_size(n, m, "KroneckerLSTM")
        self.n = n
        self.m = m
        self.input_gate = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.forget_gate = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.output_gate = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.candidate = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.input_gate_h = KroneckerLinear(n, m, bias=False, psd=psd)
        self.forget_gate_h = KroneckerLinear(n, m, bias=False, psd=psd)
        self.output_gate_h = KroneckerLinear(n, m, bias=False, psd=psd)
        self.candidate_h = KroneckerLinear(n, m, bias=False, psd=psd)
        self.output_map = KroneckerLinear(n, m, bias=bias, psd=psd, init_scale=4.0)

    def forward(
        self, x: Tensor, hidden: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """Return ``(output, (new_hidden, new_cell))``; the state defaults to zeros."""
        state = self.init_state(x) if hidden is None else [hidden[0], hidden[1]]
        y, new_state = self.step(x, state)
        return y, (new_state[0], new_state[1])

    @torch.jit.export
    def init_state(self, x: Tensor) -> List[Tensor]:
        return [x.new_zeros(self.n, self.m), x.new_zeros(self.n, self.m)]

    @torch.jit.export
    def step(self, x: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        x2 = matrix_view(x, self.n, self.m, "KroneckerLSTM")
        hidden, cell = state[0], state[1]
        i = torch.sigmoid(self.input_gate(x2) + self.input_gate_h(hidden))
        f = torch.sigmoid(self.forget_gate(x2) + self.forget_gate_h(hidden))
        o = torch.sigmoid(self.output_gate(x2) + self.output_gate_h(hidden))
        c = torch.tanh(self.candidate(x2) + self.candidate_h(hidden))
        new_cell = f * cell + i * c
        new_hidden = o * torch.tanh(new_cell)
        return self.output_map(new_hidden).reshape(x.shape), [new_hidden, new_cell]
