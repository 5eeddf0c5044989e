"""Which errors are the user's, and the message that reports one.

An application raises, for what a user can cause (a missing file, an artifact that does not
load, an output that exists, a bad value, a missing optional package), one of
:data:`USER_ERRORS` or an ``OSError`` naming its file; ``compiledopt`` reports it in one line and
exits with status 2 (:func:`user_error`). As a last line of defence it also takes an exception
raised inside the libraries that deserialize an input's files (onnxruntime, onnx, safetensors,
torch's loaders): a corrupt graph or weights file is the input's fault, so the message names the
input and the error, never a traceback (:func:`loader_error`). An exception raised anywhere
else (a bug) is none of these, and its traceback shows.
"""

from types import TracebackType
from typing import Optional, Sequence

from compiledopt.apps.requirements import MissingDependencyError

__all__ = [
    "LOADER_MODULES",
    "PROGRAMMING_ERRORS",
    "USER_ERRORS",
    "error_message",
    "loader_error",
    "user_error",
]

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
    """Whether ``error`` is the user's, to report in one line: one of :data:`USER_ERRORS`, an
    ``OSError`` naming its file, or a :func:`loader_error`."""
    if isinstance(error, USER_ERRORS):
        return True
    if isinstance(error, OSError) and error.filename is not None:
        return True
    return loader_error(error)


def error_message(error: BaseException, source: Optional[str] = None) -> str:
    """The message that reports a :func:`user_error`: its own (an ``OSError`` as ``<file>:
    <reason>``), or for a loader's error, the input ``source`` it was reading, its class and the
    first line of its message."""
    if isinstance(error, USER_ERRORS) or isinstance(error, OSError):
        if isinstance(error, OSError) and error.filename is not None and error.strerror:
            return f"{error.filename}: {error.strerror}"
        return str(error)
    first = (str(error).strip().splitlines() or [""])[0]
    where = f"{source}: " if source else ""
    return f"{where}cannot be read ({type(error).__name__}: {first})"
