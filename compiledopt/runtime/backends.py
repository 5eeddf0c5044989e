"""The runtime backends a ``FrozenOptimizer`` accepts, read when asked, never copied at import.

The runtime's own backends, :data:`BUILT_IN_BACKENDS` (the transform rebuilt from its weights,
run eagerly or compiled by ``torch.compile``), come first; then every export backend registered
in :mod:`compiledopt.export.backend` at the time of the call, so a backend registered after
``import compiledopt`` is accepted by ``FrozenOptimizer(backend=...)``, tried by ``auto`` and
listed by the benchmark.
"""

from typing import Tuple

from compiledopt.export.backend import names as export_names
from compiledopt.runtime.builtins import BUILT_INS

__all__ = ["BUILT_IN_BACKENDS", "runtime_backends"]

#: Backends that need no graph in the artifact: the transform rebuilt from its weights, eagerly
#: or compiled by ``torch.compile`` (:data:`~compiledopt.runtime.builtins.BUILT_INS`). Only these
#: compute rules the exported graphs do not.
BUILT_IN_BACKENDS = tuple(BUILT_INS)


def runtime_backends() -> Tuple[str, ...]:
    """Every backend ``FrozenOptimizer(backend=...)`` accepts besides ``"auto"``, as of now: the
    built-in ones, then the registered export backends in registration order."""
    return (*BUILT_IN_BACKENDS, *export_names())
