"""The cache files that time things on this machine, and the compile times of compiled rules.

Two small JSON files in :func:`~compiledopt.cache.cache_root`, each ``{key: {name: seconds}}``:
``backend-timings.json``, the step times :mod:`~compiledopt.runtime.autotune` orders ``auto``'s
backends by, and ``compile-times.json``, how long the compiles of a compiled rule took here, which
sets the patience of ``auto``'s background compile (:mod:`~compiledopt.runtime.warming`) in a
later process. Both are caches, safe to delete. They are only ever parsed as JSON and checked
(:func:`read_timings`): an unreadable, oversized or malformed file is ignored with one log line
and replaced by the next recording; nothing in them is evaluated or loaded as code.
"""

import hashlib
import json
import logging
import math
import os
import platform
import stat
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from compiledopt.cache import cache_root

__all__ = [
    "MAX_CACHE_BYTES",
    "compile_file",
    "compile_key",
    "digest",
    "is_seconds",
    "option_attributes",
    "read_timings",
    "record_compile",
    "recorded_compile",
    "write_timings",
]

logger = logging.getLogger("compiledopt")

#: The largest cache file read, in bytes (a recording takes about 200): a larger file is
#: ignored unread.
MAX_CACHE_BYTES = 1 << 20


def digest(artifact) -> str:
    """An artifact's identity in the cache: the SHA-256 of its manifest (which lists every file's
    own SHA-256), so a changed weight or graph is a new artifact."""
    text = json.dumps(artifact.manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_timings(path: Path) -> Dict[str, Dict[str, float]]:
    """The timings recorded in the cache file ``path``, or ``{}`` when there are none or the
    file is unreadable or malformed (ignored, with one log line; the next recording replaces
    it): larger than :data:`MAX_CACHE_BYTES`, not JSON (or nested too deeply for the parser), or
    not exactly ``{key: {name: seconds}}`` with string keys and names and finite seconds
    ``>= 0``. Nothing in it is ever evaluated: it only orders backends and times compiles."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a folder, a FIFO (would block), a device
            _ignore(path, "not a regular file")
            return {}
        with open(path, "rb") as file:
            text = file.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as error:
        _ignore(path, f"unreadable ({error})")
        return {}
    if len(text) > MAX_CACHE_BYTES:
        _ignore(path, f"larger than {MAX_CACHE_BYTES} bytes")
        return {}
    try:
        data = json.loads(text)
    except RecursionError:
        _ignore(path, "nested too deeply")
        return {}
    except ValueError as error:  # not JSON, or not UTF-8
        _ignore(path, f"not JSON ({error})")
        return {}
    problem = _malformed(data)
    if problem:
        _ignore(path, problem)
        return {}
    return {key: {b: float(t) for b, t in value.items()} for key, value in data.items()}


def _malformed(data: Any) -> Optional[str]:
    """What is wrong with a parsed cache, or ``None`` when it is ``{key: {backend: seconds}}``
    (strings; finite numbers ``>= 0``, not bools)."""
    if not isinstance(data, dict):
        return f"not a JSON object but a {type(data).__name__}"
    for key, value in data.items():
        if not isinstance(value, dict):
            return f"the entry {key[:80]!r} is a {type(value).__name__}, not an object"
        for backend, seconds in value.items():
            if not is_seconds(seconds):
                shown = repr(seconds) if isinstance(seconds, float) else type(seconds).__name__
                return (
                    f"the entry {key[:80]!r} times {backend[:40]!r} as {shown}, not a finite "
                    "number of seconds >= 0"
                )
    return None


def is_seconds(value: Any) -> bool:
    """Whether ``value`` (parsed JSON) is a time in seconds: a finite number ``>= 0``."""
    if isinstance(value, float):
        return math.isfinite(value) and value >= 0
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 53


#: Files already reported as ignored: ``(path, size, mtime)`` (one warning per file version).
_REPORTED: Set[Tuple[str, int, int]] = set()


def _ignore(path: Path, why: str) -> None:
    """Log, once per version of the file at WARNING and then at DEBUG, that the cache file at
    ``path`` is ignored and why."""
    try:
        info = path.stat()
        version = (str(path), info.st_size, info.st_mtime_ns)
    except OSError:
        version = (str(path), -1, -1)
    level = logging.DEBUG if version in _REPORTED else logging.WARNING
    _REPORTED.add(version)
    logger.log(
        level,
        "timings cache %s ignored: %s (backend='auto' uses its defaults; the next recording "
        "replaces the file)",
        path,
        why,
    )


def write_timings(path: Path, key: str, timings: Dict[str, float]) -> None:
    """Record ``timings`` under ``key`` in the cache file ``path``: written to a temporary file
    and renamed into place, so a concurrent reader sees the old file or the new one."""
    data = read_timings(path)
    data[key] = timings
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".timings-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=1, sort_keys=True)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def compile_file() -> Path:
    """The file that holds how long compiled rules took to compile here (not created here)."""
    return cache_root() / "compile-times.json"


def option_attributes(
    module: Any, types: Tuple[type, ...] = (bool, int, float, str)
) -> List[Tuple[str, Any]]:
    """A module's own option attributes, sorted by name: its public attributes of the plain
    ``types`` (a transform's decay rates, flags, epsilons)."""
    return sorted(
        (name, value)
        for name, value in vars(module).items()
        if not name.startswith("_") and isinstance(value, types)
    )


def compile_key(artifact, transform, device: "torch.device | str") -> str:
    """The identity of one compiled rule on this machine: the artifact (:func:`digest`), the
    rule (the transform's class and its option attributes, so each routed variant is its own),
    the device (type, and the CPU's vector instruction set or the GPU's name), the torch and
    Python versions; hashed. A changed artifact, rule, torch, Python or instruction set is
    another key, so a compile time measured for one never sets the patience of another."""
    device = torch.device(device)
    if device.type == "cpu":
        machine = torch.backends.cpu.get_cpu_capability()
    elif device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = device.type
    options = option_attributes(transform)
    identity = [
        digest(artifact),
        type(transform).__qualname__,
        [[name, repr(value)] for name, value in options],
        device.type,
        machine,
        torch.__version__,
        platform.python_version(),
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def recorded_compile(key: str) -> Optional[float]:
    """The seconds the compiles of the rule ``key`` (:func:`compile_key`) took here last time,
    or ``None`` (never recorded, or the file is malformed: ignored with one log line)."""
    return read_timings(compile_file()).get(key, {}).get("compile_s")


def record_compile(key: str, seconds: float) -> None:
    """Record that the compiles of the rule ``key`` took ``seconds`` in all."""
    if not is_seconds(seconds):
        raise ValueError(f"Invalid seconds: {seconds!r} (a finite number >= 0)")
    write_timings(compile_file(), key, {"compile_s": float(seconds)})
