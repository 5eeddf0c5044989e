"""The names of an artifact's files, the dtypes it may hold (shared by writer and loader), and
how the loader reads a listed file and a weights file's header."""

import errno
import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt._validation import strict_json
from compiledopt.export.backend import Backend
from compiledopt.export.manifest import FORMAT, FORMAT_VERSION, WEIGHTS, ArtifactError

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SAFETENSORS_DTYPES",
    "SIGNATURE",
    "WEIGHTS",
    "check_weights_fit",
    "dtype_name",
    "file_rank",
    "graph_file",
    "parse_manifest",
    "read_regular",
    "sha256",
    "state_entries",
    "weights_header",
]

MANIFEST = "manifest.json"
#: The detached signature of ``manifest.json`` (see :mod:`compiledopt.export.signing`).
SIGNATURE = "signature.json"
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def sha256(data: bytes) -> str:
    """The SHA-256 digest of ``data``, as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` or ``"float64"``; ``ValueError`` for any other dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"artifacts support float32 and float64, got {dtype}")


def state_entries(names: Sequence[str], state: Sequence[Tensor]) -> List[Dict[str, Any]]:
    """A bound manifest's ``bindings[i].state``: the name and shape of each state tensor a
    transform keeps, from its :meth:`~compiledopt.transforms.base.Transform.state_names` and
    ``init_state`` (a state tensor it leaves unnamed is not listed)."""
    return [{"name": name, "shape": list(tensor.shape)} for name, tensor in zip(names, state)]


def graph_file(backend: Backend, rank: Optional[int] = None) -> str:
    """``rule`` plus the backend's extension, or ``rule_rank{rank}`` plus the extension."""
    return ("rule" if rank is None else f"rule_rank{rank}") + backend.extension


def file_rank(filename: str) -> int:
    """The rank of a per-rank graph file (``rule_rank3.onnx`` -> 3)."""
    return int(filename.split("_rank")[1].split(".")[0])


#: The bytes read from a file at once after its first read (the first reads its whole size).
_CHUNK = 1 << 20
#: What a file that is not a regular file is, for messages (``stat.S_IFMT`` -> words).
_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)  # a symbolic link swapped in after the check fails to open
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in after the check does not block the open
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def parse_manifest(data: bytes, where: "str | os.PathLike[str]") -> Any:
    """A manifest's bytes ``data`` parsed as strict JSON (UTF-8, no NaN, no key named twice:
    :func:`~compiledopt._validation.strict_json`), or :class:`ArtifactError` naming ``where``
    (the artifact) and what breaks it. The schema is
    :func:`~compiledopt.export.manifest.check_manifest`'s."""
    try:
        return strict_json(data)
    except ValueError as error:  # UnicodeDecodeError and json.JSONDecodeError included
        hint = " (truncated?)" if isinstance(error, json.JSONDecodeError) else ""
        raise ArtifactError(f"{where}: {MANIFEST} is not valid JSON{hint}: {error}") from None


def read_regular(folder: Path, name: str, limit: int) -> Optional[bytes]:
    """The bytes of the regular file ``folder / name``, at most ``limit`` of them; ``None`` if it
    does not exist.

    Anything but a regular file is refused before it is opened (``lstat``: a symbolic link, even
    to a file, a FIFO, a device, a socket, a directory), and so is a file larger than ``limit``.
    The file is opened without following links and without blocking, and the opened descriptor
    is checked again (a file swapped between the check and the open is refused); it is read one
    size at a time and never past ``limit + 1`` bytes, so memory stays within the limit whatever
    the file does while it is read.

    Raises:
        ArtifactError: ``f"{folder}: {name} is ..."`` naming what the file is, or its size.
    """
    file = folder / name
    try:
        _check_regular(os.lstat(file), folder, name, limit)
        descriptor = os.open(file, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a link created after the lstat
            raise ArtifactError(
                f"{folder}: {name} is a symbolic link, not a regular file"
            ) from error
        raise ArtifactError(f"{folder}: cannot read {name} ({error.strerror})") from error
    try:
        size = _check_regular(os.fstat(descriptor), folder, name, limit)
        parts: List[bytes] = []
        total, want = 0, size + 1  # one byte more than its size: a file that grew is noticed
        while True:
            part = os.read(descriptor, min(want, limit + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
            if total > limit:
                raise ArtifactError(
                    f"{folder}: {name} is larger than {limit} bytes (it grew while it was read)"
                )
            want = _CHUNK
    except OSError as error:
        raise ArtifactError(f"{folder}: cannot read {name} ({error.strerror})") from error
    finally:
        os.close(descriptor)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _check_regular(info: os.stat_result, folder: Path, name: str, limit: int) -> int:
    """``info``'s size, if it is a regular file of at most ``limit`` bytes."""
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
        raise ArtifactError(f"{folder}: {name} is {kind}, not a regular file")
    if info.st_size > limit:
        raise ArtifactError(
            f"{folder}: {name} is {info.st_size} bytes, over the limit of {limit} bytes"
        )
    return info.st_size


#: safetensors dtype names -> bytes per element (the dtypes safetensors writes).
_ITEMSIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


#: torch dtypes -> their safetensors names (the dtypes a transform's weights may have).
SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
    torch.int64: "I64", torch.float64: "F64",
}  # fmt: skip


def weights_header(data: bytes, where: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """The tensors a safetensors file holds (name -> its safetensors dtype name, such as
    ``"F32"``, and its shape), read from its header alone and checked against its size: every
    tensor's bytes lie inside the file and match its dtype and shape, so the counts and sizes
    returned are what the file can really hold. The header is strict JSON (UTF-8, no tensor
    named twice: see :func:`~compiledopt._validation.strict_json`), so what is checked here is
    what safetensors loads.

    Raises:
        ArtifactError: ``f"{where}: ..."`` naming what is malformed.
    """
    if len(data) < 8:
        raise ArtifactError(f"{where}: not a safetensors file ({len(data)} bytes, no header)")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ArtifactError(
            f"{where}: not a safetensors file (a header of {length} bytes in a file of {len(data)})"
        )
    try:  # strict: a tensor named twice is refused (which entry a reader keeps is its choice)
        header = strict_json(data[8 : 8 + length])
    except ValueError as error:
        raise ArtifactError(f"{where}: its safetensors header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: its safetensors header is not a JSON object")
    room = len(data) - 8 - length
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            itemsize = _ITEMSIZES[dtype]
            if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)):
                raise ValueError("sizes and offsets must be ints >= 0")
        except (TypeError, KeyError, ValueError) as error:
            raise ArtifactError(
                f"{where}: malformed safetensors entry {name!r} ({type(error).__name__}: "
                f"{str(error)[:100]})"
            ) from error
        if not begin <= end <= room or end - begin != math.prod(shape) * itemsize:
            raise ArtifactError(
                f"{where}: safetensors entry {name!r} ({dtype}, shape {shape}) does not fit "
                f"bytes {begin}..{end} of the {room} it has"
            )
        tensors[name] = (dtype, tuple(shape))
    return tensors


def check_weights_fit(
    implied: Mapping[str, Tensor],
    held: Mapping[str, Tuple[str, Tuple[int, ...]]],
    artifact: str,
    where: str,
) -> None:
    """Raise :class:`ArtifactError` unless the weights file ``where`` of ``artifact`` holds
    (``held``, from :func:`weights_header`) exactly the tensors a transform's spec implies
    (``implied``: its state dict, built on the ``meta`` device): the same names, and each of the
    same dtype and shape (loading a state dict would cast a tensor of another dtype silently)."""
    if set(implied) != set(held):
        missing, extra = sorted(set(implied) - set(held)), sorted(set(held) - set(implied))
        raise ArtifactError(
            f"{artifact}: weights do not fit the transform spec ({where} lacks "
            f"{len(missing)} tensors: {_few(missing)}; has {len(extra)} unexpected: "
            f"{_few(extra)})"
        )
    for key, tensor in implied.items():
        dtype, shape = held[key]
        if tuple(tensor.shape) != shape:
            raise ArtifactError(
                f"{artifact}: weights do not fit the transform spec: {key!r} has shape "
                f"{shape} in {where}, the spec makes it {tuple(tensor.shape)}"
            )
        expected = SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
        if dtype != expected:
            raise ArtifactError(
                f"{artifact}: weights do not fit the transform spec: {key!r} is {dtype} in "
                f"{where}, the spec makes it {expected} ({tensor.dtype})"
            )


def _few(names: List[str]) -> str:
    """At most five names, then how many more."""
    shown = ", ".join(repr(n[:80]) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"
