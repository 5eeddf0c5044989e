"""The names of an artifact's files, and the dtypes it may hold (shared by writer and loader)."""

import hashlib
from typing import Dict, Optional

import torch

from compiledopt.export.backend import Backend
from compiledopt.export.manifest import FORMAT, FORMAT_VERSION, WEIGHTS

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SIGNATURE",
    "WEIGHTS",
    "dtype_name",
    "file_rank",
    "graph_file",
    "sha256",
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


def graph_file(backend: Backend, rank: Optional[int] = None) -> str:
    """``rule`` plus the backend's extension, or ``rule_rank{rank}`` plus the extension."""
    return ("rule" if rank is None else f"rule_rank{rank}") + backend.extension


def file_rank(filename: str) -> int:
    """The rank of a per-rank graph file (``rule_rank3.onnx`` -> 3)."""
    return int(filename.split("_rank")[1].split(".")[0])
