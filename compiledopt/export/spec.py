"""Transform specifications: plain data that rebuilds a transform, so artifacts hold no code.

A spec is a JSON object. Shape-agnostic transforms from the catalog::

    {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [32]}}

and the shape-bound factories, built once per parameter binding::

    {"kind": "kronecker", "layer": "KroneckerLinear", "bias": false, "psd": true}
    {"kind": "metacurvature", "lr": 1.0}
    {"kind": "per_element_step_size", "step_size": 1.0}
    {"kind": "module", "module": "Linear"}      # ModuleTransform(torch.nn.Linear)

Both kinds of family, with each bound kind's fields, are registered in
:mod:`compiledopt.learned.catalog`; this module validates specs against it and builds them.
"""

from typing import Any, Dict, List, Mapping, Sequence

import torch

from compiledopt.learned.catalog import BOUND, CATALOG, REQUIRED, build_transform, kinds
from compiledopt.transforms.base import Transform

__all__ = ["Spec", "build_bound", "build_shape_agnostic", "check_spec", "kinds"]

Spec = Dict[str, Any]


def check_spec(spec: Mapping[str, Any]) -> Spec:
    """Validate ``spec`` and return it as a plain dict; ``ValueError`` names what is wrong.

    The kinds and each bound kind's fields are those of :mod:`compiledopt.learned.catalog`."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a transform spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind != "shape_agnostic" and kind not in BOUND:
        raise ValueError(f"unknown transform spec kind {kind!r} (one of {kinds()})")
    if kind == "shape_agnostic":
        if spec.get("name") not in CATALOG:
            raise ValueError(
                f"unknown shape-agnostic transform {spec.get('name')!r} (one of {sorted(CATALOG)})"
            )
        if not isinstance(spec.get("kwargs", {}), Mapping):
            raise ValueError(f"spec kwargs must be a mapping, got {spec.get('kwargs')!r}")
        return dict(spec)
    fields = BOUND[kind].fields
    known = {"kind", *(field.name for field in fields)}
    unknown = sorted(str(key) for key in spec if key not in known)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} in a {kind} spec (it has {sorted(known)})")
    for field in fields:
        value = spec.get(field.name, field.default)
        if value is REQUIRED:
            raise ValueError(f"a {kind} spec needs {field.name!r}")
        if field.choices is not None and not field.check(value):
            raise ValueError(f"unknown {field.label} {value!r} (one of {sorted(field.choices)})")
        if not field.check(value):
            raise ValueError(f"{kind} spec field {field.name!r}: {value!r} is not {field.expected}")
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
    family = BOUND[kind]
    fields = {field.name: spec.get(field.name, field.default) for field in family.fields}
    return [
        family.build(torch.zeros(tuple(shape), dtype=dtype, device=device), fields)
        for shape in shapes
    ]
