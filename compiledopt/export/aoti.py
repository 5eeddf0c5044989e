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

Sizes are made dynamic as :mod:`compiledopt.export.tracing` describes (the trace the ONNX
backend shares).

Input checks: a compiled package reads its inputs' memory as the dtypes and sizes it was built
for and checks nothing (unless ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set when it first runs): a
float64 state given to a float32 package gives NaNs, a wrong size reads out of bounds. The
runner therefore checks every input against the :class:`~compiledopt.export.signature.Signature`
stored in the package's metadata (dtype, rank, fixed sizes, sizes shared between inputs and
derived sizes such as ``prod(shape[1:])``) and raises ``ValueError`` naming the input. The ONNX
backend shares this signature and these checks.
"""

import os
from typing import Any, List, Tuple

import torch
from torch import Tensor, nn

from compiledopt.export.backend import Backend
from compiledopt.export.rule import INDUCTOR_OPTIONS
from compiledopt.export.signature import SIGNATURE_KEY, Runner, Signature
from compiledopt.export.tracing import quiet, trace

__all__ = ["BACKEND", "AOTIBackend", "load", "save"]


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

    with quiet():
        program, _, signature = trace(rule, example, dynamic)
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

    with quiet():
        model = aoti_load_package(os.fspath(path))
    metadata = model.get_metadata()
    if SIGNATURE_KEY not in metadata:
        raise ValueError(f"{path} is not a compiledopt update-rule package (no signature)")
    signature = Signature.from_json(metadata[SIGNATURE_KEY], os.fspath(path))
    loader = model.loader

    def runner(grads: Any, params: Any, states: Any, step: Any) -> Tuple[Any, List[Tensor]]:
        flat = signature.flatten(grads, params, states, step)
        with torch.no_grad():
            # boxed_run takes the list's tensors over; the package reads them as contiguous.
            outputs = loader.boxed_run([t.detach().contiguous() for t in flat])
        return signature.unflatten(outputs)

    return runner


class AOTIBackend(Backend):
    """``rule.pt2`` / ``rule_rank{r}.pt2``: AOTInductor packages (native code, fused
    formulations); needs only torch and a C++ compiler to export."""

    name = "aoti"
    extension = ".pt2"
    per_rank = True
    carries_code = True
    fused = True
    requires = ()
    # The module's functions above (staticmethod: they take no backend instance).
    save = staticmethod(save)
    load = staticmethod(load)


BACKEND = AOTIBackend()
