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

import io
import json
import os
import zipfile
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from compiledopt.export.backend import Backend
from compiledopt.export.rule import INDUCTOR_OPTIONS, inductor_configs
from compiledopt.export.signature import SIGNATURE_KEY, Runner, Signature
from compiledopt.export.tracing import quiet, trace

__all__ = ["BACKEND", "AOTIBackend", "check_runnable", "load", "package_cpu_isa", "save"]


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
                **inductor_configs(INDUCTOR_OPTIONS),
                "aot_inductor.metadata": {SIGNATURE_KEY: signature.to_json()},
            },
        )


#: Where AOTInductor records what a package was compiled for, inside the ``.pt2`` archive.
_METADATA_SUFFIX = "wrapper_metadata.json"


def package_cpu_isa(path: "str | bytes") -> Optional[str]:
    """The vector instruction set a package's native code was compiled for (Inductor's name, e.g.
    ``"avx2"``, ``"avx512 avx512_vnni"``), read from the archive without loading its library;
    ``None`` if the package does not record one (``ValueError`` if it is not a package).
    ``path`` may also be the package's bytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(path) if isinstance(path, bytes) else path) as archive:
            names = [n for n in archive.namelist() if n.endswith(_METADATA_SUFFIX)]
            metadata = json.loads(archive.read(names[0])) if names else {}
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as error:
        where = "the package" if isinstance(path, bytes) else path
        raise ValueError(f"{where} is not an AOTInductor package ({error})") from None
    isa = metadata.get("AOTI_CPU_ISA") if isinstance(metadata, dict) else None
    return isa.lower() if isinstance(isa, str) and isa else None


def check_runnable(path: "str | bytes") -> None:
    """``ValueError`` if the package (a path, or its bytes) has native code for a vector
    instruction set that this CPU lacks (running it would die with an illegal instruction);
    checked before loading it."""
    from torch._inductor import cpu_vec_isa

    isa = package_cpu_isa(path)
    known = {str(i).lower() for i in cpu_vec_isa.supported_vec_isa_list}
    here = {str(i).lower() for i in cpu_vec_isa.valid_vec_isa_list()}
    if isa in known and isa not in here:
        where = "the package" if isinstance(path, bytes) else path
        raise ValueError(
            f"{where} was compiled for {isa.upper()}, which this CPU does not support (it has "
            f"{', '.join(sorted(here)).upper() or 'no vector ISA'}): re-export the artifact's "
            "aoti graphs on this machine, or use another backend"
        )


def load(path: str) -> Runner:
    """A runner for the package at ``path``, with the saved rule's call signature.

    Returns ``runner(grads, params, states, step) -> (directions, new_states)`` for a
    ``ModelRule`` and ``runner(grad, param, state, step) -> (direction, new_state)`` for a
    ``TensorRule``; CPU tensors of the exported dtypes in and out. A call whose tensors do not
    fit the package (count, dtype, rank or size) raises ``ValueError`` naming the input.
    """
    from torch._inductor import aoti_load_package

    check_runnable(os.fspath(path))
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

    runner.signature = signature  # type: ignore[attr-defined]  # what the package takes
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

    def check_runnable(self, source: "str | bytes") -> None:
        check_runnable(source)  # the module's function


BACKEND = AOTIBackend()
