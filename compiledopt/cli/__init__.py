"""The ``compiledopt`` command line (also ``python -m compiledopt``).

Each command lives in the module of :data:`COMMANDS` named after it, which has the same two
functions: ``add_parser(commands)`` adds the command's subparser (and returns it), and
``run(args, out) -> int`` runs it, printing to ``out``, and returns the exit status. Command
modules import only light modules at their top level; ``run`` imports what the command needs.

:func:`main` turns the errors a user can cause (a missing file, an artifact that does not load,
an output that exists, a bad value, a missing optional package) into one line on stderr,
``compiledopt <command>: <message>``, and exit status 2, as argparse does for bad arguments.
That boundary also takes, as a last line of defence, an exception raised inside the libraries
that deserialize an input's files (onnxruntime, onnx, safetensors, torch's loaders): a corrupt
graph or weights file is the input's fault, so the line names the input and the error, never a
traceback. An exception raised anywhere else (a bug) still shows its traceback. Everything a
command prints, and the error line, goes through :func:`compiledopt.cli.text.printable`, so
strings that come from an artifact reach the terminal with their control characters escaped.
"""

import argparse
import importlib
import sys
from types import ModuleType, TracebackType
from typing import Dict, Optional, Sequence

from compiledopt.apps.requirements import MissingDependencyError
from compiledopt.cli.text import PrintableWriter, printable

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

#: Modules that deserialize the files of an artifact or checkpoint. An exception raised inside
#: one of them (its innermost frame there, or its class defined there) is a file they could not
#: read, reported against the command's input; see :func:`loader_error`.
LOADER_MODULES = (
    "onnxruntime",
    "onnx",
    "google.protobuf",
    "safetensors",
    "torch.jit._serialization",
    "torch.serialization",
    "torch._inductor.package",
    "torch.export.pt2_archive",
)
#: Exception classes that say the calling code is wrong, wherever they are raised from: never
#: taken for a bad file.
PROGRAMMING_ERRORS = (
    TypeError,
    AttributeError,
    NameError,
    AssertionError,
    NotImplementedError,
    RecursionError,
)
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


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _in_module(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _innermost_module(traceback: Optional[TracebackType]) -> str:
    name = ""
    while traceback is not None:
        name = traceback.tb_frame.f_globals.get("__name__", "") or ""
        traceback = traceback.tb_next
    return name


def loader_error(error: BaseException) -> bool:
    """Whether ``error`` comes from a library deserializing a file (:data:`LOADER_MODULES`):
    its class is defined there (onnxruntime's ``InvalidProtobuf``, safetensors'
    ``SafetensorError``) or it was raised in their code (``torch.jit.load``'s ``RuntimeError``),
    and it is not one of the :data:`PROGRAMMING_ERRORS`."""
    if not isinstance(error, Exception) or isinstance(error, PROGRAMMING_ERRORS):
        return False
    module = type(error).__module__ or ""
    return _in_module(module, LOADER_MODULES) or _in_module(
        _innermost_module(error.__traceback__), LOADER_MODULES
    )


def user_error(error: BaseException) -> bool:
    """Whether ``main`` reports ``error`` as one line and status 2: one of :data:`USER_ERRORS`,
    an ``OSError`` naming its file, or a :func:`loader_error`."""
    if isinstance(error, USER_ERRORS):
        return True
    if isinstance(error, OSError) and error.filename is not None:
        return True
    return loader_error(error)


def error_line(command: str, error: BaseException, args: Optional[argparse.Namespace]) -> str:
    """The one line ``main`` prints for ``error``: ``compiledopt <command>: <message>``, where a
    loader's error names the input it was reading and its class; control characters escaped."""
    if isinstance(error, USER_ERRORS) or isinstance(error, OSError):
        message = _message(error)
    else:
        first = (str(error).strip().splitlines() or [""])[0]
        inputs = [getattr(args, key, None) for key in _INPUTS]
        source = next((str(value) for value in inputs if isinstance(value, str)), None)
        where = f"{source}: " if source else ""
        message = f"{where}cannot be read ({type(error).__name__}: {first})"
    return printable(f"compiledopt {command}: {message}")


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
