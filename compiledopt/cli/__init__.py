"""The ``compiledopt`` command line (also ``python -m compiledopt``).

Each command lives in the module of :data:`COMMANDS` named after it, which has the same two
functions: ``add_parser(commands)`` adds the command's subparser (and returns it), and
``run(args, out) -> int`` runs it, printing to ``out``, and returns the exit status. Command
modules import only light modules at their top level; ``run`` imports what the command needs.

:func:`main` turns the errors a user can cause (a missing file, an artifact that does not load,
an output that exists, a bad value, a missing optional package) into one line on stderr,
``compiledopt <command>: <message>``, and exit status 2, as argparse does for bad arguments.
"""

import argparse
import importlib
import sys
from types import ModuleType
from typing import Dict, Optional, Sequence

from compiledopt.cli.requirements import MissingDependencyError

__all__ = ["COMMANDS", "build_parser", "command_module", "main"]

#: Command name -> module of :mod:`compiledopt.cli`, in the order ``compiledopt --help`` lists them.
COMMANDS: Dict[str, str] = {
    "demo": "demo",
    "meta-descent": "meta_descent",
    "train": "train",
    "export": "export",
    "inspect": "inspect",
    "verify": "verify",
    "finetune": "finetune",
    "bench": "bench",
    "keygen": "keygen",
    "sign": "sign",
}

#: Errors a user causes with arguments or files (``ArtifactError`` is a ``ValueError``).
USER_ERRORS = (
    ValueError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    MissingDependencyError,
)


def command_module(command: str) -> ModuleType:
    """The module that implements ``command`` (a key of :data:`COMMANDS`)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[command]}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compiledopt`` command."""
    parser = argparse.ArgumentParser(
        prog="compiledopt",
        description="Learned optimizers written once, run anywhere.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command_module(command).add_parser(commands)
    return parser


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``compiledopt`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    Invalid arguments exit through argparse (``SystemExit`` with status 2 and a usage message);
    the errors in :data:`USER_ERRORS` print ``compiledopt <command>: <message>`` on stderr and
    return 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return command_module(args.command).run(args, sys.stdout)
    except USER_ERRORS as error:
        print(f"compiledopt {args.command}: {_message(error)}", file=sys.stderr)
        return 2
