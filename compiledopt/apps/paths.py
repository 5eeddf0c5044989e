"""Paths: where the applications write the files they generate when no path is given, and the
checks on a path given, run before any work.

One folder, the *output root* (:func:`output_root`), holds them, one subfolder per command
(``compiledopt demo`` writes ``<root>/demo``):

1. ``$COMPILEDOPT_HOME``, if set and not empty (``~`` is expanded; a relative value is taken
   relative to the current directory);
2. else ``$XDG_DATA_HOME/compiledopt``, if ``XDG_DATA_HOME`` is an absolute path (the XDG base
   directory specification says to ignore a relative one);
3. else ``~/.local/share/compiledopt``.

A data folder, not a cache folder: checkpoints, artifacts and results are files a user keeps, and
``~/.cache`` may be emptied by anyone at any time. A path given on the command line (``--workdir``,
``--json``, ...) is used as it is.

The checks (:func:`check_input_file`, :func:`check_output_file`, :func:`check_output_directory`,
:func:`check_work_directory`) raise the errors that ``compiledopt`` turns into one line on stderr
(``ValueError`` and the ``OSError`` kinds), each naming the option or setting the path came from.
"""

import os
from pathlib import Path
from typing import Callable, Optional, Tuple

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "OVERWRITE_HINT",
    "check_input_file",
    "check_output_directory",
    "check_output_file",
    "check_work_directory",
    "default_output",
    "output_root",
    "write_whole",
]

#: The environment variable that sets the output root.
ENVIRONMENT_VARIABLE = "COMPILEDOPT_HOME"
#: What a refusal of an existing output says to do, in the commands that take ``--overwrite``.
OVERWRITE_HINT = "pass --overwrite to replace it"


def _resolve() -> Tuple[Path, str]:
    """The output root, absolute, and where it came from (for messages)."""
    home = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if home:
        return Path(os.path.abspath(os.path.expanduser(home))), f"{ENVIRONMENT_VARIABLE}={home}"
    data = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(data):
        return Path(data) / "compiledopt", f"XDG_DATA_HOME={data}"
    try:
        user = Path.home()
    except RuntimeError:  # no HOME and no password entry
        user = None
    if user is None or not user.is_absolute():
        raise ValueError(
            f"no home folder to write outputs under (HOME={os.environ.get('HOME', '')!r}): set "
            f"{ENVIRONMENT_VARIABLE} to a writable folder"
        )
    return user / ".local" / "share" / "compiledopt", "the default ~/.local/share/compiledopt"


def output_root() -> Path:
    """The folder under which the commands write their default outputs, as an absolute path
    (not created here): ``$COMPILEDOPT_HOME``, else ``$XDG_DATA_HOME/compiledopt``, else
    ``~/.local/share/compiledopt``. Raises ``ValueError`` when none applies (no home folder)."""
    return _resolve()[0]


def default_output(name: str, option: Optional[str] = None) -> Path:
    """``output_root() / name``, checked before any work: a directory, or one that can be
    created, in which files can be written. Otherwise raises ``NotADirectoryError`` or
    ``PermissionError`` naming the folder and the setting it came from (and ``option``, the
    command-line option that would name another folder, when given)."""
    if not name or os.sep in name or name in (".", ".."):
        raise ValueError(f"default_output: needs a plain folder name, got {name!r}")
    root, origin = _resolve()
    path = root / name
    try:
        check_work_directory(str(path), f"output folder (from {origin})")
    except (NotADirectoryError, PermissionError) as error:
        hint = f"set {ENVIRONMENT_VARIABLE} to a writable folder"
        if option:
            hint += f" or pass {option}"
        raise type(error)(f"{error}; {hint}") from None
    return path


# -- checks on a given path, before any work ----------------------------------------------------


def check_input_file(path: str, option: str) -> str:
    """``path`` if it is an existing, readable regular file; else an error naming ``option``."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{option}: needs a file path, got {path!r}")
    if not os.path.exists(path):
        _check_name_lengths(path, option, _nearest_folder(os.path.dirname(path) or "."))
        raise FileNotFoundError(f"{option} {path}: No such file or directory")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{option} {path}: not readable")
    return path


def _nearest_folder(path: str) -> str:
    """``path`` made absolute, or its nearest ancestor that exists (a file, perhaps)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _check_name_lengths(path: str, option: str, folder: str) -> None:
    """Refuse ``path`` if a name in it, or the whole of it, is longer than the file system of
    ``folder`` (its nearest existing folder) allows: the write would fail after the work."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
        path_max = os.pathconf(folder, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no such limit
        name_max, path_max = 255, 4096
    absolute = os.fsencode(os.path.abspath(path))
    longest = max((len(name) for name in absolute.split(os.fsencode(os.sep))), default=0)
    if longest > name_max:
        raise ValueError(
            f"{option} {path}: a name {longest} bytes long, above the {name_max} bytes this "
            "file system allows"
        )
    if len(absolute) >= path_max:
        raise ValueError(
            f"{option} {path}: {len(absolute)} bytes long, above the {path_max - 1} bytes this "
            "file system allows"
        )


def _check_writable_location(path: str, option: str, folder: Optional[str] = None) -> None:
    """Refuse ``path`` unless it can be created: no name in it too long
    (:func:`_check_name_lengths`), and the nearest existing one of ``folder`` (default: the
    folder of ``path``) and its ancestors must be a directory in which a file can be created
    (tried with a probe file, removed at once)."""
    folder = _nearest_folder(folder if folder is not None else os.path.dirname(path) or ".")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{option} {path}: {folder} is a file, not a directory")
    _check_name_lengths(path, option, folder)
    probe = os.path.join(folder, f".compiledopt-write-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise PermissionError(
            f"{option} {path}: cannot write to {folder} ({error.strerror or error})"
        ) from None
    os.unlink(probe)


def check_output_file(
    path: str, option: str, exists_ok: bool = True, hint: Optional[str] = None
) -> str:
    """``path`` if a file can be written there: not a directory, nor a name ending in a path
    separator (a folder's: torch refused to save there after the work, other writers dropped
    the separator), in a folder that exists or can be created and is writable (checked now,
    before any work); else an error naming ``option``. With ``exists_ok=False`` an existing file
    is refused too, the message ending in ``hint`` when given (e.g. :data:`OVERWRITE_HINT`)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{option}: needs a file path, got {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path}: is a directory, not a file")
    if path.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        raise IsADirectoryError(
            f"{option} {path}: ends in {path[-1]!r}, a folder's name, not a file"
        )
    if os.path.exists(path) and not exists_ok:
        raise FileExistsError(f"{option} {path}: exists" + (f" ({hint})" if hint else ""))
    _check_writable_location(path, option)
    return path


def check_output_directory(path: str, option: str, overwrite: bool) -> str:
    """``path`` if an artifact directory can be written there: not a file, not an existing
    directory unless ``overwrite``, and then only an empty one or a compiledopt artifact that
    holds nothing but its own files (:func:`compiledopt.export.writer.replaceable`: never a
    folder that merely holds a ``manifest.json``, nor an artifact a user added files to), in a
    writable place. An export to ``path`` that was killed while replacing it is undone first
    (:func:`compiledopt.export.writer.recover` puts the old artifact back)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{option}: needs a directory path, got {path!r}")
    if os.path.islink(path):
        raise FileExistsError(f"{option} {path}: is a symbolic link, not a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{option} {path}: is a file, not a directory")
    from compiledopt.export.writer import recover, replaceable

    recover(path)
    if os.path.isdir(path):
        if not overwrite:
            raise FileExistsError(f"{option} {path}: exists ({OVERWRITE_HINT})")
        reason = replaceable(path)
        if reason is not None:
            raise FileExistsError(f"{option} {path}: {reason}; refusing to replace it")
    _check_writable_location(path, option)
    return path


def check_work_directory(path: str, option: str) -> str:
    """``path`` if it is a directory, or can be created, in which files can be written."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{option}: needs a directory path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{option} {path}: is a file, not a directory")
    _check_writable_location(path, option, folder=path)
    return path


def write_whole(path: str, write: Callable[[str], object]) -> None:
    """Write the file ``path`` whole or not at all: ``write(staging)`` writes a temporary file of
    the same extension in its folder (created if need be, as :func:`check_output_file` allows),
    which then replaces ``path`` in one rename; on any error the temporary file is removed and
    ``path`` left as it was."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=folder, prefix=".compiledopt-", suffix=Path(path).suffix)
    os.close(handle)
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.lexists(staging):
            os.unlink(staging)
        raise
