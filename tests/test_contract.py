"""The transform contract, checked for every registry entry at every supported rank.

Each test compares a path (TorchScript, ``torch.compile``, ``torch.export``, another memory format)
against the eager module it was made from, in float64 (atol 1e-6, rtol 1e-5), over two steps with
the state carried from one step to the next, so recurrent entries are checked with a non-zero state.
"""

import functools
import importlib
import inspect
import pkgutil
import typing
import warnings
from typing import Callable, Dict, List, Sequence, Set, Tuple

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from registry import REGISTRY, REGISTRY_IDS, SHAPES, Entry, example_param
from torch import Tensor, nn

import compiledopt
from compiledopt.transforms import Transform, UpdateFunction

DTYPE = torch.float64
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
RANKS = sorted(SHAPES)
INDUCTOR_RANKS = (2, 4)  # every entry; the other ranks run with a cheap backend
SLOW_INDUCTOR_RANKS = (0, 1)
CHEAP_BACKEND = "aot_eager"  # dynamo + AOTAutograd tracing, no code generation
STEPS = 2

Trajectory = List[Tuple[Tensor, List[Tensor]]]
UpdateFn = Callable[[Tensor, Tensor, List[Tensor], Tensor], Tuple[Tensor, List[Tensor]]]

by_entry = pytest.mark.parametrize("entry", REGISTRY, ids=REGISTRY_IDS)
by_rank = pytest.mark.parametrize("rank", RANKS, ids=[f"rank{r}" for r in RANKS])

# --------------------------------------------------------------------------------------------
# Shared helpers and artifacts
# --------------------------------------------------------------------------------------------


def _entry(name: str) -> Entry:
    return REGISTRY[REGISTRY_IDS.index(name)]


@functools.cache
def _built(name: str, rank: int) -> Tuple[Tensor, Transform]:
    """The registry's parameter and transform for ``rank`` (built once; tests never mutate it)."""
    param = example_param(rank, DTYPE)
    return param, _entry(name).build(param)


@functools.cache
def _scripted(name: str, rank: int) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of :func:`_built`'s transform, shared by every TorchScript test."""
    _, transform = _built(name, rank)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        return torch.jit.script(transform)


def _grads(shape: Sequence[int], count: int = STEPS, seed: int = 1) -> List[Tensor]:
    """Distinct, reproducible float64 gradients of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=generator, dtype=DTYPE) for _ in range(count)]


def _step(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _trajectory(
    update: UpdateFn, param: Tensor, state: List[Tensor], grads: Sequence[Tensor]
) -> Trajectory:
    """``(direction, new_state)`` of each step, the state carried and the step count a tensor."""
    out: Trajectory = []
    step = _step(0)
    for grad in grads:
        direction, state = update(grad, param, state, step)
        state = list(state)
        out.append((direction, state))
        step = step + 1
    return out


def _assert_trajectories_close(actual: Trajectory, expected: Trajectory) -> None:
    assert len(actual) == len(expected)
    for k, ((direction, state), (ref_direction, ref_state)) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            direction, ref_direction, **TOLERANCE, msg=lambda m, k=k: f"step {k}: direction: {m}"
        )
        assert len(state) == len(ref_state), f"step {k}: {len(state)} != {len(ref_state)} states"
        for i, (s, ref) in enumerate(zip(state, ref_state)):
            torch.testing.assert_close(
                s, ref, **TOLERANCE, msg=lambda m, k=k, i=i: f"step {k}: state[{i}]: {m}"
            )


def _eager_trajectory(transform: Transform, param: Tensor, grads: Sequence[Tensor]) -> Trajectory:
    return _trajectory(transform.update, param, transform.init_state(param), grads)


def _is_shape_bound(name: str) -> bool:
    """Whether the entry's transform is bound to one parameter shape (``shape_agnostic`` False).

    Only such a transform can reject a wrong gradient in the one-argument ``transform(grad)``;
    a shape-agnostic one compares the gradient with ``param``, which ``forward`` does not have.
    """
    return not _built(name, 2)[1].shape_agnostic


def _script_cases() -> List:
    return [
        pytest.param(entry, rank, id=f"{entry.name}-rank{rank}")
        for entry in REGISTRY
        for rank in RANKS
    ]


# --------------------------------------------------------------------------------------------
# 1. TorchScript
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "rank"), _script_cases())
def test_script_matches_eager(entry: Entry, rank: int) -> None:
    param, transform = _built(entry.name, rank)
    scripted = _scripted(entry.name, rank)
    grads = _grads(param.shape)

    torch.testing.assert_close(scripted.init_state(param), transform.init_state(param))
    actual = _trajectory(scripted.update, param, scripted.init_state(param), grads)
    _assert_trajectories_close(actual, _eager_trajectory(transform, param, grads))
    for grad in grads:
        torch.testing.assert_close(scripted(grad), transform(grad), **TOLERANCE)


# --------------------------------------------------------------------------------------------
# 2. torch.compile: fullgraph, equal to eager, no recompile on the second step
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Dynamo caches compiled frames per code object; start and end each compile test clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_compiled(name: str, rank: int, backend: str) -> None:
    """Compile ``update`` and ``forward`` with ``backend``; two calls each, one graph each.

    Runs without autograd, as a frozen optimizer step does: with grad enabled a recurrent entry's
    carried state requires grad from step 2 on, and Dynamo (correctly) guards on that.
    """
    param, transform = _built(name, rank)
    grads = _grads(param.shape)

    def update(grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor):
        return transform.update(grad, param, state, step)

    def forward(grad: Tensor) -> Tensor:
        return transform(grad)

    update_counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    forward_counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled_update = torch.compile(update, backend=update_counter, fullgraph=True)
    compiled_forward = torch.compile(forward, backend=forward_counter, fullgraph=True)

    with torch.no_grad():
        expected = _eager_trajectory(transform, param, grads)
        expected_forward = [transform(grad) for grad in grads]

        state = transform.init_state(param)
        step = _step(0)
        first = compiled_update(grads[0], param, state, step)
        first_forward = compiled_forward(grads[0])
        compiled = (update_counter.frame_count, forward_counter.frame_count)
        # A fresh gradient, the new state and an incremented step must reuse the graph.
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = compiled_update(grads[1], param, first[1], step + 1)
            second_forward = compiled_forward(grads[1])

    # Counted per backend call: a restarted analysis of the first frame (Dynamo does this at
    # rank 0 with AOTAutograd) calls the backend twice without being a recompile.
    assert min(compiled) >= 1, f"nothing compiled: {compiled}"
    recompiled = (update_counter.frame_count, forward_counter.frame_count)
    assert recompiled == compiled, f"second call recompiled: graphs {compiled} -> {recompiled}"
    for fn in (update, forward):
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)
        assert len(entries) == 1, f"{fn.__name__}: {len(entries)} compiled entries"
    actual = [(first[0], list(first[1])), (second[0], list(second[1]))]
    _assert_trajectories_close(actual, expected)
    torch.testing.assert_close([first_forward, second_forward], expected_forward, **TOLERANCE)


@by_entry
@by_rank
def test_compile_fullgraph_no_recompile(entry: Entry, rank: int, fresh_dynamo) -> None:
    _check_compiled(entry.name, rank, CHEAP_BACKEND)


@by_entry
@pytest.mark.parametrize(
    "rank",
    [
        *(pytest.param(r, id=f"rank{r}") for r in INDUCTOR_RANKS),
        # The element-wise paths (scalar, bias): two more Inductor compiles per entry.
        *(pytest.param(r, id=f"rank{r}", marks=pytest.mark.slow) for r in SLOW_INDUCTOR_RANKS),
    ],
)
def test_compile_inductor(entry: Entry, rank: int, fresh_dynamo) -> None:
    if entry.name == "celo2":  # its Inductor graphs take minutes: compiled in test_celo2.py
        pytest.skip("celo2's compiled backend is checked against eager in test_celo2.py")
    _check_compiled(entry.name, rank, "inductor")


# --------------------------------------------------------------------------------------------
# 3. torch.export
# --------------------------------------------------------------------------------------------


@by_entry
@by_rank
def test_export_matches_eager(entry: Entry, rank: int) -> None:
    param, transform = _built(entry.name, rank)
    grads = _grads(param.shape)
    state = transform.init_state(param)

    program = torch.export.export(UpdateFunction(transform), (grads[0], param, state, _step(0)))
    exported = program.module()
    actual = _trajectory(exported, param, transform.init_state(param), grads)
    _assert_trajectories_close(actual, _eager_trajectory(transform, param, grads))

    forward = torch.export.export(transform, (grads[0],)).module()
    for grad in grads:
        torch.testing.assert_close(forward(grad), transform(grad), **TOLERANCE)


# --------------------------------------------------------------------------------------------
# 4. State schema and purity
# --------------------------------------------------------------------------------------------


@by_entry
@by_rank
def test_state_keeps_shapes_and_dtypes(entry: Entry, rank: int) -> None:
    param, transform = _built(entry.name, rank)
    init = transform.init_state(param)
    names = transform.state_names()
    assert len(names) == len(init), f"state_names() {names} for {len(init)} state tensors"
    assert len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names)

    grads = _grads(param.shape)
    grads_before = [g.clone() for g in grads]
    state = init
    step = _step(0)
    for k, grad in enumerate(grads):
        state_before = [s.detach().clone() for s in state]
        direction, new_state = transform.update(grad, param, state, step)
        assert direction.shape == grad.shape and direction.dtype == grad.dtype, f"step {k}"
        assert [(s.shape, s.dtype, s.device) for s in new_state] == [
            (s.shape, s.dtype, s.device) for s in init
        ], f"step {k}: state layout changed"
        # update() is functional: it reads its inputs and never writes them.
        torch.testing.assert_close(state, state_before, atol=0, rtol=0)
        state, step = new_state, step + 1
    torch.testing.assert_close(grads, grads_before, atol=0, rtol=0)


@by_entry
@by_rank
def test_forward_is_first_update_step(entry: Entry, rank: int) -> None:
    """The seed's ``transform(grad)`` is one step from the initial state, not a second rule."""
    _, transform = _built(entry.name, rank)
    for grad in _grads(SHAPES[rank]):
        expected, _ = transform.update(grad, grad, transform.init_state(grad), _step(0))
        torch.testing.assert_close(transform(grad), expected, **TOLERANCE)


@by_entry
@pytest.mark.parametrize("rank", [1, 2, 3], ids=["rank1", "rank2", "rank3"])
def test_a_pointwise_rule_computes_rows_apart(entry: Entry, rank: int) -> None:
    """A transform that says it is pointwise at a rank (so exported graphs may run a large
    tensor in slices of rows) gives rows ``a:b`` of a tensor's update from rows ``a:b`` alone,
    over several steps with its state carried, whatever the other rows hold."""
    param, transform = _built(entry.name, rank)
    if not transform.pointwise(rank):
        assert not entry.name.startswith(("adam", "sgd")), "Adam and SGD are pointwise"
        return
    generator = torch.Generator().manual_seed(3)
    shape = (7, *param.shape[1:])
    whole = torch.randn(shape, generator=generator, dtype=DTYPE)
    rows = slice(2, 5)
    state, part_state = transform.init_state(whole), None
    for k, grad in enumerate(_grads(shape)):
        if part_state is None:
            part_state = [s[rows] for s in state]
        direction, state = transform.update(grad, whole, state, _step(k))
        part, part_state = transform.update(grad[rows], whole[rows], part_state, _step(k))
        torch.testing.assert_close(part, direction[rows], atol=0, rtol=0)
        for got, want in zip(part_state, state):
            torch.testing.assert_close(got, want[rows], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# 5. Every transform, layer and factory in the package has a registry entry
# --------------------------------------------------------------------------------------------

FACTORY_NAMES = ("KroneckerTransform", "MetaCurvatureTransform", "ModuleTransform")


def _import_package() -> None:
    for info in pkgutil.walk_packages(compiledopt.__path__, prefix="compiledopt."):
        importlib.import_module(info.name)


def _subclasses(cls: type) -> Set[type]:
    found: Set[type] = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _subclasses(sub)
    return found


def _is_factory_class(obj: object) -> bool:
    """A class, not a module, whose instances map a parameter to a :class:`Transform`."""
    if not inspect.isclass(obj) or issubclass(obj, nn.Module) or "__call__" not in vars(obj):
        return False
    returns = typing.get_type_hints(obj.__call__).get("return")
    return inspect.isclass(returns) and issubclass(returns, Transform)


def _factory_class(factory: object) -> type:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory if inspect.isclass(factory) else type(factory)


def test_registry_covers_every_transform() -> None:
    _import_package()
    transforms = {
        cls
        for cls in _subclasses(Transform)
        if cls.__module__.startswith("compiledopt.") and cls is not Transform
    }
    layers = {
        obj
        for obj in (getattr(compiledopt.nn, n) for n in compiledopt.nn.__all__)
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
    }
    exported = [getattr(compiledopt.optim, n) for n in compiledopt.optim.__all__]
    factories = {getattr(compiledopt.optim, n) for n in FACTORY_NAMES}
    factories |= {obj for obj in exported if _is_factory_class(obj)}

    # The walk itself must see what exists today, or this test checks nothing.
    assert {t.__name__ for t in transforms} >= {
        "KroneckerUpdate",
        "MetaCurvatureTransform",
        "ReshapedTransform",
    }
    assert {t.__name__ for t in layers} >= {"KroneckerLSTM", "KroneckerLinear", "KroneckerRNN"}

    built_types: Set[type] = set()
    factory_types: Set[type] = set()
    for entry in REGISTRY:
        factory_types.add(_factory_class(entry.factory))
        for rank in RANKS:
            built = entry.build(example_param(rank, DTYPE))
            assert isinstance(built, Transform), f"{entry.name} built {type(built).__name__}"
            built_types |= {type(module) for module in built.modules()}

    def names(classes: Set[type]) -> List[str]:
        return sorted(f"{c.__module__}.{c.__qualname__}" for c in classes)

    missing = {
        "transforms": names(transforms - built_types),
        "Kronecker layers": names(layers - built_types),
        "factories": names(factories - factory_types),
    }
    assert not any(missing.values()), f"no registry entry exercises: {missing}"


# --------------------------------------------------------------------------------------------
# 6. A wrong-shape gradient raises ValueError naming the shape
# --------------------------------------------------------------------------------------------


def _bad_shapes(rank: int) -> Dict[str, Tuple[int, ...]]:
    shape = SHAPES[rank]
    return {
        "same_numel": (*shape, 1),  # a reshape alone would silently accept it
        "other_numel": (2, *shape),
    }


def _wrong_shape_cases(scripted: bool) -> List:
    """``(entry, path, bad, rank)`` for every entry, call path, kind of bad shape and rank."""
    cases = []
    for entry in REGISTRY:
        # forward(grad) has no parameter to compare with unless the transform is shape-bound.
        paths = ("update", "forward") if _is_shape_bound(entry.name) else ("update",)
        for path in paths:
            for bad in ("same_numel", "other_numel"):
                for rank in RANKS:
                    name = f"{entry.name}-{path}-{bad}-rank{rank}"
                    cases.append(pytest.param(entry, path, bad, rank, id=name))
    return cases


def _names_shape(message: str, shape: Tuple[int, ...]) -> bool:
    return str(list(shape)) in message or str(tuple(shape)) in message


def _call(transform: nn.Module, path: str, grad: Tensor, param: Tensor, state: List[Tensor]):
    if path == "update":
        return transform.update(grad, param, state, _step(0))
    return transform(grad)


@pytest.mark.parametrize(("entry", "path", "bad", "rank"), _wrong_shape_cases(scripted=False))
def test_wrong_shape_raises(entry: Entry, path: str, bad: str, rank: int) -> None:
    param, transform = _built(entry.name, rank)
    shape = _bad_shapes(rank)[bad]
    grad = torch.ones(shape, dtype=DTYPE)
    with pytest.raises(ValueError) as raised:
        _call(transform, path, grad, param, transform.init_state(param))
    assert _names_shape(str(raised.value), shape), str(raised.value)


@pytest.mark.parametrize(("entry", "path", "bad", "rank"), _wrong_shape_cases(scripted=True))
def test_wrong_shape_raises_scripted(entry: Entry, path: str, bad: str, rank: int) -> None:
    param, _ = _built(entry.name, rank)
    scripted = _scripted(entry.name, rank)
    shape = _bad_shapes(rank)[bad]
    grad = torch.ones(shape, dtype=DTYPE)
    # TorchScript re-raises as torch.jit.Error, with the original exception in its text.
    with pytest.raises(torch.jit.Error) as raised:
        _call(scripted, path, grad, param, scripted.init_state(param))
    message = str(raised.value)
    assert "ValueError" in message and _names_shape(message, shape), message


# --------------------------------------------------------------------------------------------
# 7. Memory format: a channels_last gradient gives the contiguous gradient's direction
# --------------------------------------------------------------------------------------------

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@by_entry
@pytest.mark.parametrize("rank", sorted(CHANNELS_LAST), ids=[f"rank{r}" for r in CHANNELS_LAST])
def test_channels_last_gradient(entry: Entry, rank: int) -> None:
    param, transform = _built(entry.name, rank)
    grads = _grads(param.shape)
    channels_last = [g.to(memory_format=CHANNELS_LAST[rank]) for g in grads]
    assert not any(g.is_contiguous() for g in channels_last)  # the case under test is real

    expected = _eager_trajectory(transform, param, grads)
    _assert_trajectories_close(_eager_trajectory(transform, param, channels_last), expected)
    for grad, other in zip(grads, channels_last):
        torch.testing.assert_close(transform(other), transform(grad), **TOLERANCE)
    scripted = _scripted(entry.name, rank)
    actual = _trajectory(scripted.update, param, scripted.init_state(param), channels_last)
    _assert_trajectories_close(actual, expected)
