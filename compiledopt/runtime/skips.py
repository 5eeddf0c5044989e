"""Which parameter groups a step skips: those with a non-finite gradient, direction or state."""

import logging
from typing import Any, Dict, Optional, Sequence, Set, Tuple

from torch import Tensor

from compiledopt.runtime.distributed import all_finite, finite_flags

__all__ = ["groups_to_skip"]

logger = logging.getLogger("compiledopt")


def groups_to_skip(
    groups: Sequence[Tuple[Any, Sequence[int]]],
    checks: Sequence[Tuple[Any, Sequence[int], Any]],
    labels: Sequence[str],
    policy: str,
    warned: bool,
) -> Tuple[Set[int], bool]:
    """The indices of ``groups`` (``(group, member indices)`` pairs) to skip, and whether a skip
    has now been logged at WARNING.

    A group is skipped when any of its members has a non-finite tensor in ``checks`` (``(tensor,
    members, what)``, see :func:`~compiledopt.runtime.distributed.finite_flags`: one host
    synchronisation for the step, and for distributed parameters one all-reduce of the flags so
    that every rank decides alike; flags taken already, a boolean ``tensor``, come with the
    ``(tensor, name)`` pairs they cover as ``what``: a member they flag is looked at again
    exactly, and its first non-finite tensor named). With ``policy="raise"`` the first such
    parameter raises ``FloatingPointError`` instead. The first skip of an optimizer (``warned``
    false) is logged at WARNING, later ones at DEBUG.
    """
    bad: Dict[int, str] = {}
    for (_, members, what), flags in zip(checks, finite_flags(checks)):
        for j, (i, finite) in enumerate(zip(members, flags)):
            if finite or i in bad:
                continue
            found = what if isinstance(what, str) else _first_nonfinite(what, j)
            if found is not None:
                bad[i] = found
    skipped: Set[int] = set()
    for g, (_, members) in enumerate(groups):
        first = next((i for i in members if i in bad), None)
        if first is None:
            continue
        if policy == "raise":
            raise FloatingPointError(f"non-finite {bad[first]} for {labels[first]}")
        skipped.add(g)
        logger.log(
            logging.DEBUG if warned else logging.WARNING,
            "FrozenOptimizer: step skipped for the group of %s: non-finite %s (counted in "
            "skipped_steps%s)",
            labels[first],
            bad[first],
            "" if warned else "; later skips are logged at DEBUG",
        )
        warned = True
    return skipped, warned


def _first_nonfinite(named: Sequence[Tuple[Tensor, str]], row: int) -> Optional[str]:
    """The name of the first of ``named`` (``(tensor, name)`` pairs, stacks of a bucket's
    members) whose row ``row`` is not all finite, or ``None`` (flags taken on sums, see
    :func:`~compiledopt.runtime.buckets.finite_rows`, whose finite values overflowed)."""
    flags = all_finite([tensor[row] for tensor, _ in named])
    return next((name for (_, name), finite in zip(named, flags) if not finite), None)
