"""Where the ``compiledopt`` commands write the files they generate when no path is given.

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
"""

import os
from pathlib import Path
from typing import Optional, Tuple

from compiledopt.cli.arguments import check_work_directory

__all__ = ["ENVIRONMENT_VARIABLE", "default_output", "output_root"]

#: The environment variable that sets the output root.
ENVIRONMENT_VARIABLE = "COMPILEDOPT_HOME"


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
