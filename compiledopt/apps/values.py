"""Values of settings written as text — a command-line option or a ``--config`` entry — parsed
and checked: each parser takes the text and returns the value, or raises ``ValueError`` with a
message naming what it got (``must be a positive integer, got 'two'``). The command line wraps
them as argparse types (:func:`compiledopt.cli.arguments.argtype`); ``compiledopt train`` checks
its ``--config`` values with the same parsers.
"""

import math
import os
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

from compiledopt._validation import strict_json

T = TypeVar("T")

__all__ = [
    "SEED_LIMIT",
    "comma_list",
    "distinct_names",
    "first_repeated",
    "fraction",
    "json_object",
    "names_of",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "positive_int_up_to",
    "random_seed",
    "rank_list",
    "routes",
    "thread_counts",
]

#: Seeds are integers in ``[0, SEED_LIMIT)``: task seeds are derived from them by products that
#: must stay within the 64 bits of a torch generator's seed.
SEED_LIMIT = 2**31


def _integer(text: str, minimum: int, kind: str, limit: Optional[int] = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"must be {kind}, got {text!r}") from None
    if value < minimum or (limit is not None and value >= limit):
        raise ValueError(f"must be {kind}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A positive integer."""
    return _integer(text, 1, "a positive integer")


def positive_int_up_to(limit: int) -> Callable[[str], int]:
    """A parser of integers in ``[1, limit]`` (a count of steps or repeats beyond ``limit``
    would run for days or exhaust memory, not finish)."""

    def count(text: str) -> int:
        return _integer(text, 1, f"an integer in [1, {limit:,}]", limit + 1)

    count.__name__ = f"integer up to {limit}"
    return count


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


def random_seed(text: str) -> int:
    """A random seed, an integer in ``[0, 2**31)``."""
    return _integer(text, 0, "an integer in [0, 2**31)", SEED_LIMIT)


def positive_float(text: str) -> float:
    """A positive finite number (not ``nan`` nor ``inf``)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive finite number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in ``[0, 1)``."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:  # also refuses nan
        raise ValueError(f"must be a number in [0, 1), got {text}")
    return value


def json_object(text: str) -> dict:
    """A JSON object."""
    try:
        value = strict_json(text, constants=True)
    except ValueError as error:  # json.JSONDecodeError, a key given twice
        raise ValueError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {text!r}")
    return value


def comma_list(text: str) -> List[str]:
    """The non-empty items of a comma-separated list: ``"onnx,,aoti"`` -> ``["onnx", "aoti"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def first_repeated(items: Sequence[T]) -> Optional[T]:
    """The first item of ``items`` that an earlier one equals, or ``None``."""
    return next((item for i, item in enumerate(items) if item in items[:i]), None)


def _items(text: str, what: str) -> List[str]:
    items = comma_list(text)
    if not items:
        raise ValueError(f"needs at least one {what}, got {text!r}")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ValueError(f"{what} {repeated[0]!r} repeated in {text!r}")
    return items


def distinct_names(what: str) -> Callable[[str], List[str]]:
    """A parser of non-empty comma-separated lists of distinct names (checked against what they
    name later)."""

    def names(text: str) -> List[str]:
        return _items(text, what)

    names.__name__ = f"{what} list"  # what argparse calls the type in its messages
    return names


def names_of(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    """A parser of non-empty comma-separated lists of distinct names out of ``choices``."""

    def names(text: str) -> List[str]:
        items = _items(text, what)
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise ValueError(f"unknown {what} {unknown[0]!r} (choose from {', '.join(choices)})")
        return items

    names.__name__ = f"{what} list"  # what argparse calls the type in its messages
    return names


def rank_list(limit: int) -> Callable[[str], List[int]]:
    """A parser of non-empty comma-separated lists of distinct parameter ranks, integers in
    ``[0, limit]``."""

    def ranks(text: str) -> List[int]:
        try:
            values = [non_negative_int(entry) for entry in _items(text, "rank")]
        except ValueError as error:
            raise ValueError(
                f"must be comma-separated integers (ranks), got {text!r}: {error}"
            ) from None
        too_large = [v for v in values if v > limit]
        if too_large:
            raise ValueError(f"rank {too_large[0]} is above {limit}")
        if len(set(values)) < len(values):
            raise ValueError(f"a rank is repeated in {text!r}")
        return values

    ranks.__name__ = "rank list"
    return ranks


def thread_counts(text: str) -> List[int]:
    """Comma-separated distinct positive thread counts, at most the machine's cores."""
    counts = [positive_int(item) for item in comma_list(text)]
    if not counts:
        raise ValueError(f"needs at least one thread count, got {text!r}")
    repeated = first_repeated(counts)
    if repeated is not None:
        raise ValueError(f"thread count {repeated} repeated in {text!r}")
    cores = os.cpu_count() or 1
    above = [count for count in counts if count > cores]
    if above:
        raise ValueError(f"{above[0]} threads: this machine has {cores} cores (got {text!r})")
    return counts


def routes(text: str) -> Dict[str, str]:
    """``role=rule[,role=rule...]`` (e.g. ``matrix=orthogonal,vector=adam``) as a dict, each role
    named once. Roles and rules are checked against the transform later."""
    routed: Dict[str, str] = {}
    for piece in text.split(","):
        role, equals, rule = piece.strip().partition("=")
        role, rule = role.strip(), rule.strip()
        if not equals or not role or not rule:
            raise ValueError(
                f"expected role=rule[,role=rule...] (e.g. matrix=orthogonal), got {piece!r}"
            )
        if role in routed:
            raise ValueError(f"role {role!r} is routed twice")
        routed[role] = rule
    return routed
