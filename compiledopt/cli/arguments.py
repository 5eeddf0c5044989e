"""Argument types and options shared by the ``compiledopt`` commands.

The argparse types (:func:`positive_int`, :func:`random_seed`, :func:`names_of`, ...) refuse a
bad value with an ``argparse.ArgumentTypeError`` naming it, so argparse prints the option and the
message and exits with status 2. The checks on paths, which run before a command does any work,
are in :mod:`compiledopt.apps.paths`. The options that several commands take are added by one
function each (:func:`add_trust_options`, :func:`add_artifact_options`).
"""

import argparse
import json
import math
import os
from typing import Callable, List, Optional, Sequence, TypeAlias

__all__ = [
    "SEED_LIMIT",
    "Commands",
    "add_artifact_options",
    "add_trust_options",
    "backend_list",
    "comma_list",
    "json_object",
    "names_of",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "positive_int_up_to",
    "random_seed",
    "rank_list",
    "thread_counts",
]

#: What ``add_parser(commands)`` of a command module adds its subparser to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

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


def rank_list(limit: int) -> Callable[[str], List[int]]:
    """argparse type: a non-empty comma-separated list of distinct parameter ranks, integers in
    ``[0, limit]``."""

    def ranks(text: str) -> List[int]:
        try:
            values = [non_negative_int(entry) for entry in _items(text, "rank")]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated integers (ranks), got {text!r}: {error}"
            ) from None
        too_large = [v for v in values if v > limit]
        if too_large:
            raise argparse.ArgumentTypeError(f"rank {too_large[0]} is above {limit}")
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"a rank is repeated in {text!r}")
        return values

    ranks.__name__ = "rank list"
    return ranks


def thread_counts(text: str) -> List[int]:
    """argparse type: comma-separated positive thread counts, at most the machine's cores."""
    counts = [positive_int(item) for item in comma_list(text)]
    if not counts:
        raise argparse.ArgumentTypeError(f"needs at least one thread count, got {text!r}")
    cores = os.cpu_count() or 1
    above = [count for count in counts if count > cores]
    if above:
        raise argparse.ArgumentTypeError(
            f"{above[0]} threads: this machine has {cores} cores (got {text!r})"
        )
    return counts


def backend_list(text: str, option: str = "--backends") -> List[str]:
    """The backends of a comma-separated ``option`` (checked against the artifact later), or a
    ``ValueError`` if it names none."""
    names = comma_list(text)
    if not names:
        raise ValueError(f"{option} {text!r}: needs at least one backend")
    return names


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--trust-code`` and ``--trusted-key`` to a command that loads an artifact (their
    meaning: :mod:`compiledopt.apps.trust`)."""
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the artifact's graphs that are code (TorchScript, AOTInductor) load: only for "
        "an artifact whose source you trust (ONNX graphs load without it)",
    )
    parser.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        action="append",
        default=None,
        metavar="PUBLIC_PEM",
        help="an Ed25519 public key (PEM file, e.g. from `compiledopt keygen`): the artifact "
        "must be signed by one of the keys given, and its code graphs then load (repeatable)",
    )


def add_artifact_options(
    parser: argparse.ArgumentParser,
    backends: Sequence[str],
    ranks: Sequence[int],
    lr: Optional[float],
    ranks_note: str,
    lr_note: str,
) -> None:
    """Add the options on the artifact a command writes (after its ``--output``): ``--backends``
    (default ``backends``), ``--ranks`` (default ``ranks``, the largest allowed) and ``--lr``
    (default ``lr``), their help saying what the defaults of ``--ranks`` and ``--lr`` are (the
    notes)."""
    from compiledopt.export import BACKENDS

    default = "all" if list(backends) == list(BACKENDS) else ",".join(backends)
    parser.add_argument(
        "--backends",
        type=names_of(BACKENDS, "backend"),
        default=list(backends),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: {default})",
    )
    parser.add_argument(
        "--ranks",
        type=rank_list(max(ranks)),
        default=list(ranks),
        help=f"parameter ranks to export ONNX/AOTI graphs for, out of 0-{max(ranks)} "
        f"(default: {ranks_note})",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=lr,
        help=f"suggested learning rate recorded in the manifest (default: {lr_note})",
    )
