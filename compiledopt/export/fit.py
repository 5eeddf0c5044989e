"""Whether a loaded graph fits the artifact that lists it: the call signature stored with an ONNX
graph or an AOTInductor package (:class:`~compiledopt.export.signature.Signature`) against the
manifest's ``kind``, ``bindings`` and the rank in the graph's file name.

A graph copied from another artifact, or saved under another rank's name, verifies (its bytes
are what the manifest lists) and loads; without this check it fails at its first call, naming an
input but not the file. Only the call's structure is compared (a per-tensor or a bound rule, how
many parameters, each one's rank and fixed sizes): the state a graph takes is checked by the
signature at every call.
"""

from typing import Any, Dict, List, Optional

from compiledopt.export.signature import Signature

__all__ = ["graph_misfit"]


def graph_misfit(
    signature: Signature, bindings: Optional[List[Dict[str, Any]]], rank: Optional[int]
) -> Optional[str]:
    """What about the graph of ``signature`` does not fit its artifact, or ``None``.

    Args:
        signature: the graph's stored call signature.
        bindings: a bound artifact's ``bindings`` (its graph is one rule over them all), or
            ``None`` for a shape-agnostic artifact (its graphs are per-tensor rules).
        rank: the rank a shape-agnostic per-rank graph's file name says (``rule_rank2.onnx``:
            2), or ``None``.
    """
    if bindings is None:
        if not signature.tensor_rule:
            return "the graph is a bound rule over lists of parameters, not a per-tensor rule"
        took = len(signature.shapes[0])
        if rank is not None and took != rank:
            return f"the graph takes rank-{took} tensors, not the rank-{rank} tensors its name says"
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
    return None
