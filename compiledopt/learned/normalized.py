"""A small odd per-coordinate MLP on overflow-safe, scale-free features, with a unit-RMS output.

One :class:`NormalizedMLP` is shared by every parameter of a model, whatever its shape (rank 0 to
5). Its features are ratios of gradient statistics (so they do not depend on the gradient's
scale), its network has no biases and odd activations (so a coordinate with no gradient history
never moves), and its output is normalised per tensor to an RMS of 1 (so the caller's learning
rate is the RMS of each tensor's update, as Adam's is).

State layout (one list per parameter ``p``; the same for every rank):

=====  ===================  ===========  ============================================
index  name                 shape        meaning
=====  ===================  ===========  ============================================
0      ``momentum_fast``    ``p.shape``  ``m₁ ← β₁·m₁ + (1-β₁)·g``
1      ``momentum_slow``    ``p.shape``  ``m₂ ← β₂·m₂ + (1-β₂)·g``
2      ``abs_moment``       ``p.shape``  ``a ← β₃·a + (1-β₃)·|g|``
=====  ===================  ===========  ============================================

All state has the gradient's dtype and device.
"""

import copy
import itertools
import math
from typing import Final, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiledopt._validation import check_flag, check_positive, check_real, check_sizes
from compiledopt.learned.mlp import check_shapes
from compiledopt.learned.normalized_blocked import blocked_rule, blocked_update
from compiledopt.learned.normalized_export import exported_network, exported_newton_schulz
from compiledopt.learned.normalized_ops import (
    BLOCK_SIZE,
    bias_scales,
    newton_schulz,
    newton_schulz_flops,
    normalize,
    rational_tanh,
)
from compiledopt.transforms.base import Cost, Transform, is_exporting, is_vmapped

INITS = ("small_mlp", "zero_mlp")
#: Feature columns, in the order the first layer and the skip weights read them.
FEATURE_NAMES = ("ratio_fast", "ratio_slow", "ratio_grad", "normalized_grad", "normalized_fast")
_HARNESS_OFF = {"orthogonalize": False, "adam_vectors": False, "elementwise": False}
#: The harness options of each rule (``None``: as constructed). See :meth:`NormalizedMLP.rules`.
RULE_OPTIONS = {
    "artifact": None,
    "learned": _HARNESS_OFF,
    "orthogonal": {**_HARNESS_OFF, "orthogonalize": True, "adam_vectors": True},
    "adam": {**_HARNESS_OFF, "elementwise": True},
}


class NormalizedMLP(Transform):
    r"""Per-coordinate odd MLP on bias-corrected ratio features, normalised to unit RMS per tensor.

    Accumulators are updated with the current gradient first, then read (see the module doc for
    the state). With ``t = step`` (updates before this one) and ``cₖ = 1 − βₖ^(t+1)`` (computed in
    float64 from ``step``), the five feature columns are

    ======================  ================================================
    feature                 value
    ======================  ================================================
    ``ratio_fast``          ``r₁ = m₁ / (a + ε) · (c₃ / c₁)``
    ``ratio_slow``          ``r₂ = m₂ / (a + ε) · (c₃ / c₂)``
    ``ratio_grad``          ``r₀ = g / (a + ε) · c₃``
    ``normalized_grad``     ``normalize(g)``
    ``normalized_fast``     ``normalize(m₁)``
    ======================  ================================================

    each clamped to ``±feature_clip``. ``normalize(x) = y / sqrt(mean(y²))`` with ``y = x / max|x|``
    over the tensor (zeros for an all-zero tensor). Overflow safety: no square of a gradient is
    ever formed (``a`` is an average of ``|g|``, not ``g²``), every accumulator is a convex
    combination of finite values, the bias corrections multiply ratios that are already bounded
    (``|m₁/a| ≤ (1-β₁)/(1-β₃)``, ``|m₂/a| ≤ (1-β₂)/(1-β₃)``, ``|g/a| ≤ 1/(1-β₃)`` when ``β₁, β₂ ≤
    β₃``, as by default; with other decays a ratio may overflow to ``±inf``, never to NaN, and the
    clamp turns it into ``±feature_clip``) instead of dividing a large value by a small
    correction, and :func:`normalize` divides by the maximum before squaring. So every finite
    float32 gradient history gives a finite direction. ``ε = eps`` (default ``1e-37``, a normal
    float32 and bfloat16 number) keeps ``a + ε`` positive where a coordinate has seen only zeros;
    elsewhere it shifts the ratios by a relative ``ε/a``: on the first step ``a = (1-β₃)·|g|``,
    so ``1e-4`` at ``|g| = 1e-30`` and below float32 rounding from ``|g| ≈ 1e-27``. float16 is not
    supported (``ε`` underflows to zero there).

    Every feature is odd in the gradient history (negating every gradient negates it). The
    network, one per coordinate, has no biases and ``tanh`` activations, plus a linear skip:
    ``out = x · skip + head(tanh(… tanh(W₁ x)))``, so it is odd too, and a coordinate whose
    features are all zero (zero gradient history) gets exactly zero. The direction is
    ``normalize(out)`` per tensor: the caller's ``p ← p − lr·direction`` moves each tensor by an
    RMS of exactly ``lr`` (zero for an all-zero ``out``).

    Harness options (off by default; recorded in the constructor's kwargs, so artifacts carry
    them):

    * ``orthogonalize``: for rank ≥ 2, ``out`` viewed as ``(shape[0], prod(shape[1:]))`` goes
      through :func:`newton_schulz` (5 quintic iterations toward the nearest semi-orthogonal
      matrix, as Muon does) before the RMS normalisation. Ranks 0 and 1 are unaffected. In an
      exported graph the choice of the Gram side is a ``torch.cond`` on the sizes, so one
      dynamic-shape graph serves tall and wide matrices (``torch.compile`` guards on it).
    * ``adam_vectors``: for rank ≤ 1, the direction is ``clamp(r₁, ±feature_clip)`` (an Adam-like
      elementwise rule, not normalised per tensor) instead of the network's.
    * ``elementwise``: that Adam-like rule for every rank (what the ``adam`` rule routes
      embeddings and output layers to).

    Rules (:meth:`rules`, the variants a parameter role can be routed to, with the same
    weights): ``"artifact"`` (the options as constructed), ``"learned"`` (the network, no
    harness), ``"orthogonal"`` (``orthogonalize`` and ``adam_vectors``) and ``"adam"``
    (``elementwise``).

    Formulation: the features are stacked into an ``(N, 5)`` matrix and the network is matmuls
    (the training path; it scripts, exports and runs under ``torch.func.vmap``). Fused formulation
    (``fused = True``, set by ``compiledopt.export.freeze_transform(..., fused=True)`` for the
    Inductor backends): the same maths with the hidden units unrolled into elementwise
    multiply-adds on tensors of the gradient's shape, so a compiler emits one loop over the
    coordinates, the per-tensor mean squares accumulated in float64, and ``tanh`` evaluated by
    :func:`rational_tanh` (within ``9e-7`` of it; ``torch.tanh``'s accurate kernel was more than
    half of the compiled step's time). There is no
    data-dependent control flow and no in-place operation on the inputs in either form.
    :meth:`update_blocked` computes the fused formulation in cache-sized blocks of coordinates
    (eager inference on large tensors: no whole-tensor intermediates beyond its outputs).

    Initialisation: ``skip = [1, 0, 0, 0, 0]``, the hidden layers ``nn.Linear``'s default (without
    bias), the head ``N(0, 0.01²)`` from the default generator (``init="small_mlp"``) or zero
    (``init="zero_mlp"``: a fresh transform then returns exactly ``normalize(clamp(r₁))``, a
    normalised Adam-like direction).

    Args:
        hidden_sizes (sequence of int, optional): widths of the hidden layers, at least one.
            (default: (8, 8))
        fast_decay (float, optional): ``β₁``, in [0, 1). (default: 0.9)
        slow_decay (float, optional): ``β₂``, in [0, 1). (default: 0.99)
        abs_decay (float, optional): ``β₃``, in [0, 1). (default: 0.999)
        feature_clip (float, optional): features are clamped to ``±feature_clip``, > 0.
            (default: 10)
        eps (float, optional): added to ``a`` before dividing, > 0. (default: 1e-37)
        init (str, optional): ``"small_mlp"`` or ``"zero_mlp"`` (see above).
            (default: "small_mlp")
        orthogonalize (bool, optional): Newton–Schulz on matrices (see above). (default: False)
        adam_vectors (bool, optional): Adam-like rule on ranks 0 and 1 (see above).
            (default: False)
        elementwise (bool, optional): the Adam-like rule on every rank (see above).
            (default: False)

    Example:
        >>> opt = NormalizedMLP(init="zero_mlp")
        >>> w, g = torch.randn(4, 3), torch.randn(4, 3)
        >>> direction, state = opt.update(g, w, opt.init_state(w), torch.tensor(0))
        >>> bool((direction * g > 0).all()), round(direction.detach().square().mean().item(), 4)
        (True, 1.0)
        >>> opt.state_names()
        ['momentum_fast', 'momentum_slow', 'abs_moment']
    """

    shape_agnostic = True
    view_invariant = True
    fusable = True
    paddable = True
    #: A TorchScript rule computes a tensor of more coordinates than this in blocks of this size.
    blocked_from: Final[int] = BLOCK_SIZE

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (8, 8),
        fast_decay: float = 0.9,
        slow_decay: float = 0.99,
        abs_decay: float = 0.999,
        feature_clip: float = 10.0,
        eps: float = 1e-37,
        init: str = "small_mlp",
        orthogonalize: bool = False,
        adam_vectors: bool = False,
        elementwise: bool = False,
    ) -> None:
        super().__init__()
        hidden = check_sizes(hidden_sizes, "hidden_sizes")
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"Invalid init: {init!r} (one of {INITS})")
        self.hidden_sizes: List[int] = hidden
        self.fast_decay = check_real(fast_decay, "fast_decay", 0.0, 1.0)
        self.slow_decay = check_real(slow_decay, "slow_decay", 0.0, 1.0)
        self.abs_decay = check_real(abs_decay, "abs_decay", 0.0, 1.0)
        self.feature_clip = check_positive(feature_clip, "feature_clip")
        self.eps = check_positive(eps, "eps")
        self.init = init
        self.orthogonalize = check_flag(orthogonalize, "orthogonalize")
        self.adam_vectors = check_flag(adam_vectors, "adam_vectors")
        self.elementwise = check_flag(elementwise, "elementwise")
        self.fused = False
        self.reads_param = False

        widths = [len(FEATURE_NAMES), *hidden]
        self.layers = nn.ModuleList(
            [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths)]
        )
        self.head = nn.Linear(hidden[-1], 1, bias=False)
        with torch.no_grad():
            if init == "zero_mlp":
                self.head.weight.zero_()
            else:
                self.head.weight.normal_(0.0, 0.01)
        skip = torch.zeros(len(FEATURE_NAMES))
        skip[0] = 1.0
        self.skip = nn.Parameter(skip)

    def state_names(self) -> List[str]:
        """Names of the state tensors, in the order of :meth:`init_state` (see the module doc)."""
        return ["momentum_fast", "momentum_slow", "abs_moment"]

    def pointwise(self, rank: int) -> bool:
        """The Adam-like rule (``elementwise``, or ``adam_vectors`` on ranks 0 and 1) is pointwise;
        the network is not (it reads per-tensor mean squares)."""
        return self.elementwise or (self.adam_vectors and rank <= 1)

    def rules(self) -> Tuple[str, ...]:
        """``artifact`` (as constructed), ``learned``, ``orthogonal`` and ``adam`` (see the class
        doc)."""
        return tuple(RULE_OPTIONS)

    def routed(self, rule: str) -> "NormalizedMLP":
        """This transform with the harness options of ``rule`` (see :meth:`rules`): ``self``
        when they are already its options, else a shallow copy that shares its weights (the
        same ``nn.Parameter`` objects, so meta-gradients through any variant reach them)."""
        if rule not in RULE_OPTIONS:
            raise ValueError(f"Invalid rule: {rule!r} (NormalizedMLP has the rules {self.rules()})")
        options = RULE_OPTIONS[rule]
        if options is None or all(getattr(self, k) == v for k, v in options.items()):
            return self
        variant = copy.copy(self)
        for key, value in options.items():
            setattr(variant, key, value)
        return variant

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        return [
            torch.zeros_like(param, memory_format=torch.contiguous_format),
            torch.zeros_like(param, memory_format=torch.contiguous_format),
            torch.zeros_like(param, memory_format=torch.contiguous_format),
        ]

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return self._update(grad, param, state, step, None)

    @torch.jit.unused
    def update_padded(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor, count: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`update` of a zero-padded canonical view of ``count`` elements: every feature
        and the network's output are zero on the padding (zero history, odd network), the
        per-tensor means divide by ``count``, and Newton–Schulz keeps a zero-padded matrix
        zero-padded (the Gram matrix of ``[[A, 0], [0, 0]]`` is ``[[AAᵀ, 0], [0, 0]]``)."""
        return self._update(grad, param, state, step, count)

    def _update(
        self,
        grad: Tensor,
        param: Tensor,
        state: List[Tensor],
        step: Tensor,
        count: Optional[Tensor],
    ) -> Tuple[Tensor, List[Tensor]]:
        check_shapes(grad, param, state, 3)
        beta1, beta2, beta3 = self.fast_decay, self.slow_decay, self.abs_decay
        if torch.jit.is_scripting() and count is None and grad.numel() > self.blocked_from:
            # An exported TorchScript rule computes a large tensor in blocks: its temporaries are
            # a block's size, not the tensor's (see normalized_blocked).
            return self.in_blocks(grad, state, step, self.blocked_from)
        vectors = self.elementwise or (self.adam_vectors and grad.dim() <= 1)
        fast = state[0] * beta1 + grad * (1.0 - beta1)
        slow = state[1] * beta2 + grad * (1.0 - beta2)
        # |g·(1 − β₃)|: bit for bit |g|·(1 − β₃) (β₃ ≤ 1), and measured one tensor lower in a
        # TorchScript graph's peak memory than with |g| taken first.
        absolute = state[2] * beta3 + (grad * (1.0 - beta3)).abs()
        new_state = [fast, slow, absolute]

        scales = bias_scales(step, beta1, beta2, beta3).to(grad.dtype)
        clip = self.feature_clip
        if vectors:
            # One expression, no named intermediates: each temporary is freed at its last use,
            # which keeps an exported graph's peak at the outputs plus one tensor.
            return torch.clamp(fast / (absolute + self.eps) * scales[0], -clip, clip), new_state

        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            out = self._network_out(grad, fast, slow, absolute, scales, count)
        elif is_exporting() and not self.fused and count is None:
            # An ONNX graph: the network of a large tensor in pieces (normalized_export).
            out = self._exported_network(grad, fast, slow, absolute, scales).reshape(grad.shape)
        else:
            out = self._network_out(grad, fast, slow, absolute, scales, count)
        if self.orthogonalize and grad.dim() >= 2:
            matrix = out.reshape(grad.shape[0], -1)
            if torch.jit.is_scripting():
                matrix = newton_schulz(matrix)
            elif torch.compiler.is_compiling():
                matrix = self._traced_newton_schulz(matrix)
            else:
                matrix = newton_schulz(matrix)
            out = matrix.reshape(grad.shape)
        return normalize(out, self.fused, count).to(grad.dtype), new_state

    @torch.jit.unused
    def update_blocked(
        self,
        grad: Tensor,
        param: Tensor,
        state: List[Tensor],
        step: Tensor,
        block: int = BLOCK_SIZE,
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`update` of the fused formulation, computed ``block`` coordinates at a time: the
        eager CPU path for large tensors. Only the outputs (the direction and the three new state
        tensors) are allocated at full size; every other intermediate holds ``O(block)`` values.
        See :func:`compiledopt.learned.normalized_blocked.blocked_update` (the exceptions, the
        ``orthogonalize`` case, which needs the whole matrix for Newton–Schulz, and why it is not
        differentiable). Kept out of TorchScript and ``torch.export``.
        """
        return blocked_update(self, grad, param, state, step, block)

    def in_blocks(
        self, grad: Tensor, state: List[Tensor], step: Tensor, block: int
    ) -> Tuple[Tensor, List[Tensor]]:
        """:func:`~compiledopt.learned.normalized_blocked.blocked_rule` with this transform's
        options and weights, unchecked: the body of :meth:`update_blocked` and of a TorchScript
        rule's step on a large tensor. Inference only: the blocks are written by ``out=``
        operations, so the weights go in detached."""
        weights: List[Tensor] = []
        for layer in self.layers:
            weight = layer.weight
            assert isinstance(weight, Tensor)  # an nn.Linear's (narrows the type for checkers)
            weights.append(weight.detach())
        return blocked_rule(
            grad,
            state,
            step,
            (self.fast_decay, self.slow_decay, self.abs_decay),
            self.feature_clip,
            self.eps,
            self.elementwise or (self.adam_vectors and grad.dim() <= 1),
            self.orthogonalize,
            weights,
            self.head.weight.detach(),
            self.skip.detach(),
            block,
        )

    def _network_out(
        self,
        grad: Tensor,
        fast: Tensor,
        slow: Tensor,
        absolute: Tensor,
        scales: Tensor,
        count: Optional[Tensor],
    ) -> Tensor:
        """The network's output (before Newton–Schulz and the normalisation) on the whole
        tensor: the five clamped feature columns, then the fused or the matmul form."""
        normalized_grad = normalize(grad, self.fused, count)
        normalized_fast = normalize(fast, self.fused, count)
        columns = self.feature_columns(
            grad, fast, slow, absolute, scales, normalized_grad, normalized_fast
        )
        if self.fused:
            return self._fused_network(columns)
        return self._network(columns).reshape(grad.shape)

    def feature_columns(
        self,
        grad: Tensor,
        fast: Tensor,
        slow: Tensor,
        absolute: Tensor,
        scales: Tensor,
        normalized_grad: Tensor,
        normalized_fast: Tensor,
    ) -> List[Tensor]:
        """The five feature columns (:data:`FEATURE_NAMES`) clamped to ``±feature_clip``, in the
        network's dtype; the caller computes the normalised two (whole, or on a piece)."""
        clip = self.feature_clip
        denominator = absolute + self.eps
        raw = [
            fast / denominator * scales[0],
            slow / denominator * scales[1],
            grad / denominator * scales[2],
            normalized_grad,
            normalized_fast,
        ]
        dtype = self.skip.dtype
        return [torch.clamp(x, -clip, clip).to(dtype) for x in raw]

    def _network(self, columns: List[Tensor]) -> Tensor:
        """The matmul form on whole columns, the flat output. Inference outside ``vmap`` (an
        optimizer's step) takes :meth:`network_of`'s products transposed: the features as the
        rows of a ``(5, N)`` matrix, each layer ``W @ X``, no strided ``N × 5`` stack (10–20%
        of an eager step on a 0.35M-parameter GPT). Under ``vmap`` (whose batching folds the batch
        into :meth:`network_of`'s rows) and with gradients enabled (meta-training, whose
        recorded runs reproduce its arithmetic bit for bit) :meth:`network_of` itself."""
        rows = torch.is_grad_enabled()
        if not torch.jit.is_scripting():
            rows = rows or is_vmapped(columns[0])
        if rows:
            return self.network_of(torch.stack([c.reshape(-1) for c in columns], dim=1))
        h = x = torch.stack([c.reshape(-1) for c in columns])
        for layer in self.layers:
            weight = layer.weight
            assert isinstance(weight, Tensor)  # an nn.Linear's (narrows the type for checkers)
            h = torch.tanh(torch.mm(weight, h))
        return (torch.mm(self.head.weight, h) + torch.mm(self.skip.unsqueeze(0), x)).reshape(-1)

    @torch.jit.unused
    def _exported_network(
        self, grad: Tensor, fast: Tensor, slow: Tensor, absolute: Tensor, scales: Tensor
    ) -> Tensor:
        """:func:`~compiledopt.learned.normalized_export.exported_network` (ONNX, in pieces)."""
        return exported_network(self, grad, fast, slow, absolute, scales)

    def network_of(self, x: Tensor) -> Tensor:
        """The network (matmul form) on stacked ``(..., 5)`` feature columns: the flat output,
        skip included."""
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h))
        # A one-column product, not torch.mv: onnxruntime runs a 1-D MatMul ~45x slower.
        return (self.head(h) + torch.matmul(x, self.skip.unsqueeze(1))).reshape(-1)

    def _fused_network(self, columns: List[Tensor]) -> Tensor:
        """The same network with every hidden unit unrolled into elementwise multiply-adds on
        tensors of the gradient's shape (one loop over the coordinates for a compiler)."""
        units = columns
        for layer in self.layers:
            weight = layer.weight
            assert isinstance(weight, Tensor)  # an nn.Linear's (narrows the type for checkers)
            hidden: List[Tensor] = []
            for j in range(weight.shape[0]):
                h = units[0] * weight[j, 0]
                for f in range(1, len(units)):
                    h = h + units[f] * weight[j, f]
                hidden.append(rational_tanh(h))
            units = hidden
        head = self.head.weight
        out = columns[0] * self.skip[0]
        for f in range(1, len(columns)):
            out = out + columns[f] * self.skip[f]
        for j in range(len(units)):
            out = out + units[j] * head[0, j]
        return out

    @torch.jit.unused
    def _traced_newton_schulz(self, matrix: Tensor) -> Tensor:
        """:func:`newton_schulz` for ``torch.compile``/``torch.export``. An exported graph with
        symbolic sizes chooses the side and the Gram steps by ``torch.cond``
        (:func:`~compiledopt.learned.normalized_export.exported_newton_schulz`), so it is not
        specialised to a shape. ``torch.compile`` branches in Python instead and guards on the
        side and on whether the matrix is long enough to end on its Gram matrix (at most four
        graphs): ``torch.cond`` cannot run under ``vmap`` with symbolic sizes, which the batched
        multi-tensor step needs."""
        rows, cols = matrix.shape[0], matrix.shape[1]
        tall = rows > cols
        static = statically_known_true(tall) or statically_known_true(rows <= cols)
        if static or not is_exporting():
            return newton_schulz(matrix)
        return exported_newton_schulz(matrix)

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """FLOPs and bytes of one fused step, per coordinate: accumulators 10 (three averages of 3,
        ``|g|``); ratios 7 (``a + ε``, then a divide and a scale each); the two normalised columns
        6 each (``|x|``, max, scale, square, sum, scale); clamps 2 per feature, 10; first layer
        ``2·5·h₁ + h₁`` (multiply-adds, tanh), later layers ``2·hᵢ·hᵢ₊₁ + hᵢ₊₁``, head ``2·h_L``,
        skip 10; output normalisation 6; update 2. Defaults ``(8, 8)``: 297.

        ``adam_vectors`` on rank ≤ 1: accumulators 10, ``a + ε`` 1, ``r₁`` 2, clamp 2, update 2:
        17. ``orthogonalize`` on rank ≥ 2 adds Newton–Schulz on the matrix view
        (:func:`~compiledopt.learned.normalized_ops.newton_schulz_flops`).
        Bytes: ``g``, ``p`` and the three state tensors in, the state and ``p`` out (9 values).
        """
        if self.elementwise or (self.adam_vectors and len(shape) <= 1):
            return Cost.elementwise(shape, 17, 9, itemsize)
        widths = [len(FEATURE_NAMES), *self.hidden_sizes]
        network = sum(2 * a * b + b for a, b in itertools.pairwise(widths))
        network += 2 * widths[-1] + 2 * len(FEATURE_NAMES)
        flops: float = 10 + 7 + 12 + 2 * len(FEATURE_NAMES) + network + 6 + 2
        if self.orthogonalize and len(shape) >= 2:
            flops += newton_schulz_flops(shape[0], math.prod(shape[1:]))
        return Cost.elementwise(shape, flops, 9, itemsize)

    def extra_repr(self) -> str:
        return (
            f"hidden_sizes={self.hidden_sizes}, fast_decay={self.fast_decay}, "
            f"slow_decay={self.slow_decay}, abs_decay={self.abs_decay}, "
            f"feature_clip={self.feature_clip}, eps={self.eps}, init={self.init!r}, "
            f"orthogonalize={self.orthogonalize}, adam_vectors={self.adam_vectors}, "
            f"elementwise={self.elementwise}"
        )
