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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["SIGNATURE_KEY", "Runner", "Signature", "Size", "parse_size"]

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
        """Read a stored signature; ``ValueError`` naming ``where`` if it is unreadable."""
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
        """The graph's flat outputs as ``(direction, new_state)`` or
        ``(directions, new_states)``."""
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
                expression = size if isinstance(size, int) else parse_size(size)
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
def parse_size(expression: str) -> Any:
    """A symbolic size as a sympy expression (``None`` if sympy cannot read it: not checked)."""
    import sympy

    try:
        return sympy.sympify(expression)
    except (sympy.SympifyError, TypeError, ValueError):
        return None
