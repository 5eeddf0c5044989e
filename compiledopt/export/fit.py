"""Whether a loaded graph fits the artifact that lists it: the call signature stored with an ONNX
graph or an AOTInductor package (:class:`~compiledopt.export.signature.Signature`), or the rule a
TorchScript program scripts (:class:`~compiledopt.export.rule.TensorRule` or
:class:`~compiledopt.export.rule.ModelRule` and its ``index`` and ``state_counts``; a program of
another class, trusted code, is not checked), against the manifest's ``kind``, ``bindings`` and
the rank in the graph's file name.

A graph copied from another artifact, or saved under another rank's name, verifies (its bytes
are what the manifest lists) and loads; without this check it fails at its first call, naming an
input but not the file (a TorchScript program with a raw interpreter traceback). Only the call's
structure is compared (a per-tensor or a bound rule, how many parameters, each one's rank and
fixed sizes, and a program's state counts): the state an ONNX graph takes is checked by its
signature at every call.
"""

from typing import Any, Callable, Dict, List, Optional

import torch

from compiledopt.export.signature import Signature

__all__ = ["graph_misfit", "misfit"]


def misfit(runner: Callable, manifest: Dict[str, Any], rank: Optional[int]) -> Optional[str]:
    """What about the loaded graph ``runner`` does not fit the artifact of the (schema-checked)
    ``manifest``, or ``None``: its stored signature (:func:`graph_misfit`) or its scripted rule
    (:func:`script_misfit`); a runner with neither is not checked. ``rank``: the rank a
    shape-agnostic per-rank graph's file name says (``rule_rank2.onnx``: 2), or ``None``."""
    bindings = manifest["bindings"] if manifest["kind"] == "bound" else None
    if isinstance(runner, torch.jit.ScriptModule):
        return script_misfit(runner, bindings)
    signature = getattr(runner, "signature", None)
    if isinstance(signature, Signature):
        if bindings is None:
            states = len(manifest["state_names"])
        else:
            states = sum(len(binding["state"]) for binding in bindings)
        return graph_misfit(signature, bindings, rank, states)
    return None


def script_misfit(
    module: torch.jit.ScriptModule, bindings: Optional[List[Dict[str, Any]]]
) -> Optional[str]:
    """What about the TorchScript program ``module`` does not fit its artifact, or ``None``: a
    rule the exporter scripts is a ``TensorRule`` in a shape-agnostic artifact, and a
    ``ModelRule`` in a bound one with a transform index and a state count for each binding,
    the counts those of the bindings' ``state``. A program of another class is not checked: it
    runs only from an artifact trusted to run code, whose user gets what they trust."""
    name = getattr(module, "original_name", None)
    expected = "TensorRule" if bindings is None else "ModelRule"
    if name in ("TensorRule", "ModelRule") and name != expected:
        return f"the program scripts {name!r}, not a {expected}"
    if name != "ModelRule" or bindings is None:
        return None
    index, counts = getattr(module, "index", None), getattr(module, "state_counts", None)
    if not (isinstance(index, list) and len(index) == len(bindings)):
        return (
            f"the program is a rule over {_count(index)} parameters, the manifest binds "
            f"{len(bindings)}"
        )
    states = [len(binding["state"]) for binding in bindings]
    if counts != states:
        return f"the program's state counts are {str(counts)[:200]}, the bindings' {states}"
    return None


def _count(index: Any) -> str:
    return str(len(index)) if isinstance(index, list) else "an unknown number of"


def graph_misfit(
    signature: Signature,
    bindings: Optional[List[Dict[str, Any]]],
    rank: Optional[int],
    states: int,
) -> Optional[str]:
    """What about the graph of ``signature`` does not fit its artifact, or ``None``.

    Args:
        signature: the graph's stored call signature.
        bindings: a bound artifact's ``bindings`` (its graph is one rule over them all), or
            ``None`` for a shape-agnostic artifact (its graphs are per-tensor rules).
        rank: the rank a shape-agnostic per-rank graph's file name says (``rule_rank2.onnx``:
            2), or ``None``.
        states: how many state tensors the manifest names (a shape-agnostic artifact's
            ``state_names``, a bound one's bindings' ``state`` together): as many as the
            graph takes (a transform names every state tensor it keeps).
    """
    if bindings is None:
        if not signature.tensor_rule:
            return "the graph is a bound rule over lists of parameters, not a per-tensor rule"
        took = len(signature.shapes[0])
        if rank is not None and took != rank:
            return f"the graph takes rank-{took} tensors, not the rank-{rank} tensors its name says"
        if signature.states != states:
            return f"the graph takes {signature.states} state tensors, state_names lists {states}"
        return None
    if signature.tensor_rule:
        return "the graph is a per-tensor rule, not a bound rule over the bound parameters"
    if signature.directions != len(bindings):
        return (
            f"the graph takes {signature.directions} parameters, the manifest binds {len(bindings)}"
        )
    for index, (binding, sizes) in enumerate(zip(bindings, signature.shapes)):
        shape = binding["shape"]
        if len(sizes) != len(shape) or any(
            isinstance(size, int) and size != bound for size, bound in zip(sizes, shape)
        ):
            return (
                f"the graph takes parameter {index} of shape {sizes}, the manifest binds "
                f"{binding['name'][:100]!r} of shape {shape}"
            )
    if signature.states != states:
        return f"the graph takes {signature.states} state tensors, the bindings list {states}"
    return None
