"""TorchScript backend: ``torch.jit.script`` of a frozen rule, saved as ``.pt``.

The archive holds TorchScript code and tensors only (no pickled Python objects) and loads with
``torch.jit.load`` in Python or ``torch::jit::load`` in C++ (libtorch). TorchScript is dynamic, so
one file of a :class:`~compiledopt.export.rule.TensorRule` serves parameters of every rank.
"""

import contextlib
import io
import threading
import warnings
import zipfile
from typing import Callable, Iterator

import torch
from torch import nn

from compiledopt.export.backend import Backend

__all__ = ["BACKEND", "TorchScriptBackend", "load", "load_bytes", "save", "without_debug_records"]


def save(rule: nn.Module, example: tuple, path: str, dynamic: bool) -> None:
    """Script ``rule`` and write it to ``path`` (``example`` and ``dynamic`` are not needed),
    without its debug records (:func:`without_debug_records`)."""
    buffer = io.BytesIO()
    with _one_at_a_time():
        torch.jit.save(torch.jit.script(rule), buffer)
    with open(path, "wb") as handle:
        handle.write(without_debug_records(buffer.getvalue()))


def without_debug_records(archive: bytes) -> bytes:
    """The TorchScript archive ``archive`` without its ``*.debug_pkl`` records: the source
    ranges of the scripted code, which name the exporting machine's files by absolute path (two
    thirds of a rule's bytes). Loading and running never read them; an error raised inside the
    graph then quotes no source line. Every other record is copied as it is."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    kept = io.BytesIO()
    with zipfile.ZipFile(kept, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if not info.filename.endswith(".debug_pkl"):
                target.writestr(info, source.read(info))
    return kept.getvalue()


def load(path: str) -> Callable:
    """The scripted rule at ``path``, on the CPU."""
    with _one_at_a_time():
        return torch.jit.load(path, map_location="cpu")


def load_bytes(data: bytes, where: str) -> Callable:
    """The scripted rule whose file content is ``data``, on the CPU (read from memory)."""
    with _one_at_a_time():
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


#: TorchScript's compiler and loader share process-wide type registries that are not safe to use
#: from two threads at once (two exports in threads could fail inside ``torch.jit.script``), and
#: ``warnings.catch_warnings`` swaps process-wide state too: one call at a time in this process.
_TORCHSCRIPT_LOCK = threading.RLock()


@contextlib.contextmanager
def _one_at_a_time() -> Iterator[None]:
    """Hold the process's TorchScript lock, and hide the warning that TorchScript is deprecated
    (it still works in torch 2.13; only that warning is hidden: every other one still shows)."""
    with _TORCHSCRIPT_LOCK, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.\w+.* is deprecated", category=DeprecationWarning
        )
        yield


class TorchScriptBackend(Backend):
    """``rule.pt``: one scripted program for every rank; needs only torch."""

    name = "torchscript"
    extension = ".pt"
    per_rank = False
    carries_code = True
    fused = False
    requires = ()
    # The module's functions above (staticmethod: they take no backend instance).
    save = staticmethod(save)
    load = staticmethod(load)
    load_bytes = staticmethod(load_bytes)


BACKEND = TorchScriptBackend()
