"""The ``compiledopt`` command line (also ``python -m compiledopt``).

Each command lives in the module of :data:`COMMANDS` named after it, which has the same two
functions: ``add_parser(commands)`` adds the command's subparser (and returns it), and
``run(args, out) -> int`` runs it, printing to ``out``, and returns the exit status. Command
modules import only light modules at their top level; ``run`` imports what the command needs.

:func:`main` turns the errors a user can cause (:func:`compiledopt.apps.errors.user_error`: a
missing file, an artifact that does not load, an output that exists, a bad value, a missing
optional package, a corrupt file a loader library could not read) into one line on stderr,
``compiledopt <command>: <message>``, and exit status 2, as argparse does for bad arguments; an
exception raised anywhere else (a bug) still shows its traceback. Everything a command prints,
and the error line, goes through :func:`compiledopt.apps.text.printable`, so strings that come
from an artifact reach the terminal with their control characters escaped.
"""

import argparse
import importlib
import sys
from types import ModuleType
from typing import Dict, Optional, Sequence

from compiledopt.apps.errors import error_message, user_error
from compiledopt.apps.text import PrintableWriter, printable

__all__ = ["COMMANDS", "build_parser", "command_module", "main"]

#: Command name -> module of :mod:`compiledopt.cli`, in the order ``compiledopt --help`` lists them.
COMMANDS: Dict[str, str] = {
    "demo": "demo",
    "meta-descent": "meta_descent",
    "train": "train",
    "export": "export",
    "convert": "convert",
    "inspect": "inspect",
    "verify": "verify",
    "finetune": "finetune",
    "bench": "bench",
    "keygen": "keygen",
    "sign": "sign",
}

#: The options that name a command's input, in the order they are looked for.
_INPUTS = ("artifact", "checkpoint", "resume")


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


def error_line(command: str, error: BaseException, args: Optional[argparse.Namespace]) -> str:
    """The one line ``main`` prints for ``error``: ``compiledopt <command>: <message>``
    (:func:`~compiledopt.apps.errors.error_message`, a loader's error naming the command's
    input), control characters escaped."""
    inputs = [getattr(args, key, None) for key in _INPUTS]
    source = next((str(value) for value in inputs if isinstance(value, str)), None)
    return printable(f"compiledopt {command}: {error_message(error, source)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``compiledopt`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    Invalid arguments exit through argparse (``SystemExit`` with status 2 and a usage message);
    the errors that :func:`user_error` accepts print :func:`error_line` on stderr and return 2;
    any other exception propagates (a bug: its traceback shows).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return command_module(args.command).run(args, PrintableWriter(sys.stdout))
    except Exception as error:
        if not user_error(error):
            raise
        print(error_line(args.command, error, args), file=sys.stderr)
        return 2
