"""How a FrozenOptimizer step runs an artifact: one strategy per artifact kind.

A strategy is chosen once, when the optimizer is built, and owns the artifact's runner:

* :class:`TensorStrategy` (``shape_agnostic`` artifacts): one rule call per parameter,
  ``rule(grad, param, state, step, seed) -> (direction, new_state)``, state in its storage dtype.
* :class:`ModelStrategy` (``bound`` artifacts): one call of the whole-model rule for every
  parameter bound to it, ``rule(grads, params, states, step) -> (directions, new_states)``.

Both expose the same methods: :meth:`~Strategy.initial_state`, :meth:`~Strategy.expected_state`
(the state's schema, to check a loaded state), :meth:`~Strategy.state_names` and
:meth:`~Strategy.compute`. State tensors are read and written by name, never by the order of the
state dict. ``compute`` only reads the optimizer's state: it returns every direction and new
state, and the optimizer checks them all before it writes any, so a step that fails leaves
nothing half-updated.
"""

import abc
import itertools
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt.export.artifact import Artifact
from compiledopt.export.rule import INDUCTOR_OPTIONS, ModelRule
from compiledopt.runtime.compiled import CompiledTensorRule
from compiledopt.runtime.rounding import round_state
from compiledopt.runtime.state import STEP, Expected
from compiledopt.transforms.base import Transform

__all__ = ["ModelStrategy", "Result", "Strategy", "TensorStrategy", "make_strategy"]

# Multipliers of the stochastic-rounding seed: parameter ``index`` at step ``t`` rounds with
# ``t * STEP_SEED + index * INDEX_SEED``, so every parameter and step draws different bits.
STEP_SEED = 1_000_003
INDEX_SEED = 7_919

State = Dict[str, Tensor]


class Result(NamedTuple):
    """One parameter's outcome of a step: its direction (in the compute dtype) and its new state
    (every entry of ``optimizer.state[param]``, ``step`` advanced)."""

    direction: Tensor
    state: State


class Strategy(abc.ABC):
    """The computation of a step, independent of param groups, learning rates and weight decay.

    Args:
        artifact (Artifact): the verified artifact.
        transforms (list of Transform): its eager transforms (one per binding, or the one shared).
        backend (str): the runtime backend (``"eager"``, ``"compiled"`` or an artifact backend).
        state_dtype (torch.dtype): storage dtype of the floating-point state.
    """

    def __init__(
        self,
        artifact: Artifact,
        transforms: List[Transform],
        backend: str,
        state_dtype: torch.dtype,
    ) -> None:
        self.artifact = artifact
        self.transforms = transforms
        self.backend = backend
        self.dtype = artifact.dtype
        self.state_dtype = state_dtype
        self._names: Dict[int, List[str]] = {}
        self._expected: Dict[Tuple[int, Tuple[int, ...]], Dict[str, Expected]] = {}

    def _transform(self, index: int) -> Transform:
        return self.transforms[0]

    def state_names(self, index: int, count: int) -> List[str]:
        """The names of parameter ``index``'s ``count`` state tensors, in the rule's order: the
        transform's :meth:`~Transform.state_names` (``state_{j}`` for a transform that names
        none). The state is read and written by these names, never by the dict's order (a
        checkpoint may list its keys in another order)."""
        transform = self._transform(index)
        names = self._names.get(id(transform))
        if names is None:
            names = self._names[id(transform)] = list(transform.state_names())
        return names or [f"state_{j}" for j in range(count)]

    def initial_state(self, index: int, param: Tensor) -> State:
        """The state of parameter ``index`` before its first step: ``step`` (0-d int64) and the
        rule's tensors by name, floating-point ones in the storage dtype."""
        transform = self._transform(index)
        with torch.no_grad():
            values = transform.init_state(param.detach().to(self.dtype))
        values = [v.to(self.state_dtype) if v.is_floating_point() else v for v in values]
        names = self.state_names(index, len(values))
        if len(names) != len(values):
            raise ValueError(
                f"{type(transform).__name__}.state_names() names {len(names)} state tensors, "
                f"its init_state returns {len(values)}"
            )
        state = {STEP: torch.zeros((), dtype=torch.int64)}
        state.update(zip(names, values))
        return state

    def expected_state(self, index: int, param: Tensor) -> Dict[str, Expected]:
        """The shape and storage dtype of each of parameter ``index``'s state tensors (``step``
        aside), found without allocating them (the rule's initial state on the ``meta``
        device), once per transform and parameter shape."""
        key = (id(self._transform(index)), tuple(param.shape))
        expected = self._expected.get(key)
        if expected is None:
            try:
                state = self.initial_state(index, torch.empty_like(param, device="meta"))
            except (RuntimeError, NotImplementedError):  # an init_state that reads values
                state = self.initial_state(index, param)
            expected = {k: Expected(tuple(v.shape), v.dtype) for k, v in state.items() if k != STEP}
            self._expected[key] = expected
        return expected

    def _read(self, index: int, state: State) -> Tuple[List[str], List[Tensor]]:
        """The names and tensors of a stored state, in the rule's order."""
        names = self.state_names(index, len(state) - 1)
        return names, [state[k] for k in names]

    def _computed(self, values: List[Tensor]) -> List[Tensor]:
        """Stored state tensors in the compute dtype."""
        return _upcast(values, self.dtype, self.state_dtype)

    def _advanced(self, state: State, values: List[Tensor], index: int) -> State:
        """``state``'s successor: the rule's new ``values`` (in the order of
        :meth:`state_names`) stored, rounded to the storage dtype, and the step count
        advanced."""
        names = self.state_names(index, len(values))
        stored = round_state(values, self.state_dtype, _seed(state[STEP], index))
        return {STEP: state[STEP] + 1, **dict(zip(names, stored))}

    @abc.abstractmethod
    def compute(
        self,
        params: Sequence[Tensor],
        active: Sequence[int],
        states: Sequence[State],
    ) -> Dict[int, Result]:
        """Directions and new states of the parameters ``active`` (indices into ``params``, which
        is every parameter of the optimizer in order; ``states[i]`` is parameter ``i``'s state,
        ``{}`` before its first step). Gradients are read from ``param.grad``; nothing is
        written."""


class TensorStrategy(Strategy):
    """A shape-agnostic rule called once per parameter with dynamic sizes.

    Every backend's rule is brought to one signature, ``rule(grad, param, state, step, seed) ->
    (direction, new_state)`` with the state in its storage dtype: the compiled backend converts
    and rounds a bfloat16 state inside its graph, the others through :class:`_StoredStateRule`.
    """

    def __init__(
        self, artifact: Artifact, transforms: List[Transform], backend: str, state_dtype
    ) -> None:
        super().__init__(artifact, transforms, backend, state_dtype)
        if backend == "compiled" and state_dtype != self.dtype:
            # Dynamic sizes: the same two or three graphs (matrices, small vectors, large
            # vectors) serve every parameter, so compile time does not grow with the model.
            self.rule: Callable = CompiledTensorRule(transforms[0], state_dtype=state_dtype)
            return
        if backend == "eager":
            rule: Callable = transforms[0].update
        elif backend == "compiled":
            rule = CompiledTensorRule(transforms[0])
        else:
            rule = artifact.runner(backend)
        self.rule = _StoredStateRule(rule, self.dtype, state_dtype)

    def compute(self, params, active, states):
        results: Dict[int, Result] = {}
        for i in active:
            p, state = params[i], states[i]
            keys, stored = self._read(i, state)
            step = state[STEP]
            direction, values = self.rule(
                p.grad.to(self.dtype), p.detach().to(self.dtype), stored, step, _seed(step, i)
            )
            results[i] = Result(direction, {STEP: step + 1, **dict(zip(keys, values))})
        return results


class _StoredStateRule:
    """A rule computing on compute-dtype state, called with state in its storage dtype: the state
    is converted up, the rule runs, the new state is rounded back (see rounding.py)."""

    def __init__(self, rule: Callable, dtype: torch.dtype, state_dtype: torch.dtype) -> None:
        self.rule = rule
        self.dtype = dtype
        self.state_dtype = state_dtype

    def __call__(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor, seed: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        state = _upcast(state, self.dtype, self.state_dtype)
        direction, new_state = self.rule(grad, param, state, step)
        return direction, round_state(list(new_state), self.state_dtype, seed)


class ModelStrategy(Strategy):
    """A bound rule: one call maps every bound parameter's gradient to its direction.

    The rule takes one step count for all parameters, so parameters whose counts differ (some
    missed steps) are computed in separate calls; parameters outside a call still feed the graph
    (a zero gradient and their state, or a throw-away initial state) and their results are
    discarded.
    """

    def __init__(
        self, artifact: Artifact, transforms: List[Transform], backend: str, state_dtype
    ) -> None:
        super().__init__(artifact, transforms, backend, state_dtype)
        self.counts = [
            len(t.init_state(torch.zeros(b["shape"], dtype=self.dtype)))
            for t, b in zip(transforms, artifact.bindings)
        ]
        if backend == "eager":
            self.rule: Callable = _EagerModelRule(transforms, self.counts)
        elif backend == "compiled":
            rule = ModelRule(transforms, self.counts, fused=True)
            self.rule = torch.compile(rule, fullgraph=True, options=dict(INDUCTOR_OPTIONS))
        else:
            self.rule = artifact.runner(backend)

    def _transform(self, index: int) -> Transform:
        return self.transforms[index]

    def compute(self, params, active, states):
        by_step: Dict[int, List[int]] = {}
        for i in active:
            by_step.setdefault(int(states[i][STEP]), []).append(i)
        results: Dict[int, Result] = {}
        for step, members in by_step.items():
            grads, values, counts = [], [], []
            for i, p in enumerate(params):
                _, stored = self._read(i, states[i] or self.initial_state(i, p))
                values.extend(self._computed(stored))
                counts.append(len(stored))
                grads.append((p.grad if p.grad is not None else torch.zeros_like(p)).to(self.dtype))
            inputs = [p.detach().to(self.dtype) for p in params]
            directions, new_values = self.rule(grads, inputs, values, torch.tensor(step))
            offsets = [0, *itertools.accumulate(counts)]
            for i in members:
                own = list(new_values[offsets[i] : offsets[i] + counts[i]])
                results[i] = Result(directions[i], self._advanced(states[i], own, i))
        return results


class _EagerModelRule:
    """The eager reference of a bound rule: one transform call per parameter."""

    def __init__(self, transforms: List[Transform], counts: List[int]) -> None:
        self.transforms = transforms
        self.counts = counts

    def __call__(self, grads, params, states, step) -> Tuple[List[Tensor], List[Tensor]]:
        directions, new_states, offset = [], [], 0
        for transform, grad, param, count in zip(self.transforms, grads, params, self.counts):
            direction, state = transform.update(grad, param, states[offset : offset + count], step)
            directions.append(direction)
            new_states.extend(state)
            offset += count
        return directions, new_states


def _upcast(values: List[Tensor], dtype: torch.dtype, state_dtype: torch.dtype) -> List[Tensor]:
    """State stored in ``state_dtype``, its floating-point tensors converted to ``dtype``."""
    if state_dtype == dtype:
        return values
    return [v.to(dtype) if v.is_floating_point() else v for v in values]


def _seed(step: Tensor, index: int) -> Tensor:
    """The stochastic-rounding seed of parameter ``index`` at ``step`` (see rounding.py)."""
    return step * STEP_SEED + index * INDEX_SEED


STRATEGIES = {"shape_agnostic": TensorStrategy, "bound": ModelStrategy}


def make_strategy(
    artifact: Artifact, backend: str, state_dtype: torch.dtype, transforms: List[Transform]
) -> Strategy:
    """The strategy of ``artifact``'s kind, running on ``backend``."""
    return STRATEGIES[artifact.kind](artifact, transforms, backend, state_dtype)
