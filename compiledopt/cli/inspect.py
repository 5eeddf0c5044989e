"""The ``compiledopt inspect`` command: a human-readable summary of an artifact's manifest, or
(``--list``) of the optimizers packaged with compiledopt."""

import argparse
from typing import TextIO

from compiledopt.cli.arguments import Commands

__all__ = ["add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``inspect`` subparser."""
    parser = commands.add_parser(
        "inspect",
        help="summarise an artifact's manifest, or list the packaged optimizers",
        description="Verify an artifact's checksums and summarise its manifest (transform, "
        "backends, how it was meta-trained); with --list, the optimizers packaged with "
        "compiledopt, which any command or FrozenOptimizer takes by name.",
    )
    parser.add_argument(
        "artifact", nargs="?", help="an artifact directory or a packaged optimizer's name"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the packaged optimizers (name, summary, lr)"
    )
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``inspect`` command: :func:`compiledopt.apps.inspect.describe_artifact` (which loads,
    and so verifies the checksums of, the artifact), or with ``--list``
    :func:`~compiledopt.apps.inspect.list_packaged`."""
    from compiledopt.apps.inspect import describe_artifact, list_packaged

    if args.list:
        if args.artifact is not None:
            raise ValueError(f"--list takes no artifact, got {args.artifact!r}")
        list_packaged(out)
    elif args.artifact is None:
        raise ValueError("name an artifact directory or a packaged optimizer, or pass --list")
    else:
        describe_artifact(args.artifact, out)
    return 0
