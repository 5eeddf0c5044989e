"""The on-disk store of compiled packages (see :mod:`~compiledopt.runtime.packages`): one
folder per form, each package ``<name>.pt2`` beside its record ``<name>.json`` (the SHA-256 of
its bytes, its guards and its output structure).

Records are only ever parsed as JSON of a fixed shape (:func:`read_record`); a package is loaded
from the very bytes whose SHA-256 matched its record (:func:`load_entry`), through a private
temporary copy. Anything that does not check out is ignored with one log line.
"""

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt.export.layout import read_regular
from compiledopt.export.tracing import quiet

__all__ = [
    "FORMAT",
    "MAX_RECORD_BYTES",
    "RELATIONS",
    "Entry",
    "Guard",
    "discard",
    "load_entry",
    "open_package",
    "read_entries",
    "read_record",
    "rebuild",
    "write_json",
]

logger = logging.getLogger("compiledopt")

#: The version of the store's layout and record format (part of every key).
FORMAT = 1
#: The largest package read, in bytes (the packaged default's are about 2 MB).
MAX_PACKAGE_BYTES = 1 << 30
#: The largest record file read, in bytes (one is about 1 KB).
MAX_RECORD_BYTES = 1 << 16
#: The relations a :class:`Guard` may state.
RELATIONS = ("==", "!=", "<=", "<")


class Guard(NamedTuple):
    """``Σ coefficient · size(leaf, dim) + constant  <relation>  0`` over a call's input sizes
    (``leaf``: the index of a tensor among the flattened inputs)."""

    terms: Tuple[Tuple[int, int, int], ...]
    constant: int
    relation: str

    def holds(self, sizes: Sequence[Sequence[int]]) -> bool:
        total = self.constant
        for leaf, dim, coefficient in self.terms:
            if leaf >= len(sizes) or dim >= len(sizes[leaf]):
                return False
            total += coefficient * sizes[leaf][dim]
        if self.relation == "==":
            return total == 0
        if self.relation == "!=":
            return total != 0
        return total <= 0 if self.relation == "<=" else total < 0

    def to_json(self) -> list:
        return [[list(t) for t in self.terms], self.constant, self.relation]

    @staticmethod
    def from_json(value: Any) -> "Guard":
        """The guard ``value`` states; ``ValueError`` unless it is exactly
        ``[[[leaf, dim, coefficient], …], constant, relation]`` with ints and a known relation."""
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], list)):
            raise ValueError(f"not a guard: {value!r:.80}")
        terms, constant, relation = value
        if not (_is_int(constant) and relation in RELATIONS):
            raise ValueError(f"not a guard: {value!r:.80}")
        parsed = []
        for term in terms:
            if not (isinstance(term, list) and len(term) == 3 and all(map(_is_int, term))):
                raise ValueError(f"not a guard term: {term!r:.80}")
            if term[0] < 0 or term[1] < 0:
                raise ValueError(f"not a guard term: {term!r:.80}")
            parsed.append((term[0], term[1], term[2]))
        return Guard(tuple(parsed), constant, relation)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 62


def rebuild(structure: Any, flat: List[Tensor], top: bool = True) -> Any:
    """The nested outputs from ``flat`` (consumed from the front), as :func:`_structure` says."""
    if structure == 0:
        return flat.pop(0)
    children = [rebuild(child, flat, False) for child in structure]
    return tuple(children) if top else children


def check_structure(value: Any, depth: int = 0) -> None:
    if value == 0 and not isinstance(value, bool):
        return
    if not isinstance(value, list) or depth > 4 or len(value) > 4096:
        raise ValueError(f"not an output structure: {value!r:.80}")
    for child in value:
        check_structure(child, depth + 1)


class Entry(NamedTuple):
    """One stored package: its file, its bytes' SHA-256, guards and output structure."""

    path: Path
    sha256: str
    guards: Tuple[Guard, ...]
    structure: Any


def read_entries(folder: Path) -> List[Entry]:
    """The packages stored for one form; a malformed record or a package missing is ignored."""
    entries = []
    try:
        # (names starting with a dot are files being written)
        names = sorted(p for p in folder.iterdir() if p.suffix == ".json" and p.name[0] != ".")
    except OSError:
        return []
    for record in names:
        try:
            entries.append(read_record(record))
        except (OSError, ValueError) as error:
            logger.warning("compiled package %s ignored and removed: %s", record, error)
            discard(record)
    return entries


def read_record(record: Path) -> Entry:
    """The entry a record describes; ``ValueError`` unless it is a regular file of at most
    :data:`MAX_RECORD_BYTES` holding exactly the JSON :func:`~compiledopt.runtime.packages.build`
    writes."""
    data = _read(record, MAX_RECORD_BYTES)
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"not JSON ({error})") from None
    if not (isinstance(value, dict) and value.get("format") == FORMAT):
        raise ValueError("not a package record of this version")
    sha, guards = value.get("sha256"), value.get("guards")
    if not (isinstance(sha, str) and len(sha) == 64 and isinstance(guards, list)):
        raise ValueError("no SHA-256 or guards")
    check_structure(value.get("structure"))
    parsed = tuple(Guard.from_json(g) for g in guards)
    return Entry(record.with_suffix(".pt2"), sha, parsed, value["structure"])


def load_entry(entry: Entry) -> Callable[[List[Tensor]], List[Tensor]]:
    """The package's ``boxed_run``, loaded from the bytes whose SHA-256 matched its record
    (``ValueError`` otherwise). Loaded with AOTInductor's package loader itself: the public
    :func:`torch._inductor.aoti_load_package` first compiles test programs to find this CPU's
    instruction set (a second per process), which the form's key already fixes."""
    data = _read(entry.path, MAX_PACKAGE_BYTES)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ValueError("its bytes do not match their recorded SHA-256")
    with tempfile.TemporaryDirectory(prefix="compiledopt-package-") as private:
        copy = os.path.join(private, "rule.pt2")
        with open(copy, "wb") as file:
            file.write(data)
        return open_package(copy)


def _read(path: Path, limit: int) -> bytes:
    """The bytes of a regular file (read as an artifact's files are: no link followed, no FIFO
    opened, at most ``limit`` bytes); ``ValueError`` otherwise, ``FileNotFoundError`` if gone."""
    data = read_regular(path.parent, path.name, limit)
    if data is None:
        raise FileNotFoundError(f"{path} is gone")
    return data


def open_package(path: str) -> Callable[[List[Tensor]], List[Tensor]]:
    """The ``boxed_run`` of the package at ``path`` (a private copy of checked bytes)."""
    with quiet():
        loader = getattr(torch._C, "_aoti", None)
        if loader is not None and hasattr(loader, "AOTIModelPackageLoader"):
            return loader.AOTIModelPackageLoader(path, "model", False, 1, -1).boxed_run
        from torch._inductor import aoti_load_package

        return aoti_load_package(path).loader.boxed_run


def discard(package: Path) -> None:
    """Remove a package that did not check out, and its record (what cannot be removed stays,
    and is ignored again)."""
    for path in (package.with_suffix(".pt2"), package.with_suffix(".json")):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def write_json(path: Path, value: Any) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".record-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(value, file)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
