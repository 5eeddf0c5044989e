"""The transform contract that every part of compiledopt derives from.

A transform maps a gradient (and optionally the parameter, the transform's own state for that
parameter and the step count) to an update *direction*; the caller applies
``p <- p - lr * direction``.
State is explicit, a ``List[Tensor]``, so one signature serves TorchScript, ``torch.compile``,
``torch.export`` and ONNX alike::

    init_state(param) -> List[Tensor]
    update(grad, param, state, step) -> (direction, new_state)
    forward(grad) -> direction          # the single-argument call of the seed API
    cost(shape) -> Cost                 # FLOPs and bytes of one step (the roofline's input)

Do not add ``from __future__ import annotations`` here: TorchScript needs real annotations.
"""

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn


def check_grad_shape(grad: Tensor, expected: List[int]) -> None:
    """Raise ``ValueError`` naming both shapes unless ``grad`` has the ``expected`` shape."""
    if list(grad.shape) != expected:
        raise ValueError(
            f"gradient of shape {list(grad.shape)} given to a transform bound to shape {expected}"
        )


@torch.jit.unused
def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing (an exported graph with symbolic sizes), as
    :func:`torch.compiler.is_exporting` answers on the pinned torch: never under
    ``torch.compile``. torch 2.11's Dynamo folds ``is_exporting()`` itself to ``True`` while it
    compiles, which would send a compiled rule down the exported graph's paths (``torch.cond``
    over symbolic sizes, which that Dynamo refuses); the flag behind it is read instead, where
    torch has one. Not for TorchScript (its branches test ``torch.jit.is_scripting()`` first)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


@torch.jit.unused
def is_vmapped(x: Tensor) -> bool:
    """Whether ``x`` is a tensor batched by ``torch.func.vmap`` (a rule may then pick the
    formulation whose batching rule folds the batch into its matmuls). ``False`` under
    ``torch.compile`` (a formulation choice for eager speed) and where the installed torch cannot
    say. Not for TorchScript."""
    check = getattr(torch._C._functorch, "is_batchedtensor", None)
    if check is None or torch.compiler.is_compiling():
        return False
    return bool(check(x))


class Cost(NamedTuple):
    """FLOPs and bytes of one optimizer step on one parameter, ``p ← p − lr·d`` included.

    Conventions: a transcendental (exp, sqrt, rsqrt, tanh, sigmoid, log) counts as one FLOP and
    the update ``p ← p − lr·d`` as two a coordinate. ``bytes`` are those of an ideal fused step:
    every input (``p``, ``g``, the state) read once, every output (``p``, the new state) written
    once, the direction never materialised, plus the rule's weights read once per tensor where
    they are matrices. ``eager_flops`` adds what an eager call recomputes every time (a
    positive semi-definite Kronecker factor's ``LᵀL``); it equals ``flops`` otherwise.
    """

    flops: float
    bytes: float
    eager_flops: float

    @staticmethod
    def elementwise(shape: Sequence[int], flops: float, values: float, itemsize: int = 4) -> "Cost":
        """The cost of a rule doing ``flops`` FLOPs and moving ``values`` values a coordinate."""
        numel = math.prod(shape)
        return Cost(float(flops * numel), float(values * itemsize * numel), float(flops * numel))


class Transform(nn.Module):
    """Base class of every gradient transform.

    Subclasses implement :meth:`update` (decorated with ``@torch.jit.export``) and, when they carry
    state, :meth:`init_state` and :meth:`state_names`. Learnable weights are ``nn.Parameter`` s, so
    ``transform.parameters()`` is the meta-parameter set.

    Attributes:
        reads_param (bool): whether :meth:`update` reads ``param``. Callers that only have a
            gradient (the seed's ``transform(grad)``) may then pass the gradient in its place.
        shape_agnostic (bool): whether one instance serves parameters of any shape (shared
            across a model and transferable to other models), as meta-training requires.
            Shape-bound transforms are built per parameter by a factory.
        view_invariant (bool): whether the update of a parameter equals the update of its
            canonical view — ``(numel,)`` for rank 0 and 1, ``(shape[0], prod(shape[1:]))`` for
            rank ≥ 2 — with the state tensors of the parameter's shape viewed alike (true of
            elementwise rules and of Adafactor-style row/column statistics). Compiled backends
            then need one graph per view rank instead of one per parameter rank.
        fusable (bool): whether the transform has a second, compiler-friendly formulation of
            the same maths, switched on by setting ``fused`` (``False`` by default);
            :func:`compiledopt.export.freeze_transform` does so for the Inductor backends.

        paddable (bool): whether :meth:`update_padded` computes a parameter's update on its
            canonical view zero-padded at the end of each axis (requires ``view_invariant``
            and every state tensor of the parameter's shape). Runtimes then compute tensors
            of different shapes in one call.

    Optional hooks: :meth:`update_blocked`, the update computed a block of coordinates at a time
    (bounded temporary memory), which the eager runtime calls for large tensors (the default is
    :meth:`update` itself); :meth:`update_padded` for a ``paddable`` transform; :meth:`pointwise`,
    the ranks at which a slice's update is the update's slice (exported graphs then run large
    tensors a slice at a time).
    """

    reads_param: bool = False
    shape_agnostic: bool = False
    view_invariant: bool = False
    fusable: bool = False
    fused: bool = False
    paddable: bool = False

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        """Return the initial state for ``param`` (``[]`` for stateless transforms)."""
        return []

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """Map ``grad`` to ``(direction, new_state)``; descent applies ``p - lr * direction``.

        Args:
            grad (Tensor): the gradient of the loss with respect to ``param``.
            param (Tensor): the parameter's current value.
            state (List[Tensor]): this transform's state for ``param``, as made by
                :meth:`init_state` or returned by the previous call.
            step (Tensor): 0-d integer tensor, the number of updates applied before this one.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement update()")

    @torch.jit.unused
    def update_blocked(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`update`, computed so that temporary memory stays bounded whatever the size of
        ``grad`` (a transform that builds whole-tensor intermediates overrides it with a
        blockwise version of the same maths). Eager only: kept out of TorchScript and export."""
        return self.update(grad, param, state, step)

    @torch.jit.unused
    def update_padded(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor, count: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`update` of a tensor zero-padded to a larger shape: ``grad``, ``param`` and
        every state tensor are a canonical view (see ``view_invariant``) with zeros appended
        along each axis, and ``count`` (0-d integer tensor) is the number of the unpadded
        tensor's elements. A ``paddable`` transform returns, on the unpadded coordinates, what
        :meth:`update` returns for the unpadded tensor (up to float rounding: sums taken over
        more terms), and zeros (direction and every new state) on the padding, so a padded
        state stays zero there. Eager and ``torch.compile`` only: kept out of TorchScript and
        export."""
        raise NotImplementedError(f"{type(self).__name__} cannot compute zero-padded tensors")

    def forward(self, grad: Tensor) -> Tensor:
        """The seed's call ``update = transform(grad)``: one step from the initial state."""
        step = torch.zeros((), dtype=torch.int64, device=grad.device)
        direction, _ = self.update(grad, grad, self.init_state(grad), step)
        return direction

    def state_names(self) -> List[str]:
        """Names of the state tensors, in the order of :meth:`init_state` (the state schema)."""
        return []

    def pointwise(self, rank: int) -> bool:
        """Whether, on parameters of ``rank``, each coordinate's direction and new state depend
        only on ``step`` and that coordinate of the gradient, the parameter and every state
        tensor (each of the parameter's shape): no statistic over the tensor, no matrix product.
        The update of rows ``a:b`` of a parameter is then rows ``a:b`` of its update, so a
        runtime may compute a large tensor a slice at a time (with temporaries of a slice's
        size). ``False`` unless a transform says so (true of Adam and SGD)."""
        return False

    def rules(self) -> Tuple[str, ...]:
        """The names of the update rules this transform can be routed to (see :meth:`routed`).

        ``"artifact"`` is the transform as it is configured; a transform with a harness (such
        as :class:`~compiledopt.learned.NormalizedMLP`) names more."""
        return ("artifact",)

    def routed(self, rule: str) -> "Transform":
        """The transform that applies ``rule`` (one of :meth:`rules`): ``self`` when ``rule`` is
        how this transform is already configured, else a copy sharing its weights.

        Parameter groups carry a *role* (``matrix``, ``vector``, ``embedding``, ``head``,
        ``input``) and each role a rule; the runtime asks its transform for the rule's variant
        once, when the optimizer is built. Raises ``ValueError`` naming an unknown rule."""
        if rule not in self.rules():
            raise ValueError(
                f"Invalid rule: {rule!r} ({type(self).__name__} has the rules {self.rules()})"
            )
        return self

    def cost(self, shape: Sequence[int], itemsize: int = 4) -> Cost:
        """FLOPs and bytes of one step on a parameter of ``shape`` (see :class:`Cost`).

        Every transform states its own cost model next to its update, so a roofline never reads
        an unknown rule as free; this base version raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} states no cost model (cost())")


class UpdateFunction(nn.Module):
    """Exposes ``transform.update`` as ``forward``.

    ``torch.export`` and ``torch.func.functional_call`` call ``forward``; this adapter lets them
    reach the explicit-state step without a second implementation of it.
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return self.transform.update(grad, param, state, step)
