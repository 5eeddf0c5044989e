"""Grouping objects by identity (``is``), for modules that one list may hold several times."""

from typing import Dict, Iterable, List, Tuple, TypeVar

T = TypeVar("T")

__all__ = ["unique_by_identity"]


def unique_by_identity(items: Iterable[T]) -> Tuple[List[T], List[int]]:
    """The distinct objects of ``items`` by identity, and where each item sits among them.

    Objects are compared with ``is``, never ``==``: two modules with equal weights are still two
    modules, and a tensor's ``==`` is elementwise. Typical use: one transform shared by several
    parameters is frozen, saved or snapshotted once.

    Args:
        items: any iterable (it is read once).

    Returns:
        ``(unique, index)``: ``unique`` holds each distinct object once, in order of first
        appearance, and ``index[i]`` is the position in ``unique`` of the ``i``-th item, so
        ``unique[index[i]] is items[i]``.

    Example:
        >>> a, b = object(), object()
        >>> unique, index = unique_by_identity([a, b, a])
        >>> unique == [a, b], index
        (True, [0, 1, 0])
    """
    unique: List[T] = []
    index: List[int] = []
    # ``unique`` keeps every object alive, so no id() is reused while this runs.
    position: Dict[int, int] = {}
    for item in items:
        slot = position.setdefault(id(item), len(unique))
        if slot == len(unique):
            unique.append(item)
        index.append(slot)
    return unique, index
