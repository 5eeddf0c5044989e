"""Writing artifacts: a frozen transform exported as weights, graphs and a manifest.

Every export builds in a staging folder of its own next to the destination,
``.NAME.partial-<host>-<pid>-<time>-<random>``, and moves it into place once every file is written
and hashed: two concurrent exports to one path never mix their files (the last to finish wins,
whole). See :mod:`compiledopt.export.artifact` for the format.

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
import copy
import ctypes
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from safetensors.torch import save
from torch import Tensor, nn

from compiledopt._identity import unique_by_identity
from compiledopt._validation import check_positive
from compiledopt.export import backend as registry
from compiledopt.export import spec as specs
from compiledopt.export.backend import Backend
from compiledopt.export.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    dtype_name,
    graph_file,
    sha256,
)
from compiledopt.export.manifest import check_manifest, check_training
from compiledopt.export.rule import ModelRule, TensorRule
from compiledopt.transforms.base import ROLES, Transform

__all__ = ["clean_stale", "export_bound", "export_shape_agnostic", "recover", "replaceable"]

# Versions recorded in the manifest: distribution name -> the module it provides.
_RECORDED = {"onnx": "onnx", "onnxruntime": "onnxruntime"}


def _producer() -> Dict[str, str]:
    """The versions that wrote an artifact, read from the installed distributions' metadata
    (nothing is imported: ``"not installed"`` for an absent one)."""
    import compiledopt

    return {
        "compiledopt": compiledopt.__version__,
        "torch": torch.__version__,
        **{name: _installed_version(name, module) for name, module in _RECORDED.items()},
        "python": platform.python_version(),
    }


def _installed_version(distribution: str, module: str) -> str:
    """The version of ``distribution``, or of whichever installed distribution provides
    ``module`` (``onnxruntime`` also ships as ``onnxruntime-gpu``…), or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    for other in importlib.metadata.packages_distributions().get(module, []):
        try:
            return importlib.metadata.version(other)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _backends(names: Optional[Sequence[str]]) -> List[Backend]:
    """The backends called ``names`` (``None``: every registered one), each checked to be
    known and installed, so an export fails before any work when one is not."""
    if isinstance(names, str):
        raise ValueError(f"backends must be a sequence of names, got the string {names!r}")
    chosen = [registry.get(name) for name in (registry.names() if names is None else names)]
    for backend in chosen:
        backend.require()
    return chosen


def _rank_example(rank: int, dtype: torch.dtype) -> Tensor:
    """An example parameter of ``rank`` whose sizes are all different and greater than 1."""
    return torch.randn((5, 4, 3, 2, 6)[:rank], dtype=dtype)


def _write(
    directory: Path,
    manifest: Dict[str, Any],
    weights: Dict[str, Tensor],
    graphs: List[Tuple[Backend, str, nn.Module, tuple, bool]],
    overwrite: bool,
) -> Path:
    """Build the artifact in a fresh staging folder beside ``directory``, then move it into place
    (see the module's docstring); the staging folder is removed if anything fails."""
    recover(directory)
    _check_destination(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(directory)
    staging = Path(
        tempfile.mkdtemp(prefix=_aside_prefix(directory, "partial"), dir=directory.parent)
    )
    placed = False
    try:
        files: Dict[str, str] = {}
        data = save({k: v.detach().contiguous().clone() for k, v in weights.items()})
        (staging / WEIGHTS).write_bytes(data)
        files[WEIGHTS] = sha256(data)
        backends: Dict[str, List[str]] = {}
        for backend, filename, rule, example, dynamic in graphs:
            backend.save(rule, example, str(staging / filename), dynamic)
            backends.setdefault(backend.name, []).append(filename)
            files[filename] = sha256((staging / filename).read_bytes())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "backends": backends,
            "files": files,
            "producer": _producer(),
        }
        check_manifest(manifest, str(directory))  # never write what the loader would refuse
        for entry in os.listdir(staging):  # an exporter's leftovers: the artifact is its files
            if entry not in files:
                _remove_any(staging / entry)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an artifact is as readable as a file
        _move_into_place(staging, directory, overwrite)
        placed = True  # whatever is at the staging path now was judged there
    finally:
        if not placed and os.path.lexists(staging):
            _discard(staging)
    return directory


def _check_destination(directory: Path, overwrite: bool) -> None:
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

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        parsed = json.loads(data, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError, RecursionError):
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


def _aside_prefix(directory: Path, kind: str) -> str:
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
        if _discard(aside.path):
            removed.append(aside.path)
    return removed


def _remove_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _discard(folder: Path) -> bool:
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


def _move_into_place(staging: Path, directory: Path, overwrite: bool) -> None:
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
            _discard(staging)  # now the old artifact: only its listed files go
            return
        if _replace_in_two_steps(staging, directory):
            return
    raise FileExistsError(f"could not move the new artifact into {directory}")


def _replace_in_two_steps(staging: Path, directory: Path) -> bool:
    """Rename the old artifact aside, the new one in, and remove the old one; ``False`` if
    another export took ``directory`` meanwhile (the caller tries again)."""
    retired = Path(tempfile.mkdtemp(prefix=_aside_prefix(directory, "old"), dir=directory.parent))
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
        _discard(retired)  # another export's artifact is in place: replace that one next
        return False
    _discard(retired)
    return True


def export_bound(
    directory: str | os.PathLike,
    spec: Mapping[str, Any],
    transforms: Sequence[Transform],
    named_params: Sequence[Tuple[str, Tensor]],
    backends: Optional[Sequence[str]] = None,
    lr: float = 1e-3,
    overwrite: bool = False,
    training: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Export the whole-model rule of ``transforms`` (one per parameter) as an artifact.

    Args:
        directory: where to write the artifact (created; must not exist unless ``overwrite``).
        spec: the transform spec that rebuilds ``transforms`` (see :mod:`compiledopt.export.spec`).
        transforms: the trained transforms, one per parameter (a shared one may repeat).
        named_params: ``(name, parameter)`` pairs the rule is bound to, in order.
        backends: names of registered backends (``"torchscript"``, ``"onnx"``, ``"aoti"``);
            ``None``: all of them.
        lr: the learning rate recorded as the artifact's suggestion.
        overwrite: replace an existing ``directory``.
        training: provenance recorded as the manifest's ``training`` block (JSON values).

    Raises:
        BackendUnavailableError: a chosen backend's modules are not installed (before any
            export work).
    """
    spec = specs.check_spec(spec)
    chosen = _backends(backends)
    if len(transforms) != len(named_params):
        raise ValueError(f"{len(transforms)} transforms for {len(named_params)} parameters")
    params = [p.detach() for _, p in named_params]
    dtype = params[0].dtype
    states = [t.init_state(p) for t, p in zip(transforms, params)]
    bindings = []
    for (name, param), transform, state in zip(named_params, transforms, states):
        if param.dtype != dtype:
            raise ValueError(f"parameter {name!r} is {param.dtype}, the others {dtype}")
        names = transform.state_names()
        bindings.append(
            {
                "name": name,
                "shape": list(param.shape),
                "dtype": dtype_name(param.dtype),
                "state": [{"name": n, "shape": list(s.shape)} for n, s in zip(names, state)],
            }
        )
    counts = [len(s) for s in states]
    flat = [s for state in states for s in state]
    example = ([torch.randn_like(p) for p in params], params, flat, torch.tensor(0))
    unique = nn.ModuleList(unique_by_identity(transforms)[0])
    graphs = [
        (b, graph_file(b), ModelRule(transforms, counts, b.fused), example, False) for b in chosen
    ]
    manifest = {
        "kind": "bound",
        "transform": spec,
        "dtype": dtype_name(dtype),
        "lr": check_positive(lr, "lr"),
        "bindings": bindings,
        **({} if training is None else {"training": check_training(training)}),
    }
    return _write(Path(directory), manifest, unique.state_dict(), graphs, overwrite)


def export_shape_agnostic(
    directory: str | os.PathLike,
    spec: Mapping[str, Any],
    transform: Transform,
    backends: Optional[Sequence[str]] = None,
    ranks: Sequence[int] = (0, 1, 2, 3, 4, 5),
    lr: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    training: Optional[Mapping[str, Any]] = None,
    routes: Optional[Mapping[str, str]] = None,
) -> Path:
    """Export a shape-agnostic transform as per-tensor graphs that apply to any model.

    A backend with one graph for every rank (TorchScript) writes one graph; the others (ONNX,
    AOTInductor) one per rank in ``ranks``, with every size dynamic. ``transform`` itself is
    left as it is (the export converts a copy to ``dtype``).

    Args:
        directory: where to write the artifact (created; must not exist unless ``overwrite``).
        spec: the shape-agnostic spec that rebuilds ``transform``.
        transform: the trained shape-agnostic transform.
        backends: names of registered backends; ``None``: all of them.
        ranks: the parameter ranks (0 to 5) that per-rank backends write graphs for.
        lr: the learning rate recorded as the artifact's suggestion.
        dtype: the dtype of the graphs and weights (float32 or float64).
        overwrite: replace an existing ``directory``.
        training: provenance recorded as the manifest's ``training`` block (JSON values).
        routes: the rule of ``transform`` (one of its ``rules()``) for each parameter role
            (``matrix``, ``vector``, ``embedding``, ``head``, ``input``), recorded as the
            manifest's ``routes``; a role left out runs the transform as configured. The graphs
            compute the transform as configured: a role routed to another rule runs on the
            ``eager`` and ``compiled`` backends.

    Raises:
        BackendUnavailableError: a chosen backend's modules are not installed (before any
            export work).
        ValueError: an unknown role or rule in ``routes``.
    """
    spec = specs.check_spec(spec)
    if spec["kind"] != "shape_agnostic" or not transform.shape_agnostic:
        raise ValueError(f"{type(transform).__name__} is not shape-agnostic: use export_bound")
    if routes is not None:
        routes = _check_routes(routes, transform)
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 0 or ranks[-1] > 5:
        raise ValueError(f"Invalid ranks: {ranks} (a non-empty subset of 0..5)")
    name = dtype_name(dtype)
    chosen = _backends(backends)
    # A copy: Module.to converts in place, and an export must not change its input.
    transform = copy.deepcopy(transform).to(dtype)
    graphs = []
    for backend in chosen:
        rule = TensorRule(transform, backend.fused)
        if not backend.per_rank:
            example = _tensor_example(transform, 2, dtype)
            graphs.append((backend, graph_file(backend), rule, example, True))
            continue
        for rank in ranks:
            example = _tensor_example(transform, rank, dtype)
            graphs.append((backend, graph_file(backend, rank), rule, example, True))
    manifest = {
        "kind": "shape_agnostic",
        "transform": spec,
        "dtype": name,
        "lr": check_positive(lr, "lr"),
        "ranks": ranks,
        "state_names": transform.state_names(),
        **({} if training is None else {"training": check_training(training)}),
        **({} if not routes else {"routes": routes}),
    }
    weights = nn.ModuleList([transform]).state_dict()
    return _write(Path(directory), manifest, weights, graphs, overwrite)


def _check_routes(routes: Mapping[str, str], transform: Transform) -> Dict[str, str]:
    """``routes`` as the manifest records it: only the roles it names, each rule one of the
    transform's (``ValueError`` naming an unknown role or rule)."""
    if not isinstance(routes, Mapping):
        raise ValueError(f"Invalid routes: {routes!r} (a mapping of roles to rules)")
    rules = transform.rules()
    for role, rule in routes.items():
        if role not in ROLES:
            raise ValueError(f"Invalid routes: unknown role {role!r} (roles are {ROLES})")
        if rule not in rules:
            raise ValueError(f"Invalid routes: role {role!r} has rule {rule!r} (one of {rules})")
    return dict(routes)


def _tensor_example(transform: Transform, rank: int, dtype: torch.dtype) -> tuple:
    param = _rank_example(rank, dtype)
    return (torch.randn_like(param), param, transform.init_state(param), torch.tensor(0))
