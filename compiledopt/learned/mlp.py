"""A per-coordinate MLP learned optimizer (small_fc_lopt class; Metz et al. 2022).

One :class:`CoordinateMLP` is shared by every parameter of a model, whatever its shape (rank 0
to 5): the same small MLP maps each coordinate's features to that coordinate's update.

State layout (one list per parameter ``p``; ``K = len(momentum_decays)``; the same length and
order for every rank, so one schema describes all parameters):

=========  ========================  ========================  ===================================
index      name                      shape                     meaning
=========  ========================  ========================  ===================================
0 … K-1    ``momentum_{β}``          ``p.shape``               ``m ← β·m + (1-β)·g``, one per decay
K          ``second_moment``         ``p.shape``               ``v ← β₂·v + (1-β₂)·g²``
K+1        ``factored_row``          ``(d0,)`` or ``(1,)``     ``r ← β₂·r + (1-β₂)·mean_j G²[i, j]``
K+2        ``factored_col``          ``(n,)`` or ``(1,)``      ``c ← β₂·c + (1-β₂)·mean_i G²[i, j]``
=========  ========================  ========================  ===================================

For rank ≥ 2 the gradient is viewed as ``G`` of shape ``(d0, n)``, ``n = prod(p.shape[1:])``
(Adafactor's factorisation, Shazeer & Stern 2018); for rank 0 and 1 the two factored entries are
one-element placeholders that are carried unchanged, and the unfactored ``second_moment`` takes
the factored estimate's place. All state has the gradient's dtype and device; every accumulator
is kept whatever the feature set, so the schema depends only on ``momentum_decays``.
"""

import itertools
import math
import numbers
from typing import Iterable, List, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from compiledopt._validation import check_positive, check_real, check_sizes
from compiledopt.transforms.base import Cost, Transform

#: Feature groups, in the order their columns appear in the feature matrix.
FEATURE_GROUPS = ("grad", "param", "momentum", "rms", "momentum_rsqrt", "factored", "time")
INITS = ("adam", "sgd", "random")


def _check_decay(value: object, what: str) -> float:
    return check_real(value, what, 0.0, 1.0)


def check_shapes(grad: Tensor, param: Tensor, state: List[Tensor], count: int) -> None:
    """Raise ``ValueError`` unless ``grad`` has ``param``'s shape and ``state`` has ``count``
    tensors. Shared by the shape-agnostic transforms."""
    if list(grad.shape) != list(param.shape):
        raise ValueError(
            f"gradient of shape {list(grad.shape)} given for a parameter of shape "
            f"{list(param.shape)}"
        )
    if len(state) != count:
        raise ValueError(f"expected a state of {count} tensors, got {len(state)}")


class CoordinateMLP(Transform):
    r"""Per-coordinate MLP learned optimizer with Adafactor features (small_fc_lopt class).

    For every coordinate of a parameter the transform builds a feature vector, normalises each
    feature over the tensor, and applies one shared MLP with a two-unit head ``(d, m)``:

    .. math::

        \text{direction} = d \cdot \exp(m \cdot \text{exp\_mult}) \cdot \text{step\_mult}

    (the caller then applies ``p ← p − lr · direction``). Accumulators are updated with the
    current gradient first, then read (``β`` in ``momentum_decays``, ``β₂ = second_moment_decay``,
    ``ε = eps``):

    ======================  ==========================================================  ======
    feature group           columns                                                     count
    ======================  ==========================================================  ======
    ``"grad"``              ``g``                                                       1
    ``"param"``             ``p``                                                       1
    ``"momentum"``          ``m_β``                                                     K
    ``"rms"``               ``sqrt(v + ε)``                                             1
    ``"momentum_rsqrt"``    ``m_β · rsqrt(v + ε)``                                      K
    ``"factored"``          ``g · rsqrt(v̂ + ε)``, ``m_β · rsqrt(v̂ + ε)``               1 + K
    ``"time"``              ``tanh(step / τ)`` for ``τ`` in ``timescales``              T
    ======================  ==========================================================  ======

    ``v̂`` is Adafactor's factored second moment ``v̂[i, j] = r[i] · c[j] / (mean(r) + ε)`` for
    rank ≥ 2 (the gradient viewed as ``(d0, prod(rest))``) and ``v`` for rank 0 and 1, so every
    rank has the same feature count. Every per-coordinate column ``x`` is normalised over the
    tensor, ``x / sqrt(mean(x²) + norm_eps)``. The time columns are constant over a tensor and are
    not normalised (normalising a constant column would turn it into ``±1``). No bias correction:
    it scales a column by a per-tensor constant, which the normalisation cancels.

    Formulation: features are computed elementwise and stacked into an ``(N, F)`` matrix
    (``N = p.numel()``); the MLP is ``nn.Linear`` layers (matmuls) on that matrix, with ReLU. This
    is the training path: cheap in eager mode and under autograd, and it scripts, compiles and
    exports as is. The time columns enter the first layer as a per-tensor bias
    ``W[:, time] @ tanh(step / τ)`` rather than as ``N`` repeated rows.

    Fused formulation (``fused = True``, set by ``compiledopt.export.freeze_transform(...,
    fused=True)`` for the Inductor backends, one hidden layer only): the same maths with the hidden
    units unrolled — ``h_j = relu(b_j + Σ_f W_jf x_f)`` accumulated straight into the two outputs —
    so that a compiler emits one loop over coordinates with no ``(N, hidden)`` intermediate.
    Eagerly it is slow (``H·F`` small kernels); TorchScript and ONNX keep the matmul form.

    Initialisation (``init``):

    * ``"adam"`` (default): hidden units 0 and 1 of the first layer compute ``relu(±x)`` of the
      ``momentum_rsqrt`` column whose decay is closest to 0.9, later hidden layers copy units 0
      and 1, the ``d`` head reads ``unit0 − unit1`` and every other head weight (the ``m`` head
      included) starts at zero. A fresh transform therefore returns
      ``step_mult · normalise(m_β · rsqrt(v + ε))``: Adam's direction (β₁ ≈ 0.9,
      β₂ = ``second_moment_decay``) rescaled to unit RMS per tensor, so with ``lr = 1`` a fresh
      optimizer moves each tensor by an RMS of ``step_mult`` per step. The other hidden units keep
      ``nn.Linear``'s random init, so meta-training can recruit them.
    * ``"sgd"``: the same, reading the normalised ``grad`` column (normalised gradient descent).
    * ``"random"``: ``nn.Linear``'s default init everywhere, as small_fc_lopt starts.

    Args:
        hidden_sizes (sequence of int, optional): widths of the hidden layers. (default: (32,))
        features (sequence of str, optional): the feature groups to use, any of
            :data:`FEATURE_GROUPS`. (default: all of them)
        momentum_decays (sequence of float, optional): momentum decays, each in [0, 1).
            (default: (0.5, 0.9, 0.99))
        second_moment_decay (float, optional): decay of the unfactored and factored second-moment
            accumulators, in [0, 1). (default: 0.999)
        timescales (sequence of float, optional): step-embedding timescales, each > 0.
            (default: (1, 10, 100, 1000, 10000))
        exp_mult (float, optional): scale of the magnitude head ``m``. (default: 0.001)
        step_mult (float, optional): scale of the direction, > 0. (default: 0.001)
        eps (float, optional): added to second moments before a square root. (default: 1e-8)
        norm_eps (float, optional): added to the mean square of the per-tensor feature
            normaliser. (default: 1e-10)
        init (str, optional): ``"adam"``, ``"sgd"`` or ``"random"`` (see above). (default: "adam")

    References:
        Metz, Harrison, Freeman, Nado, Sohl-Dickstein. 2022. "Practical tradeoffs between memory,
        compute, and performance in learned optimizers" (small_fc_lopt / adafac_mlp_lopt).
        Shazeer & Stern. 2018. "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost."

    Example:
        >>> opt = CoordinateMLP()  # one instance for every parameter
        >>> w, g = torch.randn(4, 3), torch.randn(4, 3)
        >>> direction, state = opt.update(g, w, opt.init_state(w), torch.tensor(0))
        >>> bool((direction * g > 0).all())  # a fresh transform descends (first step ≈ sign(g))
        True
        >>> opt.state_names()[:4]
        ['momentum_0.5', 'momentum_0.9', 'momentum_0.99', 'second_moment']
    """

    momentum_decays: List[float]
    timescales: List[float]

    shape_agnostic = True
    view_invariant = True
    fusable = True

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32,),
        features: Sequence[str] = FEATURE_GROUPS,
        momentum_decays: Sequence[float] = (0.5, 0.9, 0.99),
        second_moment_decay: float = 0.999,
        timescales: Sequence[float] = (1.0, 10.0, 100.0, 1000.0, 10000.0),
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        eps: float = 1e-8,
        norm_eps: float = 1e-10,
        init: str = "adam",
    ) -> None:
        super().__init__()
        hidden = check_sizes(hidden_sizes, "hidden_sizes")
        if isinstance(features, str) or not features:
            raise ValueError(f"Invalid features: {features!r} (needs a non-empty sequence)")
        unknown = [f for f in features if f not in FEATURE_GROUPS]
        if unknown or len(set(features)) != len(features):
            raise ValueError(
                f"Invalid features: {features!r} (each of {FEATURE_GROUPS} at most once)"
            )
        if isinstance(momentum_decays, (str, numbers.Real)) or not momentum_decays:
            raise ValueError(
                f"Invalid momentum_decays: {momentum_decays!r} (needs a non-empty sequence)"
            )
        decays = [_check_decay(b, "momentum_decays entry") for b in momentum_decays]
        if len(set(decays)) != len(decays):
            raise ValueError(f"Invalid momentum_decays: {momentum_decays!r} (duplicates)")
        if isinstance(timescales, (str, numbers.Real)) or not timescales:
            raise ValueError(f"Invalid timescales: {timescales!r} (needs a non-empty sequence)")
        scales = [check_positive(t, "timescales entry") for t in timescales]
        if len(set(scales)) != len(scales):
            raise ValueError(f"Invalid timescales: {timescales!r} (duplicates)")
        if isinstance(exp_mult, bool) or not isinstance(exp_mult, numbers.Real):
            raise ValueError(f"Invalid exp_mult: {exp_mult!r} (needs a finite number)")
        if not math.isfinite(float(exp_mult)):
            raise ValueError(f"Invalid exp_mult: {exp_mult!r} (needs a finite number)")
        if init not in INITS:
            raise ValueError(f"Invalid init: {init!r} (one of {INITS})")
        if init == "adam" and "momentum_rsqrt" not in features:
            raise ValueError(f"Invalid init: {init!r} needs the 'momentum_rsqrt' features")
        if init == "sgd" and "grad" not in features:
            raise ValueError(f"Invalid init: {init!r} needs the 'grad' feature")
        if init != "random" and min(hidden) < 2:
            raise ValueError(
                f"Invalid hidden_sizes: {hidden_sizes!r} (init {init!r} needs widths >= 2)"
            )

        self.features: List[str] = [f for f in FEATURE_GROUPS if f in features]
        self.hidden_sizes: List[int] = hidden
        self.momentum_decays: List[float] = decays
        self.second_moment_decay: float = _check_decay(second_moment_decay, "second_moment_decay")
        self.timescales: List[float] = scales
        self.exp_mult: float = float(exp_mult)
        self.step_mult: float = check_positive(step_mult, "step_mult")
        self.eps: float = check_positive(eps, "eps")
        self.norm_eps: float = check_positive(norm_eps, "norm_eps")
        self.init: str = init
        self.fused: bool = False
        self.use_grad: bool = "grad" in features
        self.use_param: bool = "param" in features
        self.use_momentum: bool = "momentum" in features
        self.use_rms: bool = "rms" in features
        self.use_momentum_rsqrt: bool = "momentum_rsqrt" in features
        self.use_factored: bool = "factored" in features
        self.use_time: bool = "time" in features
        self.reads_param = self.use_param

        names = self.feature_names()
        self.num_time_features: int = len(scales) if self.use_time else 0
        self.num_coordinate_features: int = len(names) - self.num_time_features
        self.input_layer: nn.Linear = nn.Linear(len(names), hidden[0])
        self.hidden_layers: nn.ModuleList = nn.ModuleList(
            [nn.Linear(a, b) for a, b in itertools.pairwise(hidden)]
        )
        self.head: nn.Linear = nn.Linear(hidden[-1], 2)
        if init != "random":
            self._init_baseline(names)

    def _init_baseline(self, names: List[str]) -> None:
        if self.init == "adam":
            closest = min(self.momentum_decays, key=lambda b: abs(b - 0.9))
            column = names.index(f"momentum_rsqrt_{closest}")
        else:
            column = names.index("grad")
        with torch.no_grad():
            first = self.input_layer
            first.weight[:2].zero_()
            first.bias[:2].zero_()
            first.weight[0, column] = 1.0
            first.weight[1, column] = -1.0
            for layer in cast(Iterable[nn.Linear], self.hidden_layers):
                layer.weight[:2].zero_()
                layer.bias[:2].zero_()
                layer.weight[0, 0] = 1.0
                layer.weight[1, 1] = 1.0
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[0, 0] = 1.0
            self.head.weight[0, 1] = -1.0

    def feature_names(self) -> List[str]:
        """Names of the feature columns, in the order the first layer's weight reads them."""
        moms = [str(b) for b in self.momentum_decays]
        by_group = {
            "grad": ["grad"],
            "param": ["param"],
            "momentum": [f"momentum_{b}" for b in moms],
            "rms": ["rms"],
            "momentum_rsqrt": [f"momentum_rsqrt_{b}" for b in moms],
            "factored": ["factored_grad"] + [f"factored_momentum_{b}" for b in moms],
            "time": [f"time_{t}" for t in self.timescales],
        }
        return [name for group in self.features for name in by_group[group]]

    def state_names(self) -> List[str]:
        """Names of the state tensors, in the order of :meth:`init_state` (see the module doc)."""
        moms = [f"momentum_{b}" for b in self.momentum_decays]
        return [*moms, "second_moment", "factored_row", "factored_col"]

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        state: List[Tensor] = []
        for _ in self.momentum_decays:
            state.append(torch.zeros_like(param, memory_format=torch.contiguous_format))
        state.append(torch.zeros_like(param, memory_format=torch.contiguous_format))
        if param.dim() >= 2:
            rows = param.shape[0]
            cols = param.flatten(1).shape[1]
        else:
            rows = 1
            cols = 1
        state.append(torch.zeros([rows], dtype=param.dtype, device=param.device))
        state.append(torch.zeros([cols], dtype=param.dtype, device=param.device))
        return state

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        count = len(self.momentum_decays)
        check_shapes(grad, param, state, count + 3)
        beta2 = self.second_moment_decay
        eps = self.eps

        # Accumulators (elementwise, in the gradient's dtype).
        momenta: List[Tensor] = []
        for k, beta in enumerate(self.momentum_decays):
            momenta.append(state[k] * beta + grad * (1.0 - beta))
        grad_sq = grad * grad
        second = state[count] * beta2 + grad_sq * (1.0 - beta2)
        if grad.dim() >= 2:
            matrix = grad_sq.flatten(1)
            if self.fused:
                # The same means as matrix-vector products and the outer product as a rank-1
                # matmul. Under dynamic sizes Inductor lowered the broadcast (rows, cols)
                # product with per-element integer division and the mean(0)/mean(1) form to
                # slower loops; this form runs contiguous reductions and one BLAS call
                # (measured on a 1024x1024 tensor: 42 -> 25 ns a coordinate).
                ones = torch.ones(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
                row_mean = torch.mv(matrix, ones) / matrix.shape[1]
                ones = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
                col_mean = torch.mv(matrix.t(), ones) / matrix.shape[0]
            else:
                row_mean = matrix.mean(1)
                col_mean = matrix.mean(0)
            row = state[count + 1] * beta2 + row_mean * (1.0 - beta2)
            col = state[count + 2] * beta2 + col_mean * (1.0 - beta2)
            scaled = row / (row.mean() + eps)
            if self.fused:
                factored = torch.mm(scaled.unsqueeze(1), col.unsqueeze(0))
            else:
                factored = scaled.unsqueeze(1) * col.unsqueeze(0)
            factored = factored.reshape(grad.shape)
        else:
            row = state[count + 1].clone()
            col = state[count + 2].clone()
            factored = second
        new_state = momenta + [second, row, col]  # noqa: RUF005 (no starred lists in TorchScript)

        # Per-coordinate feature columns, in FEATURE_GROUPS order.
        columns: List[Tensor] = []
        if self.use_grad:
            columns.append(grad)
        if self.use_param:
            columns.append(param)
        if self.use_momentum:
            columns.extend(momenta)
        if self.use_rms:
            columns.append(torch.sqrt(second + eps))
        if self.use_momentum_rsqrt:
            rsqrt = torch.rsqrt(second + eps)
            for m in momenta:
                columns.append(m * rsqrt)
        if self.use_factored:
            factored_rsqrt = torch.rsqrt(factored + eps)
            columns.append(grad * factored_rsqrt)
            for m in momenta:
                columns.append(m * factored_rsqrt)

        weight = self.input_layer.weight
        # First layer; the time columns are the same for every coordinate: a per-tensor bias.
        coordinate = self.num_coordinate_features
        bias: Tensor = self.input_layer.bias
        if self.use_time:
            t = step.to(weight.dtype)
            time = torch.stack([torch.tanh(t / tau) for tau in self.timescales])
            bias = bias + weight[:, coordinate:] @ time
        if self.fused and len(self.hidden_layers) == 0:
            return self._fused_network(columns, bias, grad), new_state

        x = torch.stack([c.reshape(-1) for c in columns], dim=1).to(weight.dtype)
        x = x * torch.rsqrt(x.square().mean(0, keepdim=True) + self.norm_eps)
        h = torch.relu(torch.addmm(bias, x, weight[:, :coordinate].t()))
        for layer in self.hidden_layers:
            h = torch.relu(layer(h))
        out = self.head(h)
        direction = out[:, 0] * torch.exp(out[:, 1] * self.exp_mult) * self.step_mult
        return direction.reshape(grad.shape).to(grad.dtype), new_state

    def _fused_network(self, columns: List[Tensor], bias: Tensor, grad: Tensor) -> Tensor:
        """The one-hidden-layer network with its hidden units unrolled (see the class docs).

        The per-tensor normalisers are folded into the first layer's weights (a ``(hidden, F)``
        product per tensor), so the per-coordinate loop reads the raw feature columns and does
        only the MLP's multiply-adds.
        """
        weight = self.input_layer.weight
        head = self.head.weight
        xs: List[Tensor] = []
        scales: List[Tensor] = []
        for c in columns:
            # Columns keep the gradient's shape: on a (rows, cols) view the compiler emits a
            # row loop around a contiguous column loop, so the factored term's per-row and
            # per-column accumulators are a scalar and a vector load, with no index arithmetic.
            c = c.to(weight.dtype)
            # Accumulate the normaliser in float64: a compiled float32 reduction over millions of
            # coordinates drifts by ~1e-5 relative, which would show in every update.
            second = c.square().mean(dtype=torch.float64).to(c.dtype)
            xs.append(c)
            scales.append(torch.rsqrt(second + self.norm_eps))
        folded = weight[:, : len(xs)] * torch.stack(scales)
        d = torch.zeros_like(xs[0]) + self.head.bias[0]
        m = torch.zeros_like(xs[0]) + self.head.bias[1]
        for j in range(weight.shape[0]):
            h = xs[0] * folded[j, 0] + bias[j]
            for f in range(1, len(xs)):
                h = h + xs[f] * folded[j, f]
            h = torch.relu(h)
            d = d + head[0, j] * h
            m = m + head[1, j] * h
        direction = d * torch.exp(m * self.exp_mult) * self.step_mult
        return direction.reshape(grad.shape).to(grad.dtype)

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """FLOPs and bytes of one fused step (``K`` momenta, ``F`` coordinate features, hidden
        widths ``h``), per coordinate: accumulators ``3K + 4`` (momenta, ``g²``, second moment);
        feature columns ``rms`` 2, ``momentum_rsqrt`` ``2 + K``, ``factored`` ``3 + K``; the
        per-tensor normalisation statistics ``2F`` (square and sum; the scale itself is folded
        into the first layer once per tensor); first layer ``2·F·h₁ + 2h₁`` (matmul, bias, ReLU);
        later layers ``2·hᵢ·hᵢ₊₁ + 2hᵢ₊₁``; head ``2·h_L·2 + 2``; output ``d·exp(m·c)·c'`` 4;
        update 2; Adafactor row/column statistics ``+4`` for rank ≥ 2. Bytes: ``g``, ``p`` and
        ``K + 1`` full state tensors in, the state and ``p`` out (row/column vectors negligible).
        """
        k, f, widths = len(self.momentum_decays), self.num_coordinate_features, self.hidden_sizes
        flops = 3 * k + 4 + 2 * self.use_rms + (2 + k) * self.use_momentum_rsqrt
        flops += (3 + k) * self.use_factored
        flops += 2 * f + 2 * f * widths[0] + 2 * widths[0]
        flops += sum(2 * a * b + 2 * b for a, b in itertools.pairwise(widths))
        flops += 2 * widths[-1] * 2 + 2 + 4 + 2
        if len(shape) >= 2:
            flops += 4
        return Cost.elementwise(shape, flops, 3 + 2 * (k + 1), itemsize)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, momentum_decays={self.momentum_decays}, "
            f"second_moment_decay={self.second_moment_decay}, timescales={self.timescales}, "
            f"exp_mult={self.exp_mult}, step_mult={self.step_mult}, init={self.init!r}"
        )
