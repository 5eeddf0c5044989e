"""Tracing a frozen rule with :func:`torch.export.export`, shared by the ONNX and AOTInductor
backends, and the quieting of known-harmless exporter chatter.

Dynamic sizes: every dimension is exported as ``Dim.AUTO(min=1)`` with
``torch.fx.experimental._config.backed_size_oblivious`` on, so sizes of 1 are not specialised
(export's default hard-codes a size-1 example and assumes sizes ≥ 2 otherwise). Dimensions that
the rule itself fixes (``CoordinateLSTM``'s hidden width) become constants; state sizes derived
from the parameter's (``CoordinateMLP``'s ``prod(shape[1:])`` column accumulator,
``CoordinateLSTM``'s ``numel``) become expressions in the parameter's sizes. A gradient or
parameter size that the trace specialises anyway is reported with a warning.
"""

import contextlib
import logging
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from compiledopt.export.signature import Signature, Size

__all__ = ["QUIET_WARNINGS", "is_tensor_rule", "quiet", "trace"]

#: Noise that torch emits on every export and that says nothing about the rule being exported
#: (torch's own pytree deprecation, raised from inside torch.export): ``(category, message)``.
QUIET_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)


@contextlib.contextmanager
def quiet(levels: Optional[Dict[str, int]] = None) -> Iterator[None]:
    """Silence known-harmless chatter: each logger in ``levels`` raised to at least its level,
    and the warnings in :data:`QUIET_WARNINGS`. Errors and every other warning pass through."""
    saved = []
    for name, level in (levels or {}).items():
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def is_tensor_rule(example: Sequence[Any]) -> bool:
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


def trace(
    rule: nn.Module, example: Sequence[Any], dynamic: bool
) -> Tuple[ExportedProgram, Tuple[Any, ...], Signature]:
    """Export ``rule`` at ``example`` (static shapes, or every size but ``step``'s dynamic).

    Args:
        rule: a ``ModelRule`` or a ``TensorRule`` (any module with their call structure).
        example: ``(grads, params, states, step)`` or ``(grad, param, state, step)``.
        dynamic: every size of the gradients, parameters and states dynamic; ``False`` fixes
            every shape to the example's.

    Returns:
        The program, the example as traced, and the signature the runners check calls against.
        The example is traced as detached contiguous copies: export traces aliased inputs as
        one, so an example passing one tensor as both ``grad`` and ``param`` (as the seed's
        ``transform(grad)`` does) would otherwise give a graph that ignores one of them.
    """
    if not isinstance(rule, nn.Module):
        raise TypeError(f"rule must be an nn.Module, got {type(rule).__name__}")
    tensor_rule = is_tensor_rule(example)
    args = tuple(_copy(value) for value in example)
    shapes = (_dims(args[0]), _dims(args[1]), _dims(args[2]), None) if dynamic else None
    training = rule.training
    rule.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if dynamic:
                # patch() is added to torch's config modules at import (install_config_module).
                patch = fx_config.patch  # type: ignore[attr-defined]
                stack.enter_context(patch(backed_size_oblivious=True))
            program = torch.export.export(rule, args, dynamic_shapes=shapes, strict=False)
    finally:
        rule.train(training)

    inputs = [
        node.meta["val"]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    directions = 1 if tensor_rule else len(args[0])
    signature = Signature(
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


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone(memory_format=torch.contiguous_format)
    return [_copy(t) for t in value]


def _dims(value: Any) -> Any:
    """``Dim.AUTO(min=1)`` for every dimension of a tensor, or of each tensor of a list."""
    if isinstance(value, Tensor):
        return {i: Dim.AUTO(min=1) for i in range(value.dim())} or None
    return [_dims(t) for t in value]


def _size(size: Any) -> Size:
    """A traced size: an int when fixed (also a symbolic size that is a known constant), else
    its symbolic expression."""
    if is_concrete_int(size):
        return int(size)
    return str(size)


def _warn_specialised(signature: Signature) -> None:
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
