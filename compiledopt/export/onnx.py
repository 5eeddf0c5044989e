"""ONNX backend: a frozen update rule as a self-contained ``.onnx`` graph run by onnxruntime.

``save`` traces the rule with :func:`torch.export.export` (the same trace as the AOTInductor
backend, see :mod:`compiledopt.export.tracing` for how dynamic sizes are handled), converts it with
``torch.onnx.export(..., dynamo=True)``, checks it with :func:`onnx.checker.check_model` and
writes one file with the weights embedded. ``load`` opens it in an
:class:`onnxruntime.InferenceSession` (``CPUExecutionProvider``) and returns a runner with the
rule's own call signature:

* a :class:`~compiledopt.export.rule.ModelRule`: ``runner(grads, params, states, step) ->
  (directions, new_states)``; graph inputs ``grad_0.., param_0.., state_0.., step``, outputs
  ``direction_0.., new_state_0..``;
* a :class:`~compiledopt.export.rule.TensorRule` (one graph per rank, every size dynamic):
  ``runner(grad, param, state, step) -> (direction, new_state)``; inputs
  ``grad, param, state_0.., step``, outputs ``direction, new_state_0..``.

The graph keeps the exported dtypes (float32 or float64; ``step`` is int64); the runner takes and
returns CPU torch tensors and checks each call against the rule's signature, stored in the model's
metadata (``compiledopt.signature``, see :mod:`compiledopt.export.signature`).

Two exporter defects (torch 2.13, onnxscript 0.7) are worked around here rather than shipped:

* ``optimize=True`` runs onnxscript's rewrite rules, whose no-op patterns match constants with a
  tolerance: ``x + c`` with ``|c| <= 1e-8`` and ``x * c`` with ``c`` within 1e-5 of 1 are
  replaced by ``x``. Adam's ``+ eps`` (1e-8) and ``CoordinateMLP``'s ``+ eps`` vanish, and a
  zero gradient then gives NaN instead of 0. Only the exact passes run (:func:`_exact_optimize`).
* torchlib builds the Python-float constants of ``aten.scalar_tensor`` and ``aten.pow.Scalar``
  in float32 and casts them, so a float64 graph computes with float32-rounded ``β``, ``ε`` …
  (Adam's direction off by 7e-6 relative). :func:`_translations` builds them in their dtype.
"""

import logging
import os
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from compiledopt.export.backend import Backend
from compiledopt.export.signature import SIGNATURE_KEY, Runner, Signature
from compiledopt.export.tracing import quiet, trace

# onnx, onnx_ir, onnxscript and onnxruntime are imported inside the functions that write or run
# a graph, so that the package and its other backends work without them installed.

__all__ = ["BACKEND", "ONNXBackend", "check_self_contained", "load", "load_bytes", "save"]

# Exporter chatter: onnxscript's and onnx_ir's per-pass INFO logs, and the registry's
# "torchvision is not installed. Skipping torchvision::nms" notices (WARNING level). Other
# warnings and all errors still come through.
_CHATTY_LOGGERS = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


def _translations() -> Dict[Any, Callable]:
    """Exact constants: the exporter's custom translations of ``aten.scalar_tensor`` and
    ``aten.pow.Scalar``.

    torchlib (onnxscript 0.7) lowers ``aten.scalar_tensor(s, dtype=float64)`` and
    ``aten.pow.Scalar(s, x)`` by making ``s`` a float32 constant and casting it, so every Python
    float of a float64 rule (β = 0.999, ε, time scales…) is rounded to float32 (relative error up
    to 6e-8, 1e-5 after ``1 − β``). These translations make the constant in its final dtype.
    """
    import numpy as np
    import onnx_ir as ir
    from onnxscript.onnx_opset import opset18
    from onnxscript.onnx_types import TensorType

    # onnxscript's opset signatures type the values of its script compiler, not the traced
    # values (and onnx_ir tensors) that a custom translation handles.
    op: Any = opset18

    def _scalar_tensor(
        s: float, dtype: int = 1, layout: str = "", device: str = "", pin_memory: bool = False
    ) -> TensorType:
        data_type = ir.DataType(1 if dtype == -1 else dtype)
        return op.Constant(value=ir.tensor(np.asarray(s, dtype=data_type.numpy())))

    def _pow_scalar(self: float, exponent: TensorType) -> TensorType:
        if isinstance(self, int) or exponent.dtype.is_floating_point():
            base = ir.tensor(np.asarray(self, dtype=exponent.dtype.numpy()))
            return op.Pow(op.Constant(value=base), exponent)
        # A float base and an integral exponent: torch computes in the default dtype (float32).
        base = ir.tensor(np.asarray(self, dtype=np.float32))
        return op.Pow(op.Constant(value=base), op.Cast(exponent, to=ir.DataType.FLOAT))

    return {
        torch.ops.aten.scalar_tensor.default: _scalar_tensor,
        torch.ops.aten.pow.Scalar: _pow_scalar,
    }


def _exact_optimize(model: Any) -> None:
    """The value-preserving part of the exporter's ``optimize=True``: inline functions, fold
    constants, drop unused nodes (``model``: an ``onnx_ir.Model``).

    The rest of it, onnxscript's pattern rewrites, is left out on purpose: its no-op rules match
    constants with a tolerance (``math.isclose(c, 0, abs_tol=1e-8)``, ``rel_tol=1e-5`` near 1),
    so ``x + 1e-8`` becomes ``x`` and Adam's ``sqrt(v) + eps`` divides by zero where a gradient
    is zero. onnxruntime applies its own (exact) graph optimizations when it loads the file.
    """
    import onnxscript.optimizer

    onnxscript.optimizer.inline(model)
    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)


def _strip_node_metadata(model: Any) -> None:
    """Drop the exporter's per-node metadata and doc strings in ``model`` (an ``onnx_ir.Model``),
    in every subgraph too: the Python stack trace, FX node and module path of each node, which
    name files of the exporting machine and were four fifths of a graph's bytes. The graph's
    computation and the model's own metadata (its signature) are untouched."""
    from onnx_ir import traversal

    for node in traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None


def _name_io(model: Any, inputs: List[str], outputs: List[str]) -> None:
    """Name the graph's inputs and outputs of ``model`` (an ``onnx_ir.Model``), renaming any
    inner value that holds one of those names, after making every output a value of its own.

    A rule can return an input unchanged (``SGD`` returns the gradient) or one value twice
    (``SGD`` with momentum returns the buffer as the direction and as the new state); ONNX
    needs an ``Identity`` for each, or naming the output would rename the input too.
    """
    import onnx_ir.passes.common

    graph = model.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise RuntimeError(
            f"the ONNX graph has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
            f"the rule has {len(inputs)} and {len(outputs)}"
        )
    onnx_ir.passes.common.OutputFixPass()(model)
    wanted = set(inputs) | set(outputs)
    io = {id(v) for v in [*graph.inputs, *graph.outputs]}
    inner = [*graph.initializers.values()]
    for node in graph:
        inner.extend(node.outputs)
    for value in inner:
        if id(value) not in io and value.name in wanted:
            value.name = f"{value.name}_inner"
    for value, name in zip([*graph.inputs, *graph.outputs], [*inputs, *outputs]):
        value.name = name


def save(rule: nn.Module, example: tuple, path: str, dynamic: bool) -> None:
    """Export ``rule`` to a self-contained ONNX file at ``path``.

    Args:
        rule (nn.Module): a ``ModelRule`` (``example = (grads, params, states, step)``) or a
            ``TensorRule`` (``example = (grad, param, state, step)``).
        example (tuple): example inputs; their dtypes (and, with ``dynamic=False``, their
            shapes) are baked in.
        path (str): the ``.onnx`` file to write; its folder must exist.
        dynamic (bool): every size of the gradients, parameters and states dynamic (``step``
            stays a static 0-d tensor); ``False`` fixes every shape to the example's.
    """
    import onnx
    import onnx_ir as ir

    with quiet(_CHATTY_LOGGERS):
        program, args, signature = trace(rule, example, dynamic)
        onnx_program = torch.onnx.export(
            program,
            args,
            dynamo=True,
            verbose=False,
            external_data=False,
            optimize=False,  # see _exact_optimize
            custom_translation_table=_translations(),
        )
        if onnx_program is None:  # only the TorchScript exporter, writing to a file, returns None
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
        model = onnx_program.model
        _exact_optimize(model)
        _strip_node_metadata(model)
        _name_io(model, signature.input_names, signature.output_names)
        model.metadata_props[SIGNATURE_KEY] = signature.to_json()
        # Serialised here rather than by ONNXProgram.save, so the weights are always embedded.
        proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, os.fspath(path), save_as_external_data=False)


def load(path: str) -> Runner:
    """A runner for the ONNX graph at ``path``, with the saved rule's call signature (the file
    is read once, checked by :func:`check_self_contained`, and run from those bytes).

    Returns ``runner(grads, params, states, step) -> (directions, new_states)`` for a
    ``ModelRule`` graph and ``runner(grad, param, state, step) -> (direction, new_state)`` for a
    ``TensorRule`` graph; CPU torch tensors of the exported dtypes in and out; the session runs
    ``torch.get_num_threads()`` intra-op threads (read when the graph is loaded). A call whose
    tensors do not fit the graph (count, dtype, rank or size) raises ``ValueError`` naming the
    input.
    """
    with open(os.fspath(path), "rb") as handle:
        return load_bytes(handle.read(), os.fspath(path))


def load_bytes(data: bytes, where: str) -> Runner:
    """:func:`load` of the graph whose file content is ``data`` (onnxruntime reads it from
    memory; ``where`` names it in messages). The graph is refused (``ValueError``) unless
    :func:`check_self_contained` accepts it."""
    check_self_contained(data, where)
    return _runner(bytes(data), where)


#: ``TensorProto.data_location`` of a tensor whose data lies in another file.
_EXTERNAL = 1


def check_self_contained(data: bytes, where: str) -> None:
    """Raise ``ValueError`` unless the ONNX model ``data`` parses and every tensor in it holds
    its own data.

    A tensor may instead name a file that holds its data (ONNX *external data*): onnxruntime
    then reads that file, resolved against the working directory for a model loaded from
    memory, so a graph could read any file there (``.env``, a key) into the update direction.
    Every tensor anywhere in the model is checked: initializers, sparse initializers, node
    attributes (``Constant`` values, tensors, sparse tensors), graphs nested in attributes
    (``If``, ``Loop``, ``Scan`` bodies) and functions, at any depth: the model is walked as a
    protobuf message, every field of every message, so no place that can hold a tensor is
    left out.
    """
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except Exception as error:  # protobuf's DecodeError, or its recursion limit
        raise ValueError(
            f"{where} is not an ONNX model ({type(error).__name__}: {str(error)[:200]})"
        ) from error
    stack: List[Tuple[Any, str]] = [(model, "model")]
    while stack:
        message, path = stack.pop()
        if isinstance(message, onnx.TensorProto):
            external = message.data_location == _EXTERNAL or len(message.external_data) > 0
            if external:
                entries = {entry.key: entry.value for entry in message.external_data}
                location = entries.get("location", "<no location>")
                raise ValueError(
                    f"{where}: tensor {message.name[:100]!r} ({path}) keeps its data in the "
                    f"external file {location[:200]!r}; an artifact's graphs must hold their "
                    "own data (a graph loaded from memory would read that file from the "
                    "working directory)"
                )
            continue  # a tensor holds no further messages
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            name = f"{path}.{field.name}"
            if field.message_type.GetOptions().map_entry:  # a map: its values are messages
                stack.extend((item, f"{name}[{key!r}]") for key, item in value.items())
            elif _repeated(field):
                stack.extend((item, f"{name}[{index}]") for index, item in enumerate(value))
            else:
                stack.append((value, name))


def _repeated(field: Any) -> bool:
    """Whether the protobuf ``field`` is repeated (``is_repeated`` in protobuf >= 6, ``label``
    before)."""
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _runner(model: bytes, where: str) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only (warnings are about unused initializers)
    # The process's intra-op thread budget is torch's (torch.set_num_threads); onnxruntime's
    # default of one thread per core would oversubscribe cores a training loop already uses.
    options.intra_op_num_threads = torch.get_num_threads()
    # A step's intermediates are the size of the parameters. onnxruntime's arena would keep its
    # largest step's intermediates resident between steps (measured: 2.9x the optimizer state
    # on a 10M-element parameter), and the memory pattern plans them all into one block; without
    # either each intermediate is freed at its last use, as torch frees its own.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    metadata = session.get_modelmeta().custom_metadata_map
    if SIGNATURE_KEY not in metadata:
        raise ValueError(f"{where} is not a compiledopt update-rule graph (no signature)")
    signature = Signature.from_json(metadata[SIGNATURE_KEY], where)
    inputs = signature.input_names
    outputs = signature.output_names
    if [i.name for i in session.get_inputs()] != inputs:
        raise ValueError(
            f"{where}: graph inputs {[i.name for i in session.get_inputs()]} do not "
            f"match its signature {inputs}"
        )

    def runner(grads: Any, params: Any, states: Any, step: Any) -> Tuple[Any, List[Tensor]]:
        flat = signature.flatten(grads, params, states, step)
        feed = {name: t.detach().contiguous().numpy() for name, t in zip(inputs, flat)}
        return signature.unflatten([torch.from_numpy(a) for a in session.run(outputs, feed)])

    runner.signature = signature  # type: ignore[attr-defined]  # what the graph takes
    return runner


class ONNXBackend(Backend):
    """``rule.onnx`` / ``rule_rank{r}.onnx``: data run by onnxruntime; writing needs onnx,
    onnxscript (with onnx_ir) and onnxruntime, running only onnxruntime."""

    name = "onnx"
    extension = ".onnx"
    per_rank = True
    carries_code = False
    fused = False
    requires = ("onnx", "onnxruntime", "onnxscript", "onnx_ir")
    load_requires = ("onnxruntime", "onnx")  # onnx parses a graph to check it before it runs
    install = "onnx onnxruntime onnxscript"
    # The module's functions above (staticmethod: they take no backend instance).
    save = staticmethod(save)
    load = staticmethod(load)
    load_bytes = staticmethod(load_bytes)

    def check_runnable(self, source: "str | bytes") -> None:
        """Refuse (``ValueError``) a graph that does not parse or is not self-contained
        (:func:`check_self_contained`): an artifact checks every graph of a backend before it
        loads any."""
        if not isinstance(source, (bytes, bytearray)):
            with open(os.fspath(source), "rb") as handle:
                source = handle.read()
        check_self_contained(source, "the graph")


BACKEND = ONNXBackend()
