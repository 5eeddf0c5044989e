"""The call signature of an exported rule, and the checks every call of a loaded graph passes.

A compiled graph reads its inputs' memory as the dtypes and sizes it was built for and checks
nothing itself: an AOTInductor package given a float64 state where it was built for float32
computes NaNs, a wrong size reads out of bounds, and onnxruntime's errors name graph internals.
So every exported graph stores its :class:`Signature` as JSON beside it (under
:data:`SIGNATURE_KEY`: AOTInductor package metadata, ONNX model metadata), and the runners that
:func:`compiledopt.export.backend.Backend.load` returns check each call against it (count,
dtype, device, rank, fixed sizes, sizes shared between inputs, and derived sizes such as
``prod(shape[1:])``), raising ``ValueError`` naming the input.
"""

import dataclasses
import functools
import json
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["SIGNATURE_KEY", "Expression", "Runner", "Signature", "Size", "parse_size"]

#: Key of the JSON signature in an AOTInductor package's and an ONNX model's metadata.
SIGNATURE_KEY = "compiledopt.signature"

#: A loaded rule: ``runner(grads, params, states, step) -> (directions, new_states)`` (bound) or
#: ``runner(grad, param, state, step) -> (direction, new_state)`` (per tensor).
Runner = Callable[..., Tuple[Any, List[Tensor]]]

#: A fixed size, or a symbolic size such as ``"s10"`` or ``"s10*s18*s2"``.
Size = Union[int, str]


@dataclasses.dataclass
class Signature:
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
        """The signature as one line of JSON (what the graph's metadata stores)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> "Signature":
        """Read a stored signature, checking every field's type and every size against the
        grammar of :func:`parse_size`; ``ValueError`` naming ``where`` if it is unreadable."""
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict) or set(fields) != {
                f.name for f in dataclasses.fields(cls)
            }:
                raise ValueError("not an object of the signature's fields")
            signature = cls(**fields)
            signature._validate()
        except (TypeError, ValueError, RecursionError) as error:
            raise ValueError(f"{where}: unreadable rule signature ({error})") from None
        return signature

    def _validate(self) -> None:
        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**6

        if not isinstance(self.tensor_rule, bool) or not count(self.directions):
            raise ValueError("tensor_rule must be a bool and directions a count")
        if not count(self.states):
            raise ValueError("states must be a count")
        inputs = len(self.input_names)
        for name, value in (("dtypes", self.dtypes), ("shapes", self.shapes)):
            if not isinstance(value, list) or len(value) != inputs:
                raise ValueError(f"{name} must be a list of {inputs} entries")
        for dtype, shape in zip(self.dtypes, self.shapes):
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not isinstance(shape, list) or len(shape) > 8:
                raise ValueError(f"invalid shape {shape!r}")
        assert self._plan is not None  # parses every size now: a bad one fails at load

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
        """The graph's flat outputs as ``(direction, new_state)`` or
        ``(directions, new_states)``."""
        directions = list(outputs[: self.directions])
        new_states = list(outputs[self.directions :])
        return (directions[0] if self.tensor_rule else directions), new_states

    @functools.cached_property
    def _plan(self) -> List[Tuple[torch.dtype, Optional[torch.Size], List[Tuple[str, Any]]]]:
        """Per input: its dtype, its shape if every size is fixed, and per dimension
        ``("fixed", size)``, ``("symbol", name)`` or ``("derived", expression)``; parsed once
        (``ValueError`` for a size that is not an integer or an expression of the grammar in
        :func:`parse_size`)."""
        plan = []
        for dtype, shape in zip(self.dtypes, self.shapes):
            dims: List[Tuple[str, Any]] = []
            for size in shape:
                expression = parse_size(size)
                if isinstance(expression, int):
                    dims.append(("fixed", expression))
                elif isinstance(expression, str):
                    dims.append(("symbol", expression))
                else:
                    dims.append(("derived", expression))
            static = None
            if all(kind == "fixed" for kind, _ in dims):
                static = torch.Size([size for _, size in dims])
            plan.append((_DTYPES[dtype], static, dims))
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
        for name, size, axis, text, expression in derived:
            if expression.symbols <= bound.keys():
                value = expression.evaluate(bound)
                if value != size:
                    raise ValueError(
                        f"input {name!r} has size {size} at dim {axis}; the other inputs make "
                        f"it {text} = {value}"
                    )


#: The dtypes a stored signature may name.
_DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "bfloat16", "int64")}
#: The tokens of a size expression: integers, symbols (``s12``), operators and parentheses.
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*()]))")
#: The longest size expression read (a rank-5 product of symbols is about 20 characters).
_MAX_EXPRESSION = 200


@dataclasses.dataclass(frozen=True)
class Expression:
    """A size computed from symbols: integers and symbols combined with ``+ - * //`` and
    parentheses, held as a tree of ``(operator, left, right)`` tuples (leaves: ``int`` or a
    symbol's name)."""

    tree: Any
    text: str

    @functools.cached_property
    def symbols(self) -> frozenset:
        """The names of the symbols it depends on."""

        def walk(node: Any) -> frozenset:
            if isinstance(node, tuple):
                return walk(node[1]) | walk(node[2])
            return frozenset([node]) if isinstance(node, str) else frozenset()

        return walk(self.tree)

    def evaluate(self, values: Dict[str, int]) -> int:
        """Its value with each symbol replaced by ``values[symbol]``."""

        def walk(node: Any) -> int:
            if isinstance(node, int):
                return node
            if isinstance(node, str):
                return values[node]
            operator, left, right = node
            a, b = walk(left), walk(right)
            if operator == "//":
                return a // b if b else -1  # never a valid size: the check reports it
            return {"+": a + b, "-": a - b, "*": a * b}[operator]

        return walk(self.tree)


def parse_size(size: Any) -> Union[int, str, Expression]:
    """A stored size read with a strict grammar: a non-negative ``int`` stays one; a string is
    a symbol's name (``"s10"``) or an :class:`Expression` of integers and symbols joined by
    ``+ - * //`` with parentheses (``"s10*s18*s2"``). Nothing is evaluated as code: anything
    else is a ``ValueError`` naming the size."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"Invalid size in a rule signature: {size!r} (an int or a string)")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"Invalid size in a rule signature: {size!r} (negative)")
        return size
    return _parse_expression(size)


@functools.lru_cache(maxsize=1024)
def _parse_expression(text: str) -> Union[int, str, Expression]:
    if len(text) > _MAX_EXPRESSION:
        raise ValueError(f"Invalid size in a rule signature: {text[:40]!r}... (too long)")
    tokens: List[str] = []
    position = 0
    while position < len(text.rstrip()):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(
                f"Invalid size in a rule signature: {text!r} (unexpected {text[position:]!r})"
            )
        assert match.lastindex is not None  # each alternative of _TOKEN is a group
        tokens.append(match.group(match.lastindex))
        position = match.end()
    parser = _Parser(tokens, text)
    tree = parser.expression(0)
    if parser.position != len(tokens):
        raise ValueError(f"Invalid size in a rule signature: {text!r}")
    if isinstance(tree, int) or (isinstance(tree, str)):
        return tree
    return Expression(tree, text)


class _Parser:
    """Recursive descent over the tokens of a size expression (depth-limited)."""

    def __init__(self, tokens: List[str], text: str) -> None:
        self.tokens, self.text, self.position = tokens, text, 0

    def _fail(self) -> ValueError:
        return ValueError(f"Invalid size in a rule signature: {self.text!r}")

    def _peek(self) -> Optional[str]:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def expression(self, depth: int) -> Any:
        node = self.term(depth)
        while self._peek() in ("+", "-"):
            operator = self.tokens[self.position]
            self.position += 1
            node = (operator, node, self.term(depth))
        return node

    def term(self, depth: int) -> Any:
        node = self.factor(depth)
        while self._peek() in ("*", "//"):
            operator = self.tokens[self.position]
            self.position += 1
            node = (operator, node, self.factor(depth))
        return node

    def factor(self, depth: int) -> Any:
        token = self._peek()
        if token is None or depth > 16:
            raise self._fail()
        self.position += 1
        if token == "(":
            node = self.expression(depth + 1)
            if self._peek() != ")":
                raise self._fail()
            self.position += 1
            return node
        if token.isdigit():
            return int(token)
        if token[0].isalpha() or token[0] == "_":
            return token
        raise self._fail()
