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
import contextlib
import copy
import functools
import itertools
from typing import Callable, Dict, FrozenSet, List, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt.export.artifact import Artifact
from compiledopt.runtime.bucket_store import BucketStore
from compiledopt.runtime.buckets import MAX_MEMBER, Bucket, plan
from compiledopt.runtime.builtins import BUILT_INS, TensorRules, pads
from compiledopt.runtime.compiled import StoredStateRule, canonical_shape, compiling
from compiledopt.runtime.computed import Computed, Result, State
from compiledopt.runtime.distributed import is_distributed, run_rule
from compiledopt.runtime.rounding import round_state
from compiledopt.runtime.slices import SLICE_ELEMENTS, RowSlices
from compiledopt.runtime.state import STEP, Expected, check_batch, check_result
from compiledopt.runtime.timings import compile_key
from compiledopt.runtime.warming import EagerClock
from compiledopt.transforms.base import Transform

__all__ = ["Computed", "ModelStrategy", "Result", "Strategy", "TensorStrategy", "make_strategy"]

# Multipliers of the stochastic-rounding seed: parameter ``index`` at step ``t`` rounds with
# ``t * STEP_SEED + index * INDEX_SEED``, so every parameter and step draws different bits.
STEP_SEED = 1_000_003
INDEX_SEED = 7_919

#: The most elements of one tensor kind in one batched call of a tensor strategy, per built-in
#: backend (:data:`~compiledopt.runtime.builtins.BUILT_INS`). The exported graphs (one tensor per
#: call) are not batched.
MAX_ELEMENTS = {name: b.max_elements for name, b in BUILT_INS.items()}


class Strategy(abc.ABC):
    """The computation of a step, independent of param groups, learning rates and weight decay.

    Args:
        artifact (Artifact): the verified artifact.
        transforms (list of Transform): its eager transforms (one per binding, or the one shared).
        backend (str): the runtime backend (``"eager"``, ``"compiled"`` or an artifact backend).
        state_dtype (torch.dtype): storage dtype of the floating-point state.
        background (bool): compile in the background, the eager rule answering until then
            (:class:`~compiledopt.runtime.warming.Warming`; shape-agnostic rules).
    """

    def __init__(
        self,
        artifact: Artifact,
        transforms: List[Transform],
        backend: str,
        state_dtype: torch.dtype,
        background: bool = False,
    ) -> None:
        self.artifact = artifact
        self.background = background
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
        labels: Sequence[str],
    ) -> Computed:
        """Directions and new states of the parameters ``active`` (indices into ``params``, which
        is every parameter of the optimizer in order; ``states[i]`` is parameter ``i``'s state,
        ``{}`` before its first step), checked against the state they replace
        (``ValueError`` naming ``labels[i]``), with the tensors whose finiteness decides the
        step. Gradients are read from ``param.grad``; nothing is written."""


class TensorStrategy(Strategy):
    """A shape-agnostic rule called once per bucket of small parameters (of one shape, or of
    nearby shapes zero-padded to one for a paddable rule) and once per larger parameter, with
    dynamic sizes (see :mod:`~compiledopt.runtime.buckets`).

    Every backend's rule is brought to one signature, ``rule(grad, param, state, step, seed) ->
    (direction, new_state)`` with the state in its storage dtype: the compiled backend converts
    and rounds a bfloat16 state inside its graph, the others through
    :class:`~compiledopt.runtime.compiled.StoredStateRule`. The eager and compiled backends run
    on the parameters' device (the transform is copied there once per device) and batch small
    parameters with ``torch.func.vmap``, each bucket's stacks kept between steps
    (:class:`~compiledopt.runtime.bucket_store.BucketStore`); the exported graphs run on the CPU,
    one parameter at a time.
    """

    def __init__(self, artifact, transforms, backend, state_dtype, background=False) -> None:
        super().__init__(artifact, transforms, backend, state_dtype, background)
        self.view = bool(getattr(transforms[0], "view_invariant", False))
        self.max_elements = MAX_ELEMENTS.get(backend, 0)
        # Buckets of different shapes, zero-padded to one (the built-in backends, a paddable rule).
        self.pad = backend in BUILT_INS and pads(transforms[0])
        self._devices: Dict[torch.device, TensorRules] = {}
        # Per parameter shape: its computed shape and the other state shapes (see _key).
        self._shapes: Dict[torch.Size, Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]] = {}
        # Per bucket of the last step: its stacked tensors (see bucket_store).
        self._stores: Dict[Tuple[int, ...], BucketStore] = {}
        # Exported graphs compute small parameters of one size whose rule is pointwise as one
        # flat vector (the rank-1 graph), where the state is stored as computed (no rounding).
        self.flat = (
            backend not in BUILT_INS
            and state_dtype == self.dtype
            and transforms[0].pointwise(1)
            and 1 in artifact.manifest.get("ranks", [])
        )
        self._flat_shapes: Dict[torch.Size, bool] = {}
        if backend not in BUILT_INS:  # exported graphs run on the CPU: load them now
            self.rules(torch.device("cpu"))

    def rules(self, device: torch.device) -> TensorRules:
        """The callables that compute on ``device`` (built at its first use)."""
        rules = self._devices.get(device)
        if rules is None:
            rules = self._devices[device] = self._build(device)
        return rules

    def _build(self, device: torch.device) -> TensorRules:
        transform = self.transforms[0]
        if device.type != "cpu":
            transform = copy.deepcopy(transform).to(device)
        built_in = BUILT_INS.get(self.backend)
        if built_in is not None:
            clock = None
            if self.background:  # the patience of this rule here (see runtime.warming)
                clock = EagerClock(key=compile_key(self.artifact, transform, device))
            return built_in.tensor_rules(transform, self.dtype, self.state_dtype, clock)
        # Where the rule is pointwise, a large tensor goes through the graph in slices of rows.
        runner = RowSlices(self.artifact.runner(self.backend), transform)
        return TensorRules(StoredStateRule(runner, self.state_dtype), None)

    def _key(self, param: Tensor, step: int):
        """What parameters computed in one bucket share (see :func:`buckets.plan`), or ``None``
        for one computed on its own: the computed shape, the device, the step count and the
        shapes of the state tensors not of the parameter's shape (those are computed on its
        view). The state shapes are the rule's for the parameter's shape (the optimizer checks
        every state against them before it steps), found once per shape."""
        if self.max_elements == 0 or is_distributed(param):
            return None
        shape = param.shape
        found = self._shapes.get(shape)
        if found is None:
            view = canonical_shape(shape) if self.view else tuple(shape)
            expected = self.expected_state(0, param).values()
            others = tuple(e.shape for e in expected if e.shape != tuple(shape))
            found = self._shapes[shape] = (view, others)
        view, others = found
        if others and self.pad:  # a padded rule keeps every state in its parameter's shape
            return None
        return view, (param.device, step, others)

    def compute(self, params, active, states, labels):
        computed = Computed({}, [], [])
        # A parameter without elements has nothing for the rule to compute (and its reductions,
        # a maximum, a mean, no element to reduce): it steps as torch.optim's optimizers step
        # one, its state kept and its count advanced.
        for i in active:
            if params[i].numel() == 0:
                direction = torch.zeros_like(params[i], dtype=self.dtype)  # a DTensor's too
                computed.results[i] = Result(direction, {**states[i], STEP: states[i][STEP] + 1})
        active = [i for i in active if params[i].numel() > 0]
        steps = {i: int(states[i][STEP]) for i in active}
        # An exported graph's buckets are of one shape, each one flat vector (see _flat).
        key = self._flat_key if self.flat else self._key
        most = SLICE_ELEMENTS if self.flat else self.max_elements
        member = SLICE_ELEMENTS if self.flat else MAX_MEMBER
        buckets = plan(params, active, lambda i: key(params[i], steps[i]), most, self.pad, member)
        previous, self._stores = self._stores, {}
        # The compiled backend's settings set once for all its calls (a warming rule, whose
        # compile may hold them in the background, takes them call by call).
        settings = compiling() if self.backend == "compiled" and not self.background else None
        with settings or contextlib.nullcontext():
            for bucket in buckets:
                if bucket.view is None:
                    self._single(bucket.members[0], params, states, labels, computed)
                elif self.flat:
                    self._flat(bucket.members, params, states, labels, computed)
                else:
                    self._batched(bucket, params, states, labels, computed, previous)
        return computed

    def _flat_key(self, param: Tensor, step: int):
        """What parameters computed as one flat vector share (see :meth:`_flat`), in
        :func:`~compiledopt.runtime.buckets.plan`'s form, or ``None``: a CPU parameter of rank
        ≥ 1 whose rule is pointwise at its rank, every state tensor of its shape."""
        shape = param.shape
        fits = self._flat_shapes.get(shape)
        if fits is None:
            fits = self._flat_shapes[shape] = (
                param.dim() > 0
                and self.transforms[0].pointwise(param.dim())
                and all(e.shape == tuple(shape) for e in self.expected_state(0, param).values())
            )
        if not fits or param.device.type != "cpu" or is_distributed(param):
            return None
        grad = param.grad
        assert grad is not None  # an active parameter has a gradient
        return tuple(shape), (step, param.dtype, grad.dtype)

    def _flat(self, members: Tuple[int, ...], params, states, labels, computed) -> None:
        """One call of the rank-1 graph for ``members`` (parameters of one shape and step
        count whose rule is pointwise) stacked as one flat vector: the same values as a call
        each."""
        first = members[0]
        keys, _ = self._read(first, states[first])
        grads = torch.stack([params[i].grad for i in members]).to(self.dtype)
        inputs = torch.stack([params[i].detach() for i in members]).to(self.dtype)
        stored = [torch.stack([states[i][k] for i in members]) for k in keys]
        step = states[first][STEP]
        flat = [s.view(-1) for s in stored]
        rule = self.rules(params[first].device).single
        direction, values = rule(grads.view(-1), inputs.view(-1), flat, step, _seed(step, first))
        check_batch(direction, grads.view(-1), values, flat, keys, labels[first])
        directions = direction.view(grads.shape)
        rows = [v.view(grads.shape) for v in values]
        # Each member's direction, state and step count are rows of these (unbind: one call
        # for all rows, as the buckets' step counts are rows of one buffer).
        counts = (step + 1).expand(len(members)).clone()
        for i, count, direction_row, *state_rows in zip(
            members, counts.unbind(0), directions.unbind(0), *(r.unbind(0) for r in rows)
        ):
            state = dict(zip(keys, state_rows))
            state[STEP] = count
            computed.results[i] = Result(direction_row, state)
        computed.add(grads, members, "gradient")
        computed.add(directions, members, "direction")
        computed.add_state(members, dict(zip(keys, rows)))

    def _single(self, i: int, params, states, labels, computed: "Computed") -> None:
        p, state = params[i], states[i]
        keys, stored = self._read(i, state)
        step = state[STEP]
        rule = self.rules(p.device).single
        # A DTensor parameter is computed over its whole logical tensor (see run_rule).
        direction, values = run_rule(
            rule, p.grad.to(self.dtype), p.detach().to(self.dtype), stored, step, _seed(step, i)
        )
        new_state = {STEP: step + 1, **dict(zip(keys, values))}
        check_result(p, state, direction, new_state, labels[i])
        computed.results[i] = Result(direction, new_state)
        computed.add(p.grad, (i,), "gradient")
        computed.add(direction, (i,), "direction")
        computed.add_state((i,), new_state)

    def _batched(
        self, bucket: Bucket, params, states, labels, computed: "Computed", previous
    ) -> None:
        """One rule call for the bucket's stacked members, on the stacks it kept from the last
        step (``previous``, by members) where they still fit (see
        :class:`~compiledopt.runtime.bucket_store.BucketStore`); members of different shapes
        are zero-padded to the bucket's."""
        members, view = bucket.members, bucket.view
        assert view is not None  # only a batched bucket (a view for its members) comes here
        first = members[0]
        keys, _ = self._read(first, states[first])
        shapes = tuple(params[i].shape for i in members)
        own = bucket.padded or (view,) * len(members)
        device = params[first].device
        signature = (view, tuple(own), shapes, self.dtype, device)
        store = previous.get(members)
        if store is None or not store.fits(signature, keys):
            store = BucketStore(members, view, own, shapes, keys, states[first], self.dtype, device)
        self._stores[members] = store
        rules = self.rules(device)
        rule, sides = (
            (rules.batched, ()) if bucket.padded is None else (rules.padded, (store.sides,))
        )
        if rule is None:
            raise RuntimeError("this backend's rules have no batched form, yet a bucket batched")
        grads, stored = store.load([params[i].grad for i in members], [states[i] for i in members])
        # The parameters stacked apart from the gradients even for a rule that does not read
        # them: a compiled graph guards on its inputs not aliasing each other.
        inputs = store.load_params([params[i].detach() for i in members])
        step = states[first][STEP]
        directions, values, finite = rule(
            grads, inputs, stored, step, _seed(step, store.indices), *sides
        )
        check_batch(directions, grads, values, stored, keys, labels[first])
        store.directions.copy_(directions)
        for j, i in enumerate(members):
            computed.results[i] = Result(store.direction_rows[j], store.results[j])
        computed.commits.append((members, functools.partial(store.commit, list(values))))
        # The rule's own flags, each member's tensors named for a message should one fail.
        named = [(grads, "gradient"), (directions, "direction")]
        named += [(v, f"new state {k!r}") for k, v in zip(keys, values) if v.is_floating_point()]
        computed.add(finite, members, tuple(named))


class ModelStrategy(Strategy):
    """A bound rule: one call maps every bound parameter's gradient to its direction.

    The rule takes one step count for all parameters, so parameters whose counts differ (some
    missed steps) are computed in separate calls; parameters outside a call still feed the graph
    (a zero gradient and their state, or a throw-away initial state) and their results are
    discarded.

    Zero-element parameters the artifact does not bind (:attr:`unbound`, by index; no bound
    family but a per-element one can be built for one) step as a shape-agnostic rule steps
    them: nothing to compute, the count advanced, no other state.
    """

    def __init__(self, artifact, transforms, backend, state_dtype, background=False) -> None:
        super().__init__(artifact, transforms, backend, state_dtype)  # compiles when first used
        self.counts = [
            len(t.init_state(torch.zeros(b["shape"], dtype=self.dtype)))
            for t, b in zip(transforms, artifact.bindings)
        ]
        self._devices: Dict[torch.device, Callable] = {}
        self.unbound: FrozenSet[int] = frozenset()

    def rule(self, device: torch.device) -> Callable:
        """The whole-model rule computing on ``device`` (built at its first use)."""
        rule = self._devices.get(device)
        if rule is None:
            rule = self._devices[device] = self._build(device)
        return rule

    def _build(self, device: torch.device) -> Callable:
        transforms = self.transforms
        if device.type != "cpu":
            transforms = [copy.deepcopy(t).to(device) for t in transforms]
        built_in = BUILT_INS.get(self.backend)
        if built_in is not None:
            return built_in.model_rule(transforms, self.counts)
        return self.artifact.runner(self.backend)

    def _transform(self, index: int) -> Transform:
        return self.transforms[index - sum(1 for i in self.unbound if i < index)]

    def initial_state(self, index: int, param: Tensor) -> State:
        if index in self.unbound:
            return {STEP: torch.zeros((), dtype=torch.int64)}
        return super().initial_state(index, param)

    def expected_state(self, index: int, param: Tensor) -> Dict[str, Expected]:
        return {} if index in self.unbound else super().expected_state(index, param)

    def compute(self, params, active, states, labels):
        by_step: Dict[int, List[int]] = {}
        computed = Computed({}, [], [])
        for i in active:
            if i in self.unbound:
                direction = torch.zeros_like(params[i], dtype=self.dtype)
                computed.results[i] = Result(direction, {**states[i], STEP: states[i][STEP] + 1})
            else:
                by_step.setdefault(int(states[i][STEP]), []).append(i)
        bound = [i for i in range(len(params)) if i not in self.unbound]
        position = {i: b for b, i in enumerate(bound)}
        rule = self.rule(params[0].device)
        for step, members in by_step.items():
            grads, values, counts = [], [], []
            for i in bound:
                p = params[i]
                _, stored = self._read(i, states[i] or self.initial_state(i, p))
                values.extend(self._computed(stored))
                counts.append(len(stored))
                grads.append((p.grad if p.grad is not None else torch.zeros_like(p)).to(self.dtype))
            inputs = [params[i].detach().to(self.dtype) for i in bound]
            directions, new_values = rule(grads, inputs, values, torch.tensor(step))
            offsets = [0, *itertools.accumulate(counts)]
            for i in members:
                b = position[i]
                own = list(new_values[offsets[b] : offsets[b] + counts[b]])
                result = Result(directions[b], self._advanced(states[i], own, i))
                check_result(params[i], states[i], *result, labels[i])
                computed.results[i] = result
                computed.add(params[i].grad, (i,), "gradient")
                computed.add(result.direction, (i,), "direction")
                computed.add_state((i,), result.state)
        return computed


def _upcast(values: List[Tensor], dtype: torch.dtype, state_dtype: torch.dtype) -> List[Tensor]:
    """State stored in ``state_dtype``, its floating-point tensors converted to ``dtype``."""
    if state_dtype == dtype:
        return values
    return [v.to(dtype) if v.is_floating_point() else v for v in values]


def _seed(step: Tensor, index: "int | Tensor") -> Tensor:
    """The stochastic-rounding seed of parameter ``index`` at ``step`` (see rounding.py); a
    tensor of indices gives a seed per index."""
    return step * STEP_SEED + index * INDEX_SEED


STRATEGIES = {"shape_agnostic": TensorStrategy, "bound": ModelStrategy}


def make_strategy(
    artifact: Artifact,
    backend: str,
    state_dtype: torch.dtype,
    transforms: List[Transform],
    background: bool = False,
    unbound: FrozenSet[int] = frozenset(),
) -> Strategy:
    """The strategy of ``artifact``'s kind, running on ``backend`` (see :class:`Strategy`),
    leaving ``unbound`` out of a bound artifact's bindings (see :class:`ModelStrategy`)."""
    strategy = STRATEGIES[artifact.kind](artifact, transforms, backend, state_dtype, background)
    if isinstance(strategy, ModelStrategy):
        strategy.unbound = unbound
    return strategy
