"""Which parameter groups a step skips: those with a non-finite gradient, direction or state."""

import logging
from typing import Any, Dict, Sequence, Set, Tuple

from compiledopt.runtime.distributed import finite_flags

__all__ = ["groups_to_skip"]

logger = logging.getLogger("compiledopt")


def groups_to_skip(
    groups: Sequence[Tuple[Any, Sequence[int]]],
    checks: Sequence[Tuple[Any, Sequence[int], str]],
    labels: Sequence[str],
    policy: str,
    warned: bool,
) -> Tuple[Set[int], bool]:
    """The indices of ``groups`` (``(group, member indices)`` pairs) to skip, and whether a skip
    has now been logged at WARNING.

    A group is skipped when any of its members has a non-finite tensor in ``checks`` (``(tensor,
    members, what)``, see :func:`~compiledopt.runtime.distributed.finite_flags`: one host
    synchronisation for the step, and for distributed parameters one all-reduce of the flags so
    that every rank decides alike). With ``policy="raise"`` the first such parameter raises
    ``FloatingPointError`` instead. The first skip of an optimizer (``warned`` false) is logged at
    WARNING, later ones at DEBUG.
    """
    bad: Dict[int, str] = {}
    for (_, members, what), flags in zip(checks, finite_flags(checks)):
        for i, finite in zip(members, flags):
            if not finite:
                bad.setdefault(i, what)
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
