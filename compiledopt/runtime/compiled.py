"""The compiled runner of shape-agnostic rules (the ``compiled`` backend).

:class:`CompiledTensorRule` compiles a shape-agnostic transform once with dynamic sizes and
calls it on every parameter: the number of graphs depends on the parameters' ranks, not on their
number or sizes, so every model (and every later model) reuses the same graphs.
"""

import contextlib
import math
import threading
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn

from compiledopt.export.rule import (
    INDUCTOR_OPTIONS,
    TensorRule,
    freeze_transform,
    inductor_configs,
)
from compiledopt.runtime.buckets import BatchedRule
from compiledopt.runtime.package_builder import BUILDER
from compiledopt.runtime.packages import PackagedCompile
from compiledopt.runtime.rounding import STATE_DTYPES, round_state
from compiledopt.transforms.base import Transform

__all__ = [
    "COMPILE_LOCK",
    "SMALL_VECTOR",
    "CompiledBatchedRule",
    "CompiledTensorRule",
    "LazyCompile",
    "PaddedRule",
    "StoredStateRule",
    "canonical_shape",
    "compiling",
]

#: Vectors (canonical rank 1) with fewer elements take the quicker-to-compile matmul formulation.
SMALL_VECTOR = 1 << 16
#: Held by every call of a compiled rule (:func:`compiling`): the settings it patches are global,
#: and a rule may compile in a background thread (see :mod:`~compiledopt.runtime.warming`).
COMPILE_LOCK = threading.RLock()
#: The compiled rules (graphs of one code object) a process may build, see :func:`compiling`.
RULES_PER_PROCESS = 512


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """The settings every call of a compiled rule runs (and is traced) under, one thread at a
    time (:data:`COMPILE_LOCK`).

    * Dynamic sizes without specialising sizes of 1, nor sizes that happen to be equal.
    * The rule's Python floats (decay rates, epsilons, timescales: constants of a frozen rule)
      specialised into the graph. Dynamo would otherwise make each float attribute a graph
      input read back as a symbolic float, which gains nothing for a frozen rule and breaks
      under ``torch.func.vmap``: a symbolic float added to a 0-d tensor of the mapped rule
      fails in Inductor's lowering ("x must be Tensor or scalar, got SymFloat"), as
      CoordinateMLP's per-tensor normaliser ``rsqrt(mean(x²) + norm_eps)`` does.
    * Room for many rules: every compiled rule of a process shares one code object (the rule
      module's ``forward``), and each frozen transform (its own weights and constants) is
      another entry in Dynamo's cache of it, so a process that builds more than Dynamo's default
      8 optimizers would otherwise fail with "recompile limit exceeded".

    Nested (a step that enters it once around all its rule calls, each of which enters it
    again), only the outermost sets and restores the settings.
    """
    # Set and restored attribute by attribute: the config modules' patch() builds a context
    # class at every call, a cost paid by every rule call of every step.
    with COMPILE_LOCK:
        if _DEPTH[0]:  # this thread holds the lock, so it set the settings: nothing to do
            _DEPTH[0] += 1
            try:
                yield
            finally:
                _DEPTH[0] -= 1
            return
        saved = [(module, name, getattr(module, name)) for module, name, _ in _SETTINGS]
        _DEPTH[0] = 1
        try:
            for module, name, value in _SETTINGS:
                setattr(module, name, value)
            yield
        finally:
            for module, name, value in reversed(saved):
                setattr(module, name, value)
            _DEPTH[0] = 0


#: How deep the thread that holds :data:`COMPILE_LOCK` is in :func:`compiling` (read and written
#: only under the lock).
_DEPTH = [0]


#: What :func:`compiling` sets: (config module, attribute, value).
_SETTINGS = (
    (fx_config, "backed_size_oblivious", True),
    (fx_config, "use_duck_shape", False),
    (dynamo_config, "specialize_float", True),
    (dynamo_config, "recompile_limit", RULES_PER_PROCESS),
    (dynamo_config, "accumulated_recompile_limit", 16 * RULES_PER_PROCESS),
)


def canonical_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The view a ``view_invariant`` transform is computed on: ``(numel,)`` for rank 0 and 1,
    ``(shape[0], prod(shape[1:]))`` for rank ≥ 2."""
    if len(shape) <= 1:
        return (math.prod(shape),)
    return (int(shape[0]), math.prod(shape[1:]))


class LazyCompile:
    """``torch.compile(module, fullgraph=True, dynamic=True)`` with the rules' Inductor options,
    made at the first call: building a compiled callable imports Dynamo and Inductor (half a
    second in a fresh process), which a rule that answers eagerly until its compile is due
    (:mod:`~compiledopt.runtime.warming`) must not pay at its first step.

    Each graph is kept on this machine as a package (:mod:`~compiledopt.runtime.packages`):
    a later process loads it in milliseconds instead of compiling again. ``torch.compile``
    itself runs only for what cannot be packaged."""

    def __init__(self, module: nn.Module, what: str = "a compiled rule") -> None:
        self.module = module
        self._compiled: Optional[Callable] = None
        self.packaged = PackagedCompile(module, self._compile, INDUCTOR_OPTIONS, what)

    def __call__(self, *args: Any) -> Any:
        return self.packaged(*args)

    def stored(self, *args: Any) -> bool:
        """Whether a stored package serves this call (see
        :meth:`~compiledopt.runtime.packages.PackagedCompile.stored`)."""
        return self.packaged.stored(*args)

    def prebuild(self, *args: Any) -> None:
        """Note that this call found no package: built in a background process for later runs
        (:mod:`~compiledopt.runtime.package_builder`)."""
        BUILDER.request(self.module, args, INDUCTOR_OPTIONS, self.packaged.what)

    def _compile(self, *args: Any) -> Any:
        if self._compiled is None:
            self._compiled = torch.compile(
                self.module,
                fullgraph=True,
                dynamic=True,
                options=inductor_configs(INDUCTOR_OPTIONS),
            )
        return self._compiled(*args)


class CompiledTensorRule:
    """``torch.compile`` of a frozen shape-agnostic transform, called once per parameter.

    Sizes are dynamic (sizes of 1 included: they are not specialised), so one graph serves every
    parameter of a given rank. A ``view_invariant`` transform is moreover computed on each
    parameter's :func:`canonical_shape` (state tensors of the parameter's shape are viewed alike),
    so it needs at most three graphs whatever the model: matrices and vectors of at least
    :data:`SMALL_VECTOR` elements run the fused formulation, smaller vectors (biases, norm
    weights: well under 1% of a model's coordinates) the matmul formulation, whose graph compiles
    in a third of the time (15 s instead of 40 s on two cores) at a similar per-call cost. A
    typical model (no vector that large) compiles two graphs. One-element parameters run the
    same matmul formulation uncompiled: its compiled graph assumes at least two rows (a size-1
    stride special case in Inductor's lowering), and a recompile for them would cost more than
    they ever will.

    ``rule(grad, param, state, step) -> (direction, new_state)``, shapes as given.

    With ``state_dtype=torch.bfloat16`` the state is given and returned in bfloat16 and the graph
    itself converts it to the rule's dtype and stochastically rounds the new state
    (:func:`compiledopt.runtime.rounding.round_state`, seed ``seed``):
    ``rule(grad, param, state, step, seed)``.
    """

    def __init__(self, transform: Transform, state_dtype: Optional[torch.dtype] = None) -> None:
        if not transform.shape_agnostic:
            raise ValueError(f"{type(transform).__name__} is shape-bound: compile a ModelRule")
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None or one of {STATE_DTYPES})"
            )
        self.state_dtype = state_dtype
        self.view = bool(getattr(transform, "view_invariant", False))
        self.compiled = LazyCompile(self._wrap(TensorRule(transform, fused=True)))
        # The matmul formulation: compiled for small vectors, eager for one-element tensors
        # (used by a view-invariant transform only).
        self.single = self._wrap(TensorRule(transform, fused=False))
        self.small = LazyCompile(self.single)

    def _wrap(self, rule: nn.Module) -> nn.Module:
        return rule if self.state_dtype is None else StoredStateRule(rule, self.state_dtype)

    def kind(self, grad: Tensor, param: Tensor, state: List[Tensor], *_: Tensor) -> tuple:
        """The graph a call needs: its formulation and rank, and the dtypes and ranks it sees
        (calls of one kind share a graph, whatever their sizes)."""
        view = canonical_shape(param.shape) if self.view else tuple(param.shape)
        if self.view and len(view) == 1:
            form = "vector" if view[0] >= SMALL_VECTOR else "small vector" if view[0] > 1 else "one"
        else:
            form = f"rank {len(view)}"
        return form, grad.dtype, tuple((s.dtype, s.shape == param.shape) for s in state)

    def __call__(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor, *seed: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        if len(seed) != (self.state_dtype is not None):
            raise TypeError(
                "a rounding seed is " + ("required" if self.state_dtype else "not accepted")
            )
        compiled, args, restore = self._route(grad, param, state, step, *seed)
        with compiling():
            direction, new_state = compiled(*args)
        return restore(direction, new_state)

    def stored(self, grad: Tensor, param: Tensor, state: List[Tensor], *rest: Tensor) -> bool:
        """Whether a stored package serves this call (nothing compiled or built)."""
        compiled, args, _ = self._route(grad, param, state, *rest)
        if not isinstance(compiled, LazyCompile):
            return False
        with compiling():
            return compiled.stored(*args)

    def prebuild(self, grad: Tensor, param: Tensor, state: List[Tensor], *rest: Tensor) -> None:
        """Have this call's package built in the background (see :class:`LazyCompile`)."""
        compiled, args, _ = self._route(grad, param, state, *rest)
        if isinstance(compiled, LazyCompile):
            compiled.prebuild(*args)

    def _route(self, grad: Tensor, param: Tensor, state: List[Tensor], *rest: Tensor):
        """The callable a call runs, its arguments, and what turns its results back into the
        parameter's shape."""
        shape = param.shape
        viewed = [s.shape == shape for s in state] if self.view else []
        compiled: Callable = self.compiled
        if self.view:
            view = canonical_shape(shape)
            if len(view) == 1 and view[0] < SMALL_VECTOR:
                compiled = self.small if view[0] > 1 else self.single
            # detach(): a reshaped tensor is a view, and Dynamo guards on a view's base (its
            # shape and strides), which would compile a graph per base shape.
            grad, param = grad.reshape(view).detach(), param.reshape(view).detach()
            state = [s.reshape(view).detach() if same else s for s, same in zip(state, viewed)]

        def restore(direction: Tensor, new_state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
            if self.view:
                direction = direction.reshape(shape)
                new_state = [s.reshape(shape) if same else s for s, same in zip(new_state, viewed)]
            return direction, list(new_state)

        return compiled, (grad, param, state, *rest), restore


class StoredStateRule(nn.Module):
    """A rule computing on state in the gradient's dtype, called with the state in its storage
    dtype ``state_dtype``: the state is converted up on the way in and the new state rounded
    back on the way out (stochastically for bfloat16, see
    :func:`~compiledopt.runtime.rounding.round_state`; nothing to do when the dtypes agree), in
    the same graph when compiled.

    ``forward(grad, param, state, step, seed) -> (direction, new_state)``; ``rule(grad, param,
    state, step)`` is any callable: a transform's ``update``, a module, an artifact's runner.
    With ``sides`` (the sides of the unpadded view of a zero-padded tensor, 1-d int64),
    ``rule(grad, param, state, step, count)``, a transform's ``update_padded`` told the unpadded
    element count, and the new state rounds as the unpadded one would.
    """

    def __init__(self, rule, state_dtype: torch.dtype) -> None:
        super().__init__()
        self.rule = rule
        self.state_dtype = state_dtype

    def forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: List[Tensor],
        step: Tensor,
        seed: Tensor,
        sides: Optional[Tensor] = None,
    ) -> Tuple[Tensor, List[Tensor]]:
        state = [s.to(grad.dtype) if s.is_floating_point() else s for s in state]
        if sides is None:
            direction, new_state = self.rule(grad, param, state, step)
        else:
            direction, new_state = self.rule(grad, param, state, step, sides.prod())
        return direction, round_state(list(new_state), self.state_dtype, seed, sides)

    def stored(self, grad: Tensor, param: Tensor, state: List[Tensor], *rest: Tensor) -> bool:
        """Whether the wrapped rule has a stored package for this call (see
        :class:`CompiledTensorRule`); ``False`` for a rule without packages or a state
        converted on the way in."""
        stored = getattr(self.rule, "stored", None)
        if stored is None or any(s.dtype != grad.dtype for s in state if s.is_floating_point()):
            return False
        return stored(grad, param, state, rest[0])

    def prebuild(self, grad: Tensor, param: Tensor, state: List[Tensor], *rest: Tensor) -> None:
        """Have the wrapped rule's package for this call built in the background."""
        prebuild = getattr(self.rule, "prebuild", None)
        if prebuild is not None and all(
            s.dtype == grad.dtype for s in state if s.is_floating_point()
        ):
            prebuild(grad, param, state, rest[0])


class CompiledBatchedRule:
    """``torch.compile`` of a frozen shape-agnostic transform mapped over a batch of same-shape
    tensors (:class:`~compiledopt.runtime.buckets.BatchedRule`), with dynamic sizes: one graph
    per computed rank serves every bucket of every model.

    ``rule(grads, params, states, step, seeds) -> (directions, new_states, finite)``, the state
    in ``state_dtype`` (converted and rounded inside the graph), ``finite`` a flag per member
    (:func:`~compiledopt.runtime.buckets.finite_rows`, taken in the graph). With ``padded``,
    members are zero-padded to a common shape and the rule is the transform's
    ``update_padded``: ``rule(grads, params, states, step, seeds, sides)``, ``sides[j]`` the
    sides of member ``j``'s own computed shape.
    """

    def __init__(
        self, transform: Transform, state_dtype: torch.dtype, padded: bool = False
    ) -> None:
        inner: nn.Module = (
            PaddedRule(transform, fused=True) if padded else TensorRule(transform, fused=True)
        )
        self.padded = padded
        self.compiled = LazyCompile(BatchedRule(StoredStateRule(inner, state_dtype)))

    def kind(self, grads: Tensor, params: Tensor, states: List[Tensor], *_: Tensor) -> tuple:
        """The graph a call needs: the batch's rank and the dtypes and ranks it sees."""
        return (
            f"{'padded ' if self.padded else ''}batch of rank {params.dim() - 1}",
            grads.dtype,
            tuple((s.dtype, s.dim()) for s in states),
        )

    def __call__(
        self,
        grads: Tensor,
        params: Tensor,
        states: List[Tensor],
        step: Tensor,
        seeds: Tensor,
        *sides: Tensor,
    ) -> Tuple[Tensor, List[Tensor], Tensor]:
        with compiling():
            directions, new_states, finite = self.compiled(
                grads, params, states, step, seeds, *sides
            )
        return directions, list(new_states), finite

    def stored(self, *args: Tensor) -> bool:
        """Whether a stored package serves this call (nothing compiled or built)."""
        with compiling():
            return self.compiled.stored(*args)

    def prebuild(self, *args: Tensor) -> None:
        """Have this call's package built in the background (see :class:`LazyCompile`)."""
        self.compiled.prebuild(*args)


class PaddedRule(nn.Module):
    """A frozen paddable transform on one zero-padded tensor:
    ``forward(grad, param, state, step, count)`` is its ``update_padded``."""

    def __init__(self, transform: Transform, fused: bool = False) -> None:
        super().__init__()
        if not transform.paddable:
            raise ValueError(f"{type(transform).__name__} cannot compute zero-padded tensors")
        self.transform = freeze_transform(transform, fused)
        self.eval()

    def forward(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor, count: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return self.transform.update_padded(grad, param, state, step, count)
