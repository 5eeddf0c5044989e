"""AOTInductor backend: a frozen update rule as a compiled ``.pt2`` package.

``save`` traces the rule with :func:`torch.export.export` and compiles it ahead of time with
:func:`torch._inductor.aoti_compile_and_package`; ``load`` opens the package with
:func:`torch._inductor.aoti_load_package` and returns a runner with the rule's own call signature:

* a :class:`~compiledopt.export.rule.ModelRule` (``dynamic=False``, static shapes):
  ``runner(grads, params, states, step) -> (directions, new_states)``;
* a :class:`~compiledopt.export.rule.TensorRule` (``dynamic=True``, one package per rank, every
  size of ``grad``, ``param`` and the state dynamic, ``step`` a static 0-d int64 tensor):
  ``runner(grad, param, state, step) -> (direction, new_state)``.

Building a package compiles C++ (about 20 s on two cores); running it needs no Python tracing.

Dynamic sizes: every dimension is exported as ``Dim.AUTO(min=1)`` with
``torch.fx.experimental._config.backed_size_oblivious`` on, so sizes of 1 are not specialised
(export's default hard-codes a size-1 example and assumes sizes ≥ 2 otherwise). Dimensions that
the rule itself fixes (``CoordinateLSTM``'s hidden width) become constants; state sizes derived
from the parameter's (``CoordinateMLP``'s ``prod(shape[1:])`` column accumulator,
``CoordinateLSTM``'s ``numel``) become expressions in the parameter's sizes. A gradient or
parameter size that the trace specialises anyway is reported with a warning.

Input checks: a compiled package reads its inputs' memory as the dtypes and sizes it was built
for and checks nothing (unless ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set when it first runs): a
float64 state given to a float32 package gives NaNs, a wrong size reads out of bounds. The
runner therefore checks every input against the signature stored in the package (dtype, rank,
fixed sizes, sizes shared between inputs and derived sizes such as ``prod(shape[1:])``) and
raises ``ValueError`` naming the input. The ONNX backend shares this signature and these checks.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from compiledopt.export.rule import INDUCTOR_OPTIONS

__all__ = ["load", "save"]

#: Key of the JSON signature in the package (and in the ONNX model's metadata).
SIGNATURE_KEY = "compiledopt.signature"

# Noise that torch emits on every export and that says nothing about the rule being exported
# (torch's own pytree deprecation, raised from inside torch.export).
_QUIET_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)

Runner = Callable[..., Tuple[Any, List[Tensor]]]
Size = Union[int, str]  # a fixed size, or a symbolic size such as "s10" or "s10*s18*s2"


@contextlib.contextmanager
def _quiet(levels: Optional[Dict[str, int]] = None) -> Iterator[None]:
    """Silence known-harmless chatter: each logger in ``levels`` raised to at least its level,
    and the warnings in :data:`_QUIET_WARNINGS`. Errors and every other warning pass through."""
    saved = []
    for name, level in (levels or {}).items():
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            for category, message in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@dataclasses.dataclass
class _Signature:
    """The call structure and inputs of an exported rule, stored next to its graph as JSON.

    Attributes:
        tensor_rule: ``(grad, param, state, step)`` (a ``TensorRule``) rather than
            ``(grads, params, states, step)`` (a ``ModelRule``).
        directions: how many directions the rule returns (1 for a ``TensorRule``).
        states: how many state tensors it takes and returns.
        dtypes: per flat input, the dtype name (``"float32"``).
        shapes: per flat input, its sizes: ints, or symbolic expressions in the sizes of other
            inputs (``"s10"``, ``"s10*s18*s2"``).
    """

    tensor_rule: bool
    directions: int
    states: int
    dtypes: List[str]
    shapes: List[List[Size]]

    @property
    def input_names(self) -> List[str]:
        """``grad, param, state_0.., step`` or ``grad_0.., param_0.., state_0.., step``."""
        state = [f"state_{i}" for i in range(self.states)]
        if self.tensor_rule:
            return ["grad", "param", *state, "step"]
        count = self.directions
        grads = [f"grad_{i}" for i in range(count)]
        return [*grads, *(f"param_{i}" for i in range(count)), *state, "step"]

    @property
    def output_names(self) -> List[str]:
        """``direction, new_state_0..`` or ``direction_0.., new_state_0..``."""
        new_state = [f"new_state_{i}" for i in range(self.states)]
        if self.tensor_rule:
            return ["direction", *new_state]
        return [*(f"direction_{i}" for i in range(self.directions)), *new_state]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> "_Signature":
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: unreadable rule signature ({error})") from error

    def flatten(self, grads: Any, params: Any, states: Any, step: Any) -> List[Tensor]:
        """The call's tensors in graph-input order, after checking them against the signature."""
        if self.tensor_rule:
            if not isinstance(grads, Tensor) or not isinstance(params, Tensor):
                raise ValueError("this graph takes (grad, param, state, step): tensors, not lists")
            head = [grads, params]
        else:
            for what, value in (("grads", grads), ("params", params)):
                if not isinstance(value, (list, tuple)) or len(value) != self.directions:
                    got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
                    raise ValueError(f"this graph takes {self.directions} {what}, got {got}")
            head = [*grads, *params]
        if not isinstance(states, (list, tuple)) or len(states) != self.states:
            got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"this graph takes {self.states} state tensors, got {got}")
        if not isinstance(step, Tensor) or step.dim() != 0:
            raise ValueError(f"step must be a 0-d tensor, got {step!r}")
        flat = [*head, *states, step]
        self._check(flat)
        return flat

    def unflatten(self, outputs: Sequence[Tensor]) -> Tuple[Any, List[Tensor]]:
        directions = list(outputs[: self.directions])
        new_states = list(outputs[self.directions :])
        return (directions[0] if self.tensor_rule else directions), new_states

    @functools.cached_property
    def _plan(self) -> List[Tuple[torch.dtype, Optional[torch.Size], List[Tuple[str, Any]]]]:
        """Per input: its dtype, its shape if every size is fixed, and per dimension
        ``("fixed", size)``, ``("symbol", name)``, ``("derived", (names, function))`` or
        ``("unchecked", None)``; parsed once."""
        import sympy

        plan = []
        for dtype, shape in zip(self.dtypes, self.shapes):
            dims: List[Tuple[str, Any]] = []
            for size in shape:
                expression = size if isinstance(size, int) else _parse(size)
                if isinstance(expression, int) or getattr(expression, "is_Integer", False):
                    dims.append(("fixed", int(expression)))
                elif expression is None:
                    dims.append(("unchecked", None))
                elif expression.is_Symbol:
                    dims.append(("symbol", str(expression)))
                else:
                    names = sorted(str(symbol) for symbol in expression.free_symbols)
                    symbols = [sympy.Symbol(name) for name in names]
                    function = sympy.lambdify(symbols, expression, modules="math")
                    dims.append(("derived", (names, function)))
            static = None
            if all(kind == "fixed" for kind, _ in dims):
                static = torch.Size([size for _, size in dims])
            plan.append((getattr(torch, dtype), static, dims))
        return plan

    def _check(self, flat: Sequence[Any]) -> None:
        bound: Dict[str, int] = {}
        derived = []
        for name, tensor, shape, (dtype, static, dims) in zip(
            self.input_names, flat, self.shapes, self._plan
        ):
            if not isinstance(tensor, Tensor):
                raise ValueError(f"input {name!r} must be a tensor, got {type(tensor).__name__}")
            if tensor.dtype != dtype:
                raise ValueError(
                    f"input {name!r} has dtype {tensor.dtype}; the graph takes {dtype}"
                )
            if tensor.device.type != "cpu":
                raise ValueError(f"input {name!r} is on {tensor.device}; this graph runs on CPU")
            if static is not None and tensor.shape == static:
                continue
            if tensor.dim() != len(dims):
                raise ValueError(
                    f"input {name!r} has shape {list(tensor.shape)}; the graph takes rank "
                    f"{len(dims)} ({shape})"
                )
            for axis, (size, (kind, expected)) in enumerate(zip(tensor.shape, dims)):
                if kind == "fixed" and size != expected:
                    raise ValueError(
                        f"input {name!r} has shape {list(tensor.shape)}; the graph takes "
                        f"{shape} (size {expected} at dim {axis})"
                    )
                if kind == "symbol" and bound.setdefault(expected, size) != size:
                    raise ValueError(
                        f"input {name!r} has size {size} at dim {axis}; the other inputs make "
                        f"it {expected} = {bound[expected]}"
                    )
                if kind == "derived":
                    derived.append((name, size, axis, shape[axis], expected))
        for name, size, axis, text, (names, function) in derived:
            if all(n in bound for n in names):
                value = int(function(*(bound[n] for n in names)))
                if value != size:
                    raise ValueError(
                        f"input {name!r} has size {size} at dim {axis}; the other inputs make "
                        f"it {text} = {value}"
                    )


@functools.cache
def _parse(expression: str) -> Any:
    """A symbolic size as a sympy expression (``None`` if sympy cannot read it: not checked)."""
    import sympy

    try:
        return sympy.sympify(expression)
    except (sympy.SympifyError, TypeError, ValueError):
        return None


def _is_tensor_rule(example: Sequence[Any]) -> bool:
    """``True`` for a ``TensorRule`` example ``(grad, param, state, step)``, ``False`` for a
    ``ModelRule`` example ``(grads, params, states, step)``; ``ValueError`` otherwise."""
    if not isinstance(example, (tuple, list)) or len(example) != 4:
        raise ValueError(
            "example must be (grads, params, states, step) or (grad, param, state, step), "
            f"got {type(example).__name__}"
            + (f" of length {len(example)}" if isinstance(example, (tuple, list)) else "")
        )
    first, second, state, step = example
    if not isinstance(step, Tensor) or step.dim() != 0:
        raise ValueError(f"example step must be a 0-d tensor, got {step!r}")
    if not isinstance(state, (list, tuple)) or not all(isinstance(s, Tensor) for s in state):
        raise ValueError("example state must be a list of tensors")
    if isinstance(first, Tensor) and isinstance(second, Tensor):
        return True
    for name, value in (("grads", first), ("params", second)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, Tensor) for t in value):
            raise ValueError(f"example {name} must be a tensor or a list of tensors")
    if len(first) != len(second):
        raise ValueError(f"example has {len(first)} gradients but {len(second)} parameters")
    return False


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone(memory_format=torch.contiguous_format)
    return [_copy(t) for t in value]


def _dims(value: Any) -> Any:
    """``Dim.AUTO(min=1)`` for every dimension of a tensor, or of each tensor of a list."""
    if isinstance(value, Tensor):
        return {i: Dim.AUTO(min=1) for i in range(value.dim())} or None
    return [_dims(t) for t in value]


def _trace(
    rule: nn.Module, example: Sequence[Any], dynamic: bool
) -> Tuple[ExportedProgram, Tuple[Any, ...], _Signature]:
    """Export ``rule`` at ``example`` (static shapes, or every size but ``step``'s dynamic).

    Returns the program, the example as traced, and the signature the runners check calls
    against. The example is traced as detached contiguous copies: export traces aliased inputs
    as one, so an example passing one tensor as both ``grad`` and ``param`` (as the seed's
    ``transform(grad)`` does) would otherwise give a graph that ignores one of them.
    """
    if not isinstance(rule, nn.Module):
        raise TypeError(f"rule must be an nn.Module, got {type(rule).__name__}")
    tensor_rule = _is_tensor_rule(example)
    args = tuple(_copy(value) for value in example)
    shapes = (_dims(args[0]), _dims(args[1]), _dims(args[2]), None) if dynamic else None
    training = rule.training
    rule.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if dynamic:
                stack.enter_context(fx_config.patch(backed_size_oblivious=True))
            program = torch.export.export(rule, args, dynamic_shapes=shapes, strict=False)
    finally:
        rule.train(training)

    inputs = [
        node.meta["val"]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    directions = 1 if tensor_rule else len(args[0])
    signature = _Signature(
        tensor_rule=tensor_rule,
        directions=directions,
        states=len(args[2]),
        dtypes=[str(value.dtype).removeprefix("torch.") for value in inputs],
        shapes=[[_size(d) for d in value.shape] for value in inputs],
    )
    outputs = len(program.graph_signature.user_outputs)
    if len(inputs) != len(signature.input_names) or outputs != directions + signature.states:
        raise RuntimeError(
            f"the exported graph has {len(inputs)} inputs and {outputs} outputs; the rule's "
            f"structure needs {len(signature.input_names)} and {directions + signature.states}"
        )
    if dynamic:
        _warn_specialised(signature)
    return program, args, signature


def _size(size: Any) -> Size:
    """A traced size: an int when fixed (also a symbolic size that is a known constant), else
    its symbolic expression."""
    if is_concrete_int(size):
        return int(size)
    return str(size)


def _warn_specialised(signature: _Signature) -> None:
    """Warn when a dynamic export hard-coded a size of a gradient or parameter."""
    count = 2 * signature.directions  # grads and params come first
    for name, shape in zip(signature.input_names[:count], signature.shapes[:count]):
        fixed = [f"dim {i} = {d}" for i, d in enumerate(shape) if isinstance(d, int)]
        if fixed:
            warnings.warn(
                f"dynamic export specialised input {name!r} (shape {shape}): "
                f"{', '.join(fixed)}; the graph serves only that size there",
                stacklevel=4,
            )


def save(rule: nn.Module, example: tuple, path: str, dynamic: bool) -> None:
    """Compile ``rule`` into an AOTInductor package at ``path`` (a ``.pt2`` file).

    Args:
        rule (nn.Module): a ``ModelRule`` (``example = (grads, params, states, step)``) or a
            ``TensorRule`` (``example = (grad, param, state, step)``).
        example (tuple): example inputs; their dtypes (and, with ``dynamic=False``, their
            shapes) are baked in.
        path (str): where to write the package; its folder must exist.
        dynamic (bool): every size of the gradients, parameters and states dynamic (``step``
            stays a static 0-d tensor); ``False`` fixes every shape to the example's.
    """
    from torch._inductor import aoti_compile_and_package

    with _quiet():
        program, _, signature = _trace(rule, example, dynamic)
        aoti_compile_and_package(
            program,
            package_path=os.fspath(path),
            inductor_configs={
                **INDUCTOR_OPTIONS,
                "aot_inductor.metadata": {SIGNATURE_KEY: signature.to_json()},
            },
        )


def load(path: str) -> Runner:
    """A runner for the package at ``path``, with the saved rule's call signature.

    Returns ``runner(grads, params, states, step) -> (directions, new_states)`` for a
    ``ModelRule`` and ``runner(grad, param, state, step) -> (direction, new_state)`` for a
    ``TensorRule``; CPU tensors of the exported dtypes in and out. A call whose tensors do not
    fit the package (count, dtype, rank or size) raises ``ValueError`` naming the input.
    """
    from torch._inductor import aoti_load_package

    with _quiet():
        model = aoti_load_package(os.fspath(path))
    metadata = model.get_metadata()
    if SIGNATURE_KEY not in metadata:
        raise ValueError(f"{path} is not a compiledopt update-rule package (no signature)")
    signature = _Signature.from_json(metadata[SIGNATURE_KEY], os.fspath(path))
    loader = model.loader

    def runner(grads: Any, params: Any, states: Any, step: Any) -> Tuple[Any, List[Tensor]]:
        flat = signature.flatten(grads, params, states, step)
        with torch.no_grad():
            # boxed_run takes the list's tensors over; the package reads them as contiguous.
            outputs = loader.boxed_run([t.detach().contiguous() for t in flat])
        return signature.unflatten(outputs)

    return runner
