"""The roofline of each configuration: the rule's FLOPs and bytes from its own cost model.

Every transform states the cost of one step on one parameter (:meth:`Transform.cost
<compiledopt.transforms.Transform.cost>`, the update ``p ← p − lr·d`` included; float32); a
family's cost on a model is the sum over its parameters of the cost of the transforms the
family actually builds: the one catalog transform of a shape-agnostic family
(:func:`compiledopt.learned.build_transform`), the per-parameter transforms of a bound one
(:func:`compiledopt.export.spec.build_bound`, on the meta device: only their sizes matter), and
``compiledopt.transforms.AdamW`` for AdamW's rows. A rule without a cost model raises
``NotImplementedError``: it is never counted as free. The *floor* of a step is ``max(flops /
peak, bytes / bandwidth)`` with the ceilings measured in the same run; the *achieved fraction*
is ``floor / measured``.
"""

import functools
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.step_speed.plan import FAMILIES
from compiledopt.bench import ADAMW_WEIGHT_DECAY, Ceilings, step_cost
from compiledopt.transforms.base import Cost, Transform

FLOAT_BYTES = 4  # every rule here runs in float32


def family_transforms(family: str, shapes: Sequence[Sequence[int]]) -> List[Transform]:
    """The transform updating each parameter of ``shapes`` in ``family`` (``adamw`` or
    ``adamw-*``: ``compiledopt.transforms.AdamW`` with ``torch.optim.AdamW``'s weight decay)."""
    from compiledopt.transforms import AdamW

    if family == "adamw" or family.startswith("adamw-"):
        return [AdamW(weight_decay=ADAMW_WEIGHT_DECAY)] * len(shapes)
    return spec_transforms(FAMILIES[family], shapes)


def spec_transforms(spec: Dict[str, Any], shapes: Sequence[Sequence[int]]) -> List[Transform]:
    """The transforms an artifact ``spec`` builds for parameters of ``shapes``: its catalog
    transform with its own kwargs (a shape-agnostic spec), or its per-parameter transforms."""
    from compiledopt.export.spec import build_bound
    from compiledopt.learned import build_transform

    if spec["kind"] == "shape_agnostic":
        return [build_transform(spec["name"], spec.get("kwargs", {}))] * len(shapes)
    return build_bound(spec, shapes, device="meta")


@functools.lru_cache(maxsize=64)
def _cached_cost(key: str, shapes: Tuple[Tuple[int, ...], ...]) -> Cost:
    family, spec = json.loads(key)
    if spec is None:
        return step_cost(family_transforms(family, shapes), shapes)
    return step_cost(spec_transforms(spec, shapes), shapes)


def rule_cost(
    family: str, shapes: Sequence[Sequence[int]], spec: Optional[Dict[str, Any]] = None
) -> Cost:
    """FLOPs and bytes of one optimizer step of ``family`` (or of the artifact ``spec``, when
    given: its own kwargs, not the benchmark's) over parameters of ``shapes`` (the sum of each
    transform's :meth:`~compiledopt.transforms.Transform.cost`); raises ``NotImplementedError``
    for a rule without a cost model."""
    key = json.dumps([family, spec], sort_keys=True)
    return _cached_cost(key, tuple(tuple(int(d) for d in s) for s in shapes))


def ceilings_of(doc: Dict[str, Any]) -> Ceilings:
    """The run's ceilings, as recorded in its results."""
    return Ceilings(**doc["ceilings"])


def add_cost(
    row: Dict[str, Any],
    family: str,
    shapes: List[Sequence[int]],
    ceilings: Ceilings,
    spec: Optional[Dict[str, Any]] = None,
) -> None:
    """Add the roofline fields to ``row``: FLOPs and bytes a coordinate, the arithmetic
    intensity, the floor, and (for a timed row) the achieved fraction and FLOP/s. ``spec``: the
    artifact's spec, when the rule timed is an artifact's (see :func:`rule_cost`)."""
    cost = rule_cost(family, shapes, spec)
    eager = row["backend"] == "eager"
    flops = cost.eager_flops if eager else cost.flops
    n = sum(math.prod(s) for s in shapes)
    floor = ceilings.floor_s(cost, eager=eager)
    row["flops_per_coordinate"] = flops / n
    row["bytes_per_coordinate"] = cost.bytes / n
    row["arithmetic_intensity"] = flops / cost.bytes if cost.bytes else None
    row["floor_ms"] = 1e3 * floor
    if row.get("step_ms"):
        row["achieved_fraction"] = floor / (row["step_ms"] / 1e3)
        row["achieved_flops"] = flops / (row["step_ms"] / 1e3)
        row["state_bytes_per_param"] = row["state_bytes"] / row["params"]
        row["state_floats_per_param"] = row["state_bytes_per_param"] / FLOAT_BYTES
