"""Which backends can run where a FrozenOptimizer's parameters live."""

from typing import List, Optional, Tuple

from torch import Tensor

from compiledopt.export import Artifact
from compiledopt.runtime.backends import BUILT_IN_BACKENDS
from compiledopt.runtime.distributed import backend_problem, is_distributed

__all__ = ["ANY_DEVICE", "placement_problem"]

#: Backends that run on the parameters' device (the others run exported graphs on the CPU).
ANY_DEVICE = BUILT_IN_BACKENDS


def placement_problem(
    named: List[Tuple[str, Tensor]], backend: str, artifact: Artifact
) -> Optional[str]:
    """Why ``backend`` cannot run ``artifact`` on the parameters ``named`` (``(name, tensor)``
    pairs) where they live, or ``None`` when it can: the exported graphs run on the CPU, a
    distributed (``DTensor``) parameter needs the eager backend, and a bound artifact's
    whole-model rule needs all its parameters on one device."""
    problem = backend_problem(named, backend)
    if problem:
        return problem
    for name, param in named:
        if is_distributed(param) and artifact.kind == "bound":
            return (
                f"parameter {name!r} is a DTensor (sharded, e.g. by FSDP2): {artifact.path} is "
                "bound (one whole-model rule), which runs plain tensors only"
            )
        if param.device.type != "cpu" and backend not in ANY_DEVICE:
            return (
                f"the {backend} backend runs its exported graphs on the CPU, and parameter "
                f"{name!r} is on {param.device}: use backend='compiled' or 'eager' (or "
                "'auto'), which run on the parameters' device"
            )
    devices = {param.device for _, param in named}
    if artifact.kind == "bound" and len(devices) > 1:
        return (
            f"{artifact.path} is bound: its whole-model rule runs on one device, and the "
            f"parameters are on {sorted(str(d) for d in devices)}"
        )
    return None
