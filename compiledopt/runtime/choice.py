"""Which runtime backend an optimizer runs: the one named, checked, or ``auto``'s first that can.

``auto`` tries the backends in the order it is given (fastest first, see :func:`auto_order`)
and skips, each with a log line on the ``compiledopt`` logger, a backend whose graphs are code
in an untrusted artifact, one that cannot run where the parameters live, one whose graphs do not
compute a rule some parameters are routed to, and one that cannot load on this machine;
``eager`` always runs. A backend named explicitly that cannot run raises instead, naming why.
"""

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt.export import Artifact, ArtifactError
from compiledopt.export.backend import get as export_backend
from compiledopt.runtime.autotune import measured_order
from compiledopt.runtime.backends import BUILT_IN_BACKENDS, runtime_backends
from compiledopt.runtime.placement import placement_problem

__all__ = ["auto_order", "check_backend", "choose_backend", "runtime_backends"]

logger = logging.getLogger("compiledopt")


def check_backend(backend: str) -> None:
    """``ValueError`` unless ``backend`` is ``"auto"`` or a runtime backend registered now
    (:func:`~compiledopt.runtime.backends.runtime_backends`)."""
    known = runtime_backends()
    if backend != "auto" and backend not in known:
        raise ValueError(f"Invalid backend: {backend!r} (one of {('auto', *known)})")


def auto_order(
    artifact: Artifact, device: torch.device, elements: Optional[int] = None
) -> Tuple[str, ...]:
    """The order in which ``backend="auto"`` tries the runtime backends for ``artifact`` on
    ``device`` with the current thread count, for parameters of ``elements`` elements in all:
    fastest first as measured by :func:`~compiledopt.runtime.measure.measure_backends` on
    parameters of the same size class (else its default order), then any other artifact
    backend registered now, ``eager`` last."""
    known = runtime_backends()
    measured = measured_order(artifact, device, elements=elements)
    order = [b for b in measured if b in known and b != "eager"]
    rest = [b for b in known if b not in order and b != "eager"]
    return (*order, *rest, "eager")


def choose_backend(
    backend: str,
    artifact: Artifact,
    named: List[Tuple[str, Tensor]],
    off_graph: List[str],
    order: Sequence[str] = (),
) -> str:
    """The backend to run: ``backend`` checked, or with ``"auto"`` the first of ``order`` that
    can run (see the module doc).

    Args:
        backend (str): a runtime backend's name, or ``"auto"``.
        artifact (Artifact): the verified artifact.
        named (list): the ``(name, parameter)`` pairs the optimizer steps.
        off_graph (list of str): the rules some parameters are routed to that the exported
            graphs do not compute (only the built-in backends compute them).
        order (sequence of str): ``auto``'s order (ending with ``eager``).

    Raises:
        ArtifactError: the artifact has no graph for ``backend``, or its graphs cannot run on
            this machine (an AOTInductor package built for another instruction set).
        ValueError: ``backend`` cannot run where the parameters live, or its graphs do not
            compute a rule in ``off_graph``.
        UntrustedCodeError: ``backend``'s graphs are code and the artifact is not trusted.
    """
    available = set(artifact.backends) | set(BUILT_IN_BACKENDS)
    if backend == "auto":
        for b in order:
            if b == "eager" or (
                (b in BUILT_IN_BACKENDS or (b in available and _may_load(artifact, b)))
                and _placed(artifact, named, b)
                and (
                    b in BUILT_IN_BACKENDS or (_computes(b, off_graph) and _runs_here(artifact, b))
                )
            ):
                return b
        return "eager"
    if backend not in available:
        raise ArtifactError(f"{artifact.path} has no {backend} graph (it has {artifact.backends})")
    problem = placement_problem(named, backend, artifact)
    if problem:
        raise ValueError(problem)
    if backend not in BUILT_IN_BACKENDS:
        artifact.check_may_load(backend)
        artifact.check_runnable(backend)  # at construction, before any graph is loaded
        if off_graph:
            raise ValueError(
                f"the {backend} backend runs the graphs {artifact.path} exported, which compute "
                f"its rule as configured, not the rules {off_graph} that some parameters are "
                "routed to: use backend 'compiled' or 'eager', or set rule='artifact' on their "
                "param groups"
            )
    return backend


def _computes(backend: str, off_graph: List[str]) -> bool:
    if off_graph:
        logger.info(
            "FrozenOptimizer: auto skips the %s backend: its graphs do not compute the rules %s "
            "that some parameters are routed to",
            backend,
            off_graph,
        )
    return not off_graph


def _placed(artifact: Artifact, named: List[Tuple[str, Tensor]], backend: str) -> bool:
    problem = placement_problem(named, backend, artifact)
    if problem:
        logger.info("FrozenOptimizer: auto skips the %s backend: %s", backend, problem)
    return problem is None


def _may_load(artifact: Artifact, backend: str) -> bool:
    if artifact.may_load(backend):
        return True
    logger.info(
        "FrozenOptimizer: auto skips the %s backend: its graphs are code and %s is not trusted "
        "(trust_code=True or trusted_keys)",
        backend,
        artifact.path,
    )
    return False


def _runs_here(artifact: Artifact, backend: str) -> bool:
    try:
        export_backend(backend).require(loading=True)
        artifact.check_runnable(backend)
    except (ImportError, ArtifactError) as error:
        logger.info("FrozenOptimizer: auto skips the %s backend: %s", backend, error)
        return False
    return True
