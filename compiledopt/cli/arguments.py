"""Argument types and options shared by the ``compiledopt`` commands.

The argparse types (:func:`positive_int`, :func:`random_seed`, :func:`names_of`, ...) are the
parsers of :mod:`compiledopt.apps.values` through :func:`argtype`: a bad value is refused with an
``argparse.ArgumentTypeError`` naming it, so argparse prints the option and the message and exits
with status 2. The checks on paths, which run before a command does any work, are in
:mod:`compiledopt.apps.paths`. The options that several commands take are added by one
function each (:func:`add_trust_options`, :func:`add_artifact_options`).
"""

import argparse
from typing import Callable, List, Optional, Sequence, TypeAlias, TypeVar

import compiledopt.apps.values as values
from compiledopt.apps.values import comma_list, first_repeated

__all__ = [
    "Commands",
    "add_artifact_options",
    "add_trust_options",
    "argtype",
    "backend_list",
    "comma_list",
    "first_repeated",
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

T = TypeVar("T")


def argtype(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` (text -> value, ``ValueError`` naming a bad value) as an argparse type: its
    ``ValueError`` becomes the ``ArgumentTypeError`` whose message argparse prints after the
    option's name (exit status 2)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__  # what argparse calls the type in its messages
    return convert


positive_int = argtype(values.positive_int)
non_negative_int = argtype(values.non_negative_int)
random_seed = argtype(values.random_seed)
positive_float = argtype(values.positive_float)
json_object = argtype(values.json_object)
thread_counts = argtype(values.thread_counts)


def positive_int_up_to(limit: int) -> Callable[[str], int]:
    """argparse type: :func:`compiledopt.apps.values.positive_int_up_to`."""
    return argtype(values.positive_int_up_to(limit))


def names_of(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    """argparse type: :func:`compiledopt.apps.values.names_of`."""
    return argtype(values.names_of(choices, what))


def rank_list(limit: int) -> Callable[[str], List[int]]:
    """argparse type: :func:`compiledopt.apps.values.rank_list`."""
    return argtype(values.rank_list(limit))


def backend_list(text: str, option: str = "--backends") -> List[str]:
    """The backends of a comma-separated ``option`` (checked against the artifact later), or a
    ``ValueError`` if it names none or one twice (which would run it twice, or export its
    graphs twice, for one result)."""
    names = comma_list(text)
    if not names:
        raise ValueError(f"{option} {text!r}: needs at least one backend")
    repeated = first_repeated(names)
    if repeated is not None:
        raise ValueError(f"{option} {text!r}: backend {repeated!r} repeated")
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
