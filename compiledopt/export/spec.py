"""Transform specifications: plain data that rebuilds a transform, so artifacts hold no code.

A spec is a JSON object. Shape-agnostic transforms from the catalog::

    {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [32]}}

and the shape-bound factories, built once per parameter binding::

    {"kind": "kronecker", "layer": "KroneckerLinear", "bias": false, "psd": true}
    {"kind": "metacurvature", "lr": 1.0}
    {"kind": "per_element_step_size", "step_size": 1.0}
    {"kind": "module", "module": "Linear"}      # ModuleTransform(torch.nn.Linear)
"""

from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import nn

import compiledopt.nn as cnn
from compiledopt.learned.catalog import CATALOG, build_transform
from compiledopt.learned.step_sizes import LearnedStepSize
from compiledopt.transforms.base import Transform
from compiledopt.transforms.kronecker import KroneckerTransform
from compiledopt.transforms.metacurvature import MetaCurvatureTransform
from compiledopt.transforms.module import ModuleTransform

Spec = Dict[str, Any]

KRONECKER_LAYERS = {
    "KroneckerLinear": cnn.KroneckerLinear,
    "KroneckerRNN": cnn.KroneckerRNN,
    "KroneckerLSTM": cnn.KroneckerLSTM,
}
MODULES = {"Linear": nn.Linear}
KINDS = ("shape_agnostic", "kronecker", "metacurvature", "per_element_step_size", "module")


def check_spec(spec: Mapping[str, Any]) -> Spec:
    """Validate ``spec`` and return it as a plain dict; ``ValueError`` names what is wrong."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a transform spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown transform spec kind {kind!r} (one of {KINDS})")
    if kind == "shape_agnostic":
        if spec.get("name") not in CATALOG:
            raise ValueError(
                f"unknown shape-agnostic transform {spec.get('name')!r} (one of {sorted(CATALOG)})"
            )
        if not isinstance(spec.get("kwargs", {}), Mapping):
            raise ValueError(f"spec kwargs must be a mapping, got {spec.get('kwargs')!r}")
    if kind == "kronecker" and spec.get("layer") not in KRONECKER_LAYERS:
        raise ValueError(
            f"unknown Kronecker layer {spec.get('layer')!r} (one of {sorted(KRONECKER_LAYERS)})"
        )
    if kind == "module" and spec.get("module") not in MODULES:
        raise ValueError(f"unknown module {spec.get('module')!r} (one of {sorted(MODULES)})")
    return dict(spec)


def build_shape_agnostic(spec: Mapping[str, Any]) -> Transform:
    """The one transform of a shape-agnostic ``spec``."""
    spec = check_spec(spec)
    if spec["kind"] != "shape_agnostic":
        raise ValueError(f"spec of kind {spec['kind']!r} is shape-bound: it needs parameters")
    return build_transform(spec["name"], spec.get("kwargs"))


def build_bound(
    spec: Mapping[str, Any],
    shapes: Sequence[Sequence[int]],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> List[Transform]:
    """One transform per parameter shape (a shape-agnostic spec shares one instance)."""
    spec = check_spec(spec)
    kind = spec["kind"]
    if kind == "shape_agnostic":
        shared = build_shape_agnostic(spec).to(device=device, dtype=dtype)
        return [shared for _ in shapes]
    transforms = []
    for shape in shapes:
        param = torch.zeros(tuple(shape), dtype=dtype, device=device)
        if kind == "kronecker":
            factory = KroneckerTransform(
                KRONECKER_LAYERS[spec["layer"]],
                bias=bool(spec.get("bias", False)),
                psd=bool(spec.get("psd", True)),
            )
            transforms.append(factory(param))
        elif kind == "module":
            transforms.append(ModuleTransform(MODULES[spec["module"]])(param))
        elif kind == "metacurvature":
            transforms.append(MetaCurvatureTransform(param, lr=float(spec.get("lr", 1.0))))
        else:
            step_size = float(spec.get("step_size", 1.0))
            transforms.append(LearnedStepSize.per_element(param, step_size))
    return transforms
