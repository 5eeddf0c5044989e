"""TorchScript backend: ``torch.jit.script`` of a frozen rule, saved as ``.pt``.

The archive holds TorchScript code and tensors only (no pickled Python objects) and loads with
``torch.jit.load`` in Python or ``torch::jit::load`` in C++ (libtorch). TorchScript is dynamic, so
one file of a :class:`~compiledopt.export.rule.TensorRule` serves parameters of every rank.
"""

import contextlib
import io
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from compiledopt.export.backend import Backend

__all__ = ["BACKEND", "TorchScriptBackend", "load", "load_bytes", "save"]


def save(rule: nn.Module, example: tuple, path: str, dynamic: bool) -> None:
    """Script ``rule`` and write it to ``path`` (``example`` and ``dynamic`` are not needed)."""
    with _quiet_deprecation():
        torch.jit.save(torch.jit.script(rule), path)


def load(path: str) -> Callable:
    """The scripted rule at ``path``, on the CPU."""
    with _quiet_deprecation():
        return torch.jit.load(path, map_location="cpu")


def load_bytes(data: bytes, where: str) -> Callable:
    """The scripted rule whose file content is ``data``, on the CPU (read from memory)."""
    with _quiet_deprecation():
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """TorchScript still works in torch 2.13 but warns that it is deprecated; hide that warning
    (only that one: every other warning still shows)."""
    with warnings.catch_warnings():
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
