"""Celo2: a small MLP on momentum, RMS and Adafactor features, orthogonalised on matrices.

The Celo2 learned optimizer (Moudgil, Knyazev & Belilovsky, "Celo2: Towards Learned Optimization
Free Lunch", ICLR 2026, arXiv 2602.19142), written for this package's transform contract so
that published Celo2 weights (see :mod:`compiledopt.export.convert`) run on every backend. One
:class:`Celo2` serves every parameter: tensors of rank ≥ 2 get the learned update, tensors of
rank 0 and 1 (and whatever is routed to the ``adam`` rule) get Adam computed from the same
accumulators.

State layout (one list per parameter ``p``; ``K``, ``R``, ``A`` the numbers of momentum, RMS and
Adafactor decays; the same four tensors for every rank):

=====  ================  ======================  ==========================================
index  name              shape                   meaning
=====  ================  ======================  ==========================================
0      ``momentum``      ``p.shape + (K,)``      ``m_k ← β_k·m_k + (1-β_k)·g``
1      ``rms``           ``p.shape + (R,)``      ``v_k ← β_k·v_k + (1-β_k)·g²``
2      ``factored_row``  ``p.shape - j + (A,)``  ``β_k·r + (1-β_k)·mean_j(g² + 1e-30)``
3      ``factored_col``  ``p.shape - i + (A,)``  ``β_k·c + (1-β_k)·mean_i(g² + 1e-30)``
=====  ================  ======================  ==========================================

``g`` is the gradient clipped to ``±grad_clip``. For rank ≥ 2, ``i < j`` are the two largest
axes of ``p`` (ties to the later axis, as a stable ascending sort of the sizes orders them), and
``p.shape - j`` is the shape without axis ``j``: for a matrix, ``factored_row`` is ``(rows, A)``
and ``factored_col`` ``(cols, A)``. For rank 0 and 1 both are ``(1, A)`` placeholders carried
unchanged. All state has the gradient's dtype and device.
"""

import copy
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiledopt._validation import check_flag, check_int, check_positive, check_real
from compiledopt.learned.celo2_ops import (
    FEATURE_GROUPS,
    NS_COEFFS,
    check_exportable,
    factored_axes,
    factored_features,
    factored_pair,
    feature_widths,
    newton_schulz_last2,
    second_moment_normalize,
    traced_factors,
    traced_newton_schulz,
    without_axis,
)
from compiledopt.learned.mlp import check_shapes
from compiledopt.transforms.base import Cost, Transform, is_exporting

__all__ = ["ACTIVATIONS", "FEATURE_GROUPS", "Celo2", "feature_widths"]

ACTIVATIONS = ("relu", "tanh")


def _decays(value: object, what: str) -> List[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"Invalid {what}: {value!r} (needs a non-empty sequence)")
    return [check_real(b, f"{what} entry", 0.0, 1.0) for b in value]


class Celo2(Transform):
    r"""The Celo2 learned optimizer: a split-input MLP on Adam/Adafactor features.

    For a parameter of rank ≥ 2 (with ``g = clamp(grad, ±grad_clip)``, the accumulators of the
    module doc updated first, ``ρ = rsqrt(v + 1e-8)`` and ``(d1, d0)`` the second-largest and the
    largest axis), the MLP reads 14 feature groups, :data:`FEATURE_GROUPS`:

    ``g``; ``clamp(g, ±0.1)``; ``p``; ``m_k``; ``v``; ``m_k·ρ``; ``ρ``; the factored gradient
    ``g·f_row·f_col``; ``g·ρ``; the row and column accumulators broadcast to ``p``'s shape,
    ``r`` and ``c``; ``rsqrt(r + 1e-8)``, ``rsqrt(c + 1e-8)``; ``m_k·f_row·f_col``. Here ``r``
    is the accumulator averaged over ``d0``, ``c`` the one averaged over ``d1``,
    ``f_row = rsqrt(max(r / (mean_{d1} r + 1e-9), 1e-9))`` and ``f_col = rsqrt(max(c, 1e-9))``
    (Adafactor's factored ``rsqrt`` of the second moment). Each column is normalised over the
    parameter's last two axes, ``x · rsqrt(1e-9 + mean(x²))``; the concatenated columns go
    through ``Linear → act → (Linear → act) × (hidden_layers − 1) → Linear`` to an output
    ``(d, m, …)``, and

    .. math::

        u = d \cdot \exp(m \cdot \text{exp\_mult}) \;[\cdot \text{RMS}(p)]

    is orthogonalised by 5 quintic Newton–Schulz iterations over the last two axes
    (``orthogonalize``), normalised again over them and scaled by ``output_scale``. The first
    layer's weight ``(hidden_size, Σ widths)`` is split by feature group along its columns
    (:func:`feature_widths`). Ranks 0 and 1, and every rank routed to the ``adam`` rule:
    ``d = m̂ / (sqrt(v̂) + adam_eps) · adam_scale``, with ``m̂ = m₁ / (1 − β₁^t)`` the first
    momentum and ``v̂ = v_R / (1 − β_R^t)`` the last RMS accumulator bias-corrected
    (``t = step + 1``), i.e. Adam with ``betas = (momentum_decays[0], rms_decays[-1])``. The
    learning-rate schedule and decoupled weight decay stay outside the rule (the optimizer's).

    Where a layout detail was a choice, this follows PyLO's PyTorch Celo2 optimizers
    (``Celo2_naive``, ``CELO2_naive``): the normalisation and Newton–Schulz run over the last two
    axes (for a convolution weight, over its kernel window), the factored axes are the two
    largest, and the output's third unit is computed and unused.

    Args:
        hidden_size (int, optional): width of the hidden layers. (default: 8)
        hidden_layers (int, optional): hidden layers; the network has ``hidden_layers + 1``
            linear layers. (default: 2)
        output_size (int, optional): output units, ≥ 2 (Celo2 has 3; two are read). (default: 3)
        activation (str, optional): ``"relu"`` or ``"tanh"``. (default: "relu")
        momentum_decays (sequence of float, optional): ``K`` decays in [0, 1).
            (default: (0.9, 0.99, 0.999))
        rms_decays (sequence of float, optional): one decay in [0, 1). (default: (0.95,))
        adafactor_decays (sequence of float, optional): ``K`` decays in [0, 1).
            (default: (0.9, 0.99, 0.999))
        exp_mult (float, optional): scale of the magnitude output ``m``. (default: 0.0)
        output_scale (float, optional): scale of the normalised update, > 0. (default: 1.0)
        param_scale (bool, optional): multiply ``u`` by ``sqrt(mean(p²) + 1e-9)``.
            (default: False)
        orthogonalize (bool, optional): Newton–Schulz on rank ≥ 2. (default: True)
        ns_steps (int, optional): Newton–Schulz iterations. (default: 5)
        ns_eps (float, optional): added to the Frobenius norm before dividing. (default: 1e-8)
        grad_clip (float, optional): the gradient is clamped to ``±grad_clip``. (default: 1000)
        adam_clip (bool, optional): whether the Adam rule clamps too. (default: True)
        adam_eps (float, optional): Adam's ``ε``. (default: 1e-8)
        adam_scale (float, optional): scale of Adam's direction, > 0. (default: 1.0)

    References:
        Moudgil, Knyazev & Belilovsky. 2026. "Celo2: Towards Learned Optimization Free Lunch."
        ICLR 2026, arXiv 2602.19142.
        Shazeer & Stern. 2018. "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost."

    Example:
        >>> opt = Celo2()
        >>> w, g = torch.randn(4, 6), torch.randn(4, 6)
        >>> direction, state = opt.update(g, w, opt.init_state(w), torch.tensor(0))
        >>> round(float(direction.square().mean()), 4)  # unit RMS over the matrix
        1.0
        >>> opt.state_names()
        ['momentum', 'rms', 'factored_row', 'factored_col']
    """

    momentum_decays: List[float]
    rms_decays: List[float]
    adafactor_decays: List[float]
    ns_coeffs: List[float]

    shape_agnostic = True
    view_invariant = False

    def __init__(
        self,
        hidden_size: int = 8,
        hidden_layers: int = 2,
        output_size: int = 3,
        activation: str = "relu",
        momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        rms_decays: Sequence[float] = (0.95,),
        adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999),
        exp_mult: float = 0.0,
        output_scale: float = 1.0,
        param_scale: bool = False,
        orthogonalize: bool = True,
        ns_steps: int = 5,
        ns_eps: float = 1e-8,
        grad_clip: float = 1000.0,
        adam_clip: bool = True,
        adam_eps: float = 1e-8,
        adam_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.hidden_size = check_int(hidden_size, "hidden_size", 1)
        self.hidden_layers = check_int(hidden_layers, "hidden_layers", 1)
        self.output_size = check_int(output_size, "output_size", 2)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation: {activation!r} (one of {ACTIVATIONS})")
        self.activation = activation
        self.use_tanh = activation == "tanh"
        self.momentum_decays = _decays(momentum_decays, "momentum_decays")
        self.rms_decays = _decays(rms_decays, "rms_decays")
        self.adafactor_decays = _decays(adafactor_decays, "adafactor_decays")
        if len(self.rms_decays) != 1:
            raise ValueError(f"Invalid rms_decays: {rms_decays!r} (Celo2 reads exactly one)")
        if len(self.adafactor_decays) != len(self.momentum_decays):
            raise ValueError(
                f"Invalid adafactor_decays: {adafactor_decays!r} (needs as many decays as "
                f"momentum_decays {momentum_decays!r}: the factored momentum pairs them)"
            )
        self.exp_mult = check_real(exp_mult, "exp_mult")
        self.output_scale = check_positive(output_scale, "output_scale")
        self.param_scale = check_flag(param_scale, "param_scale")
        self.orthogonalize = check_flag(orthogonalize, "orthogonalize")
        self.ns_steps = check_int(ns_steps, "ns_steps", 1)
        self.ns_eps = check_positive(ns_eps, "ns_eps")
        self.ns_coeffs = list(NS_COEFFS)
        self.grad_clip = check_positive(grad_clip, "grad_clip")
        self.adam_clip = check_flag(adam_clip, "adam_clip")
        self.adam_eps = check_positive(adam_eps, "adam_eps")
        self.adam_scale = check_positive(adam_scale, "adam_scale")
        self.adam_everywhere = False  # the ``adam`` rule (see routed)
        self.reads_param = True

        k, r, a = (len(d) for d in (self.momentum_decays, self.rms_decays, self.adafactor_decays))
        self.widths: List[int] = feature_widths(k, r, a)
        hidden = self.hidden_size
        self.input_layer = nn.Linear(sum(self.widths), hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(hidden_layers - 1)])
        self.head = nn.Linear(hidden, self.output_size)

    def state_names(self) -> List[str]:
        """Names of the state tensors, in the order of :meth:`init_state` (see the module doc)."""
        return ["momentum", "rms", "factored_row", "factored_col"]

    def rules(self) -> Tuple[str, ...]:
        """``artifact`` (the learned update on rank ≥ 2, Adam below) and ``adam`` (Adam from the
        same accumulators on every rank: embeddings, and PyLO's first and last layers)."""
        return ("artifact", "adam")

    def routed(self, rule: str) -> "Celo2":
        """``self`` for ``artifact``; for ``adam`` a shallow copy sharing the weights."""
        if rule not in self.rules():
            raise ValueError(f"Invalid rule: {rule!r} (Celo2 has the rules {self.rules()})")
        if (rule == "adam") == self.adam_everywhere:
            return self
        variant = copy.copy(self)
        variant.adam_everywhere = rule == "adam"
        return variant

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        shape = list(param.shape)
        a = len(self.adafactor_decays)
        if len(shape) >= 2:
            earlier, later = factored_pair(shape)
            row = without_axis(shape, later) + [a]  # noqa: RUF005 (TorchScript: no starred lists)
            col = without_axis(shape, earlier) + [a]  # noqa: RUF005
        else:
            row = [1, a]
            col = [1, a]
        sizes = [
            shape + [len(self.momentum_decays)],  # noqa: RUF005
            shape + [len(self.rms_decays)],  # noqa: RUF005
            row,
            col,
        ]
        state: List[Tensor] = []
        for size in sizes:
            state.append(torch.zeros(size, dtype=param.dtype, device=param.device))
        return state

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        check_shapes(grad, param, state, 4)
        if self.adam_everywhere or grad.dim() < 2:
            return self._adam(grad, state, step)
        if torch.jit.is_scripting():
            d1, d0 = factored_axes(list(grad.shape))
            tall = grad.shape[-2] > grad.shape[-1]
            return self._learned(grad, param, state, d1, d0, tall)
        if is_exporting():
            return self._traced(grad, param, state)
        d1, d0 = factored_axes(list(grad.shape))
        return self._learned(grad, param, state, d1, d0, grad.shape[-2] > grad.shape[-1])

    def _decay(self, decays: List[float], like: Tensor) -> Tensor:
        """``decays`` as a tensor of ``like``'s dtype (one ``full`` each: TorchScript's
        ``torch.tensor`` of a float list rounds it to float32 first)."""
        out = [torch.full([1], b, dtype=like.dtype, device=like.device) for b in decays]
        return torch.cat(out)

    def _accumulate(
        self, g: Tensor, state: List[Tensor], earlier: int, later: int
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The new momentum, RMS and factored accumulators, the factored ones averaged over the
        axes ``later`` and ``earlier`` (``later < 0``: none, the placeholders carried)."""
        g1 = g.unsqueeze(-1)
        shape = list(g.shape)
        # reshape: an exported graph then knows the decay axes' sizes (not dynamic inputs)
        beta = self._decay(self.momentum_decays, g)
        momentum = state[0].reshape(shape + [len(self.momentum_decays)])  # noqa: RUF005
        momentum = momentum * beta + (1.0 - beta) * g1
        beta = self._decay(self.rms_decays, g)
        rms = state[1].reshape(shape + [len(self.rms_decays)])  # noqa: RUF005
        rms = rms * beta + (1.0 - beta) * (g1 * g1)
        if later < 0:
            return momentum, rms, state[2].clone(), state[3].clone()
        beta = self._decay(self.adafactor_decays, g)
        square = g1 * g1 + 1e-30
        a = len(self.adafactor_decays)
        row_mean, col_mean = square.mean(dim=later), square.mean(dim=earlier)
        row = state[2].reshape(list(row_mean.shape[:-1]) + [a])  # noqa: RUF005 (TorchScript)
        col = state[3].reshape(list(col_mean.shape[:-1]) + [a])  # noqa: RUF005
        row = beta * row + (1.0 - beta) * row_mean
        col = beta * col + (1.0 - beta) * col_mean
        return momentum, rms, row, col

    def _adam(self, grad: Tensor, state: List[Tensor], step: Tensor) -> Tuple[Tensor, List[Tensor]]:
        g = torch.clamp(grad, -self.grad_clip, self.grad_clip) if self.adam_clip else grad
        earlier, later = -1, -1
        if grad.dim() >= 2:
            if not torch.jit.is_scripting():
                check_exportable(list(grad.shape))
            earlier, later = factored_pair(list(grad.shape))
        momentum, rms, row, col = self._accumulate(g, state, earlier, later)
        t = (step + 1).to(torch.float64)
        beta1 = self.momentum_decays[0]
        beta2 = self.rms_decays[len(self.rms_decays) - 1]
        correction1 = (1.0 - torch.pow(beta1, t)).to(grad.dtype)
        correction2 = (1.0 - torch.pow(beta2, t)).to(grad.dtype)
        m_hat = momentum[..., 0] / correction1
        v_hat = rms[..., len(self.rms_decays) - 1] / correction2
        direction = m_hat / (torch.sqrt(v_hat) + self.adam_eps) * self.adam_scale
        return direction, [momentum, rms, row, col]

    def _learned(
        self,
        grad: Tensor,
        param: Tensor,
        state: List[Tensor],
        d1: int,
        d0: int,
        tall: bool,
        traced: bool = False,
    ) -> Tuple[Tensor, List[Tensor]]:
        """The learned step on rank ≥ 2 with the factored axes ``(d1, d0)`` and, for
        Newton–Schulz, whether the last two axes are tall; ``traced``: a matrix whose
        orientation is decided in the graph (see :meth:`_traced`), ``d1``, ``d0`` and ``tall``
        then unused."""
        g = torch.clamp(grad, -self.grad_clip, self.grad_clip)
        earlier, later = (0, 1) if traced else (min(d0, d1), max(d0, d1))
        momentum, rms, row_acc, col_acc = self._accumulate(g, state, earlier, later)
        new_state = [momentum, rms, row_acc, col_acc]
        weight = self.input_layer.weight
        if traced:  # the statistics by axis (rows, columns); the roles go to the weights
            row, col = row_acc.unsqueeze(1), col_acc.unsqueeze(0)
            row_factor, col_factor, weight = traced_factors(row_acc, col_acc, weight, self.widths)
        else:
            row, col, row_factor, col_factor = factored_features(row_acc, col_acc, d1, d0)

        g1 = g.unsqueeze(-1)
        rsqrt = torch.rsqrt(rms + 1e-8)
        full = list(momentum.shape[:-1]) + [len(self.adafactor_decays)]  # noqa: RUF005
        row = row.expand(full)
        col = col.expand(full)
        groups = [
            g1,
            torch.clamp(g1, -0.1, 0.1),
            param.unsqueeze(-1).to(g.dtype),
            momentum,
            rms,
            momentum * rsqrt,
            rsqrt,
            g1 * row_factor * col_factor,
            g1 * rsqrt,
            row,
            col,
            torch.rsqrt(row + 1e-8),
            torch.rsqrt(col + 1e-8),
            momentum * row_factor * col_factor,
        ]
        rank = grad.dim()
        dims = [rank - 2, rank - 1]
        columns: List[Tensor] = []
        for x in groups:
            columns.append(second_moment_normalize(x, dims))
        features = torch.cat(columns, dim=-1).to(weight.dtype)
        out = self._network(features.reshape(-1, features.shape[-1]), weight)
        out = out.reshape(full[:-1] + [out.shape[-1]]).to(g.dtype)  # noqa: RUF005
        magnitude = torch.exp(out[..., 1] * self.exp_mult)
        if self.param_scale:
            magnitude = torch.sqrt(torch.mean(param.to(g.dtype) ** 2) + 1e-9) * magnitude
        update = out[..., 0] * magnitude
        if self.orthogonalize:
            if traced:
                update = traced_newton_schulz(update, self.ns_coeffs, self.ns_steps, self.ns_eps)
            else:
                update = newton_schulz_last2(
                    update, self.ns_coeffs, self.ns_steps, self.ns_eps, tall
                )
        update = second_moment_normalize(update, dims) * self.output_scale
        return update, new_state

    def _network(self, x: Tensor, weight: Tensor) -> Tensor:
        """The MLP on ``(N, F)`` features, its first layer's weight ``weight`` (the input
        layer's, or a traced matrix's with the row and column groups swapped)."""
        h = torch.nn.functional.linear(x, weight, self.input_layer.bias)
        h = torch.tanh(h) if self.use_tanh else torch.relu(h)
        for layer in self.hidden:
            h = layer(h)
            h = torch.tanh(h) if self.use_tanh else torch.relu(h)
        return self.head(h)

    @torch.jit.unused
    def _traced(
        self, grad: Tensor, param: Tensor, state: List[Tensor]
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`_learned` for ``torch.export`` (``torch.compile`` takes the eager path and
        guards on the orientation: ``torch.cond`` cannot run under the ``vmap`` of the batched
        multi-tensor step with symbolic sizes). A matrix with symbolic
        sizes keeps both orientations: the two steps that depend on which side is larger (the
        factored statistics' roles and Newton–Schulz's side) are ``torch.cond`` s on rows >
        columns, so one graph serves tall and wide matrices (the state's shapes, rows and
        columns, do not depend on it). A higher rank with symbolic sizes cannot be exported:
        which two axes are the largest would be fixed by the example, and the graph wrong for
        other sizes (``torch.compile`` guards on them instead)."""
        shape = list(grad.shape)
        if grad.dim() == 2:
            rows, cols = shape[0], shape[1]
            if not (statically_known_true(rows > cols) or statically_known_true(rows <= cols)):
                return self._learned(grad, param, state, 0, 1, False, True)
        else:
            check_exportable(shape)
        d1, d0 = factored_axes(shape)
        return self._learned(grad, param, state, d1, d0, shape[-2] > shape[-1])

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """FLOPs and bytes of one step, per coordinate (``K`` momenta, one RMS decay, ``A = K``
        Adafactor decays, ``F = Σ widths`` feature columns, hidden width ``h``, ``L`` hidden
        layers). Accumulators: clamp 2, momenta ``3K``, RMS 4, ``g² + ε`` 2, factored means and
        decays ``2A``. Features: ``rsqrt`` 2, ``clamp`` 2, products ``K + 1``, factored gradient
        and momentum ``2A + 2K``, ``rsqrt`` of the broadcast statistics ``4A``; normalisation 3
        per column (``3F``). Network ``2Fh + 2h + (L − 1)(2h² + 2h) + 2h·out + out``; output
        ``d·exp(m·c)`` 3, normalisation 3, scale 1; update 2. ``orthogonalize`` adds, on the
        last two axes (``r ≤ c``), the normalisation 3 and per iteration ``4r + (2r² + 3r)/c +
        2`` (the Gram matrix, its square, the polynomial, the product). Adam (rank ≤ 1 and the
        ``adam`` rule): accumulators as above without the factored ones, bias correction 2,
        ``sqrt``, ``+ ε``, divide, scale: ``3K + 13``. Bytes: ``g``, ``p`` and the ``K + 1``
        state values in, the state and ``p`` out."""
        k = len(self.momentum_decays)
        a = len(self.adafactor_decays)
        values = 3 + 2 * (k + len(self.rms_decays))
        if self.adam_everywhere or len(shape) < 2:
            return Cost.elementwise(shape, 3 * k + 13, values, itemsize)
        f, h, out = sum(self.widths), self.hidden_size, self.output_size
        flops: float = 2 + 3 * k + 4 + 2 + 2 * a
        flops += 2 + 2 + k + 1 + 2 * a + 2 * k + 4 * a + 3 * f
        flops += 2 * f * h + 2 * h + (self.hidden_layers - 1) * (2 * h * h + 2 * h)
        flops += 2 * h * out + out + 3 + 3 + 1 + 2
        if self.orthogonalize:
            r, c = sorted((int(shape[-2]), int(shape[-1])))
            if r > 0:
                flops += 3 + self.ns_steps * (4 * r + (2 * r * r + 3 * r) / c + 2)
        return Cost.elementwise(shape, flops, values, itemsize)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, hidden_layers={self.hidden_layers}, "
            f"output_size={self.output_size}, activation={self.activation!r}, "
            f"momentum_decays={self.momentum_decays}, rms_decays={self.rms_decays}, "
            f"adafactor_decays={self.adafactor_decays}, exp_mult={self.exp_mult}, "
            f"output_scale={self.output_scale}, param_scale={self.param_scale}, "
            f"orthogonalize={self.orthogonalize}, grad_clip={self.grad_clip}, "
            f"adam_clip={self.adam_clip}" + (", rule='adam'" if self.adam_everywhere else "")
        )
