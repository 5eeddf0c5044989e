"""Freezing and exporting transforms as self-describing artifacts (TorchScript, ONNX, AOTI)."""

from compiledopt.export.artifact import (
    BACKENDS,
    Artifact,
    ArtifactError,
    export_bound,
    export_shape_agnostic,
    load_artifact,
)
from compiledopt.export.rule import ModelRule, TensorRule, freeze_transform
from compiledopt.export.spec import build_bound, build_shape_agnostic, check_spec

__all__ = [
    "BACKENDS",
    "Artifact",
    "ArtifactError",
    "ModelRule",
    "TensorRule",
    "build_bound",
    "build_shape_agnostic",
    "check_spec",
    "export_bound",
    "export_shape_agnostic",
    "freeze_transform",
    "load_artifact",
]
