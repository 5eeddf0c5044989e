"""Freezing and exporting transforms as self-describing artifacts (TorchScript, ONNX, AOTI)."""

from importlib import import_module

from compiledopt.export import backend
from compiledopt.export.backend import Backend, BackendUnavailableError, register, unregister

# The backends, in this order. A new backend is one module that defines ``BACKEND`` (an instance
# of a Backend subclass) and one line here; everything else finds it through the registry
# (compiledopt.export.backend.get, .names), when it runs.
backend.register(import_module("compiledopt.export.torchscript").BACKEND)
backend.register(import_module("compiledopt.export.onnx").BACKEND)
backend.register(import_module("compiledopt.export.aoti").BACKEND)

from compiledopt.export.artifact import (  # noqa: E402
    Artifact,
    ArtifactError,
    UntrustedCodeError,
    load_artifact,
)
from compiledopt.export.rule import ModelRule, TensorRule, freeze_transform  # noqa: E402
from compiledopt.export.spec import build_bound, build_shape_agnostic, check_spec  # noqa: E402
from compiledopt.export.writer import export_bound, export_shape_agnostic  # noqa: E402

__all__ = [
    "BACKENDS",
    "Artifact",
    "ArtifactError",
    "Backend",
    "BackendUnavailableError",
    "ModelRule",
    "TensorRule",
    "UntrustedCodeError",
    "build_bound",
    "build_shape_agnostic",
    "check_spec",
    "export_bound",
    "export_shape_agnostic",
    "freeze_transform",
    "load_artifact",
    "register",
    "unregister",
]


def __getattr__(name: str):
    # BACKENDS: the registered backends' names as they are now (backend.names()), so that a
    # backend registered after import is listed.
    if name == "BACKENDS":
        return backend.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
