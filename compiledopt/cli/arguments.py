"""Argument types shared by the ``compiledopt`` commands.

The argparse types (:func:`positive_int`, :func:`random_seed`, :func:`names_of`, ...) refuse a
bad value with an ``argparse.ArgumentTypeError`` naming it, so argparse prints the option and the
message and exits with status 2. The checks on paths, which run before a command does any work,
are in :mod:`compiledopt.apps.paths`.
"""

import argparse
import json
import math
from typing import Callable, List, Optional, Sequence

__all__ = [
    "SEED_LIMIT",
    "comma_list",
    "int_list",
    "json_object",
    "names_of",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "positive_int_up_to",
    "random_seed",
]

#: Seeds are integers in ``[0, SEED_LIMIT)``: task seeds are derived from them by products that
#: must stay within the 64 bits of a torch generator's seed.
SEED_LIMIT = 2**31


def _integer(text: str, minimum: int, kind: str, limit: Optional[int] = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
    if value < minimum or (limit is not None and value >= limit):
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer, or an error naming the value."""
    return _integer(text, 1, "a positive integer")


def positive_int_up_to(limit: int) -> Callable[[str], int]:
    """argparse type: an integer in ``[1, limit]``, or an error naming the value (a count of
    steps or repeats beyond ``limit`` would run for days or exhaust memory, not finish)."""

    def count(text: str) -> int:
        return _integer(text, 1, f"an integer in [1, {limit:,}]", limit + 1)

    count.__name__ = f"integer up to {limit}"
    return count


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0, or an error naming the value."""
    return _integer(text, 0, "an integer >= 0")


def random_seed(text: str) -> int:
    """argparse type: a random seed, an integer in ``[0, 2**31)``."""
    return _integer(text, 0, "an integer in [0, 2**31)", SEED_LIMIT)


def positive_float(text: str) -> float:
    """argparse type: a positive finite number (not ``nan`` nor ``inf``), or an error naming it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def json_object(text: str) -> dict:
    """argparse type: a JSON object, or an error naming the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def comma_list(text: str) -> List[str]:
    """The non-empty items of a comma-separated list: ``"onnx,,aoti"`` -> ``["onnx", "aoti"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _items(text: str, what: str) -> List[str]:
    items = comma_list(text)
    if not items:
        raise argparse.ArgumentTypeError(f"needs at least one {what}, got {text!r}")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{what} {repeated[0]!r} repeated in {text!r}")
    return items


def names_of(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    """argparse type: a non-empty comma-separated list of distinct names out of ``choices``."""

    def names(text: str) -> List[str]:
        items = _items(text, what)
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown[0]!r} (choose from {', '.join(choices)})"
            )
        return items

    names.__name__ = f"{what} list"  # what argparse calls the type in its messages
    return names


def int_list(
    item: Callable[[str], int], what: str, limit: Optional[int] = None
) -> Callable[[str], List[int]]:
    """argparse type: a non-empty comma-separated list of distinct integers, each checked by the
    argparse type ``item`` and below ``limit`` (when given)."""

    def integers(text: str) -> List[int]:
        try:
            values = [item(entry) for entry in _items(text, what)]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated integers ({what}s), got {text!r}: {error}"
            ) from None
        too_large = [v for v in values if limit is not None and v > limit]
        if too_large:
            raise argparse.ArgumentTypeError(f"{what} {too_large[0]} is above {limit}")
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"a {what} is repeated in {text!r}")
        return values

    integers.__name__ = f"{what} list"
    return integers
