"""Replacing an artifact folder safely: what may be replaced, the atomic swap, and recovery.

Replacing (``overwrite``) is crash-safe: only a folder that is empty or an artifact (a manifest
with the format marker, and no file it does not list: :func:`replaceable`) is ever replaced,
checked before any work and again just before the swap. On Linux the new folder and the old are
exchanged in one atomic ``renameat2(RENAME_EXCHANGE)``, so the destination always holds a whole
artifact, the old one or the new. Where that call is missing (another OS, an old kernel or a
file system without it) the old artifact is first renamed aside to ``.NAME.old-...`` and the
new one renamed in; an export killed between the two leaves no ``NAME``, and the next export to
it (or the next ``compiledopt`` command that opens it) renames the old one back
(:func:`recover`). By hand: ``mv .NAME.old-* NAME``.

Every ``.NAME.partial-*`` and ``.NAME.old-*`` folder records who made it (host, process id,
time): the next export to ``NAME`` removes those of exports that are no longer running
(:func:`clean_stale`), an old artifact only by the files its manifest lists.
"""

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, List, NamedTuple, Optional

from compiledopt._validation import strict_json
from compiledopt.export.layout import (
    FORMAT,
    MANIFEST,
    SIGNATURE,
)

__all__ = ["check_destination", "clean_stale", "move_into_place", "recover", "replaceable"]


def check_destination(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that exists (unless ``overwrite``), is a file, or
    is a folder that is not an artifact (:func:`replaceable`)."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise FileExistsError(f"{directory} exists and is not an artifact directory")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"artifact directory {directory} exists (pass overwrite=True)")
    if directory.exists():
        reason = replaceable(directory)
        if reason is not None:
            raise FileExistsError(f"{directory}: {reason}; refusing to replace it")


# -- what may be replaced ---------------------------------------------------------------------

#: The largest manifest read to decide whether a folder is an artifact (the loader's limit).
_MAX_MANIFEST_BYTES = 64 << 20


def _listed(folder: Path) -> Optional[set]:
    """The names an artifact folder may hold (the files its manifest lists, the manifest, the
    signature), or ``None`` if ``folder`` has no manifest with the format marker and a file
    list: a manifest that is a regular file, strict JSON, an object with ``"format":
    "compiledopt-artifact"`` and ``"files"`` an object (any format version, any other field:
    an artifact of another compiledopt version is still an artifact)."""
    manifest = folder / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(manifest).st_mode):
            return None
        with open(manifest, "rb") as handle:
            data = handle.read(_MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None
    if len(data) > _MAX_MANIFEST_BYTES:
        return None

    try:
        parsed = strict_json(data)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("format") != FORMAT:
        return None
    files = parsed.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) for name in files):
        return None
    return set(files) | {MANIFEST, SIGNATURE}


def replaceable(directory: "str | os.PathLike") -> Optional[str]:
    """``None`` if the existing folder ``directory`` may be replaced by an export: it is empty,
    or it is an artifact (its ``manifest.json`` has the format marker and lists its files) and
    holds nothing but regular files its manifest lists (and ``signature.json``). Otherwise the
    reason, naming what makes it something else: a folder that merely holds a file called
    ``manifest.json`` (a web app's) or an artifact a user added files to is never replaced."""
    directory = Path(directory)
    entries = sorted(os.listdir(directory))
    if not entries:
        return None
    allowed = _listed(directory)
    if allowed is None:
        what = "no manifest.json" if MANIFEST not in entries else "its manifest.json is not one"
        return f"exists and is not an artifact directory ({what})"
    for entry in entries:
        if entry not in allowed:
            return f"holds {entry!r}, which is not a file of its artifact manifest"
        if not stat.S_ISREG(os.lstat(directory / entry).st_mode):
            return f"holds {entry!r}, which is not a regular file"
    return None


# -- folders beside the destination: staging, retired, and their owners ------------------------

#: A staging or retired folder whose export started longer ago than this is taken as abandoned
#: even if a process with its id is running (process ids are reused).
STALE_AFTER_S = 24 * 3600
_KINDS = ("partial", "old")
_ASIDE = re.compile(
    r"(?P<kind>partial|old)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-(?P<stamp>[0-9]+)-[A-Za-z0-9_]+"
)


class _Aside(NamedTuple):
    path: Path
    kind: str
    host: str
    pid: int
    stamp: int


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def aside_prefix(directory: Path, kind: str) -> str:
    """The name prefix of a ``kind`` folder beside ``directory``: who made it, and when."""
    return f".{directory.name}.{kind}-{_host()}-{os.getpid()}-{time.time_ns()}-"


def _asides(directory: Path) -> List[_Aside]:
    """The staging and retired folders of exports to ``directory``."""
    prefix = f".{directory.name}."
    try:
        names = os.listdir(directory.parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = _ASIDE.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
        path = directory.parent / name
        if match and path.is_dir() and not path.is_symlink():
            found.append(
                _Aside(path, match["kind"], match["host"], int(match["pid"]), int(match["stamp"]))
            )
    return found


def _running(aside: _Aside) -> bool:
    """Whether the export that made ``aside`` may still be running: younger than
    :data:`STALE_AFTER_S` and, made on this host, its process still exists."""
    if time.time_ns() - aside.stamp > STALE_AFTER_S * 10**9:
        return False
    if aside.host != _host():
        return True  # another machine's export (a shared file system): only its age tells
    if aside.pid == os.getpid():
        return True
    try:
        os.kill(aside.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(directory: "str | os.PathLike") -> Optional[Path]:
    """Undo an interrupted replace: if ``directory`` does not exist and an export that is no
    longer running left the old artifact aside (``.NAME.old-...``), rename the newest such one
    back to ``directory``; return it (``None`` when there was nothing to recover)."""
    directory = Path(directory)
    if os.path.lexists(directory):
        return None
    retired = [a for a in _asides(directory) if a.kind == "old" and not _running(a)]
    retired = [a for a in retired if _listed(a.path) is not None]
    for aside in sorted(retired, key=lambda a: a.stamp, reverse=True):
        try:
            os.rename(aside.path, directory)
        except OSError:
            continue
        return directory
    return None


def clean_stale(directory: "str | os.PathLike") -> List[Path]:
    """Remove the staging and retired folders beside ``directory`` left by exports that are no
    longer running (see :func:`_running`); return those removed. A folder that holds an artifact
    loses only the files its manifest lists; an unfinished staging folder (no manifest yet:
    every file in it was written by its export) is removed whole. A retired artifact is kept
    while ``directory`` is missing (:func:`recover` puts it back)."""
    directory = Path(directory)
    removed = []
    for aside in _asides(directory):
        if _running(aside):
            continue
        if aside.kind == "old" and not os.path.lexists(directory):
            continue
        if discard(aside.path):
            removed.append(aside.path)
    return removed


def remove_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def discard(folder: Path) -> bool:
    """Remove a staging or retired ``folder``: one that holds an artifact only by the names its
    manifest lists, the manifest last (anything else in it is left, with a warning); one without
    a manifest whole (an unfinished staging folder). Whether it is gone."""
    allowed = _listed(folder)
    if allowed is None:
        if os.path.lexists(folder / MANIFEST):  # not ours to judge: leave it
            warnings.warn(f"left {folder}: its manifest.json is not an artifact's", stacklevel=3)
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return not os.path.lexists(folder)
    entries = os.listdir(folder)
    others = sorted(e for e in entries if e not in allowed)
    for entry in entries:
        if entry in allowed and entry != MANIFEST and not (folder / entry).is_dir():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / entry)
    if others:
        warnings.warn(
            f"left {folder}: it holds {others[:3]}, which its manifest does not list",
            stacklevel=3,
        )
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / MANIFEST)
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True


# -- moving into place --------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc 2.28+), or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap the two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); ``False``
    where the system or the file system cannot (the caller falls back to two renames).

    Raises:
        FileNotFoundError: one of them does not exist (any more).
    """
    function = _renameat2()
    if function is None:
        return False
    result = function(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def move_into_place(staging: Path, directory: Path, overwrite: bool) -> None:
    """Move the complete ``staging`` folder to ``directory``.

    Without ``overwrite`` the rename fails if ``directory`` appeared meanwhile (another export
    won). With it, ``directory`` is checked again (:func:`replaceable`) and the two folders are
    exchanged atomically (:func:`_exchange`), the old artifact then removed from the staging
    path; where that is not possible, the old one is renamed aside to ``.NAME.old-...`` first
    and removed once the new one is in place (:func:`recover` undoes a kill between the two).
    """
    for _ in range(100):  # another concurrent export may take the path meanwhile
        try:
            os.rename(staging, directory)  # fails if directory exists and is not empty
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            if not overwrite:
                raise FileExistsError(
                    f"artifact directory {directory} exists (pass overwrite=True)"
                ) from None
        if directory.is_symlink() or not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not an artifact directory")
        try:
            reason = replaceable(directory)
        except FileNotFoundError:
            continue
        if reason is not None:
            raise FileExistsError(f"{directory}: {reason}; refusing to replace it")
        try:
            exchanged = _exchange(staging, directory)
        except FileNotFoundError:
            continue  # the old one went away meanwhile: rename again
        if exchanged:
            discard(staging)  # now the old artifact: only its listed files go
            return
        if _replace_in_two_steps(staging, directory):
            return
    raise FileExistsError(f"could not move the new artifact into {directory}")


def _replace_in_two_steps(staging: Path, directory: Path) -> bool:
    """Rename the old artifact aside, the new one in, and remove the old one; ``False`` if
    another export took ``directory`` meanwhile (the caller tries again)."""
    retired = Path(tempfile.mkdtemp(prefix=aside_prefix(directory, "old"), dir=directory.parent))
    try:
        os.replace(directory, retired)  # an empty folder is replaced atomically
    except FileNotFoundError:
        retired.rmdir()
        return False
    try:
        os.rename(staging, directory)
    except OSError:
        if not os.path.lexists(directory):  # not another export's doing: put the old one back
            os.rename(retired, directory)
            raise
        discard(retired)  # another export's artifact is in place: replace that one next
        return False
    discard(retired)
    return True
