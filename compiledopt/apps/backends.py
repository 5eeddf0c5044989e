"""Which :class:`~compiledopt.FrozenOptimizer` backends an application runs on an artifact.

An artifact's graphs that are code (TorchScript programs, AOTInductor libraries) load only from a
trusted artifact (:meth:`compiledopt.export.Artifact.may_load`); ONNX graphs are data and load
from any. These checks refuse a backend before any work, naming it.
"""

from typing import TYPE_CHECKING, List, Sequence

if TYPE_CHECKING:
    from compiledopt.export import Artifact

__all__ = ["check_backends", "check_loadable", "default_backends"]


def default_backends(artifact: "Artifact") -> List[str]:
    """``eager``, ``compiled`` and the artifact's backends that it may load (graphs that are
    code only from a trusted artifact)."""
    return ["eager", "compiled", *(b for b in artifact.backends if artifact.may_load(b))]


def check_loadable(artifact: "Artifact", backends: Sequence[str], option: str) -> None:
    """Refuse, before any work, a backend of ``backends`` whose graphs are code that
    ``artifact`` is not trusted to run, naming it (after ``option``, the setting that named it)
    and the options that would trust it."""
    for backend in backends:
        if backend in artifact.backends and not artifact.may_load(backend):
            raise ValueError(
                f"{option} {backend}: {artifact.path} is not trusted to run code (its {backend} "
                "graphs are programs): pass --trust-code if you trust its source, or "
                "--trusted-key with the public key that signed it"
            )


def check_backends(
    artifact: "Artifact", backends: Sequence[str], option: str = "--backends"
) -> None:
    """Refuse a FrozenOptimizer backend that ``artifact`` does not have, or whose graphs are
    code that it is not trusted to run, naming it (after ``option``)."""
    from compiledopt.runtime.backends import BUILT_IN_BACKENDS

    available = ["auto", *BUILT_IN_BACKENDS, *artifact.backends]
    unknown = [b for b in backends if b not in available]
    if unknown:
        raise ValueError(
            f"{option}: {artifact.path} has no backend {unknown[0]!r} "
            f"(available: {', '.join(available)})"
        )
    check_loadable(artifact, backends, option)
