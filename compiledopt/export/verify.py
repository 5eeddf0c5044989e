"""Replay random gradients through every backend of an artifact and the eager reference.

Every backend steps in lockstep with the reference (one step's gradients are drawn, the
reference and each backend step on them, and are compared), so the memory used does not grow
with the number of steps; a bound artifact is replayed on its own binding shapes, which are
checked against :data:`MAX_ELEMENTS` before anything is allocated.
"""

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt.export.artifact import Artifact, ArtifactError, load_artifact
from compiledopt.export.layout import WEIGHTS
from compiledopt.transforms.base import Transform

__all__ = ["MAX_ELEMENTS", "MAX_STEPS", "check_probe_size", "verify_artifact"]

#: The most elements of parameters and state (together) that verifying a bound artifact
#: allocates per copy: its graphs take exactly the binding shapes, so a larger one is refused.
MAX_ELEMENTS = 1 << 25
#: The most steps one verification replays.
MAX_STEPS = 100_000
#: Modules whose exceptions mean a file of the artifact could not be read (its bytes verified
#: against the manifest, but not a valid graph or weights file).
_LOADERS = ("onnxruntime", "onnx", "google.protobuf", "safetensors")

# Sizes used for shape-agnostic artifacts: two per rank, one with a size-1 dimension.
_SIZES: Dict[int, List[Tuple[int, ...]]] = {
    0: [(), ()],
    1: [(7,), (1,)],
    2: [(6, 5), (1, 9)],
    3: [(4, 3, 5), (2, 1, 3)],
    4: [(5, 3, 2, 2), (3, 1, 3, 3)],
    5: [(2, 3, 2, 2, 3), (3, 1, 2, 1, 2)],
}


def check_probe_size(artifact: Artifact, limit: int = MAX_ELEMENTS) -> None:
    """Raise :class:`ArtifactError` if replaying ``artifact`` would allocate more than ``limit``
    elements of parameters and state (only a bound artifact can: its graphs take its binding
    shapes), naming the largest binding and its shape. Nothing is allocated here."""
    if artifact.kind != "bound":
        return
    total, largest, largest_size = 0, None, -1
    for binding in artifact.bindings:
        size = math.prod(binding["shape"]) + sum(math.prod(s["shape"]) for s in binding["state"])
        total += size
        if size > largest_size:
            largest, largest_size = binding, size
    if total > limit:
        assert largest is not None  # total > limit >= 0: some binding has elements
        raise ArtifactError(
            f"{artifact.path}: verifying it would allocate {total:,} elements of parameters and "
            f"state (binding {largest['name']!r} has shape {tuple(largest['shape'])}, "
            f"{largest_size:,} with its state); the limit is {limit:,}: its graphs take exactly "
            "these shapes, so it cannot be probed smaller"
        )


def _foreign(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return any(module == m or module.startswith(m + ".") for m in _LOADERS)


def _unreadable(artifact: Artifact, what: str, error: BaseException) -> ArtifactError:
    first = (str(error).strip().splitlines() or [""])[0]
    kind = type(error).__name__
    return ArtifactError(f"{artifact.path}: {what} cannot be read ({kind}: {first})")


def _cases(artifact: Artifact) -> List[List[Tuple[int, ...]]]:
    """Lists of parameter shapes to replay: the bindings, or per-rank sizes."""
    if artifact.kind == "bound":
        return [[tuple(b["shape"]) for b in artifact.bindings]]
    return [[_SIZES[r][k]] for r in artifact.manifest["ranks"] for k in (0, 1)]


def _step_bound(run: Callable, grads, params, states, step):
    directions, flat = run(grads, params, [s for state in states for s in state], step)
    out, offset = [], 0
    for state in states:
        out.append(list(flat[offset : offset + len(state)]))
        offset += len(state)
    return list(directions), out


def _step_per_tensor(run: Callable, grads, params, states, step):
    results = [run(g, p, s, step) for g, p, s in zip(grads, params, states)]
    return [d for d, _ in results], [list(s) for _, s in results]


def verify_artifact(
    artifact: "Artifact | str | os.PathLike",
    steps: int = 10,
    seed: int = 0,
    backends: Optional[Sequence[str]] = None,
    *,
    trust_code: bool = False,
    trusted_keys: Optional[Sequence[Any]] = None,
    max_elements: int = MAX_ELEMENTS,
) -> Dict[str, float]:
    """The max relative error of each backend against the eager reference over ``steps`` steps.

    Every backend and the reference start from the same random parameters and the transform's
    initial state, see the same random gradients, and carry their own state from step to step.
    The error of a parameter is ``max|d − d_ref|`` over its elements and the steps, divided by
    ``max|d_ref|`` over the same (the scale of its directions during the run: a per-step ratio
    would blow up at a step where a one-element direction happens to pass near zero); the result
    is the largest over parameters and test shapes.

    A direction that is not finite (NaN or infinite), in a backend's result or in the
    reference's, is never a match: that backend's error is ``nan``, which no tolerance accepts
    (compare with ``error <= tolerance``, false for ``nan``).

    ``backends`` defaults to every backend of the artifact that it may load: its graphs that are
    code (TorchScript, AOTInductor) only with ``trust_code`` or a signature by one of
    ``trusted_keys`` (see :func:`~compiledopt.export.load_artifact`); naming such a backend of an
    untrusted artifact raises :class:`~compiledopt.export.UntrustedCodeError`.

    Raises:
        ValueError: ``steps`` is not an integer in ``[1, MAX_STEPS]``.
        ArtifactError: the artifact does not load; a bound artifact's bindings and state hold
            more than ``max_elements`` elements (:func:`check_probe_size`, before anything is
            allocated); its weights or a graph cannot be read by safetensors or onnxruntime.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"Invalid steps: {steps!r} (an integer in [1, {MAX_STEPS}])")
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact, trust_code=trust_code, trusted_keys=trusted_keys)
    elif trust_code:
        artifact = artifact.trusting()
    check_probe_size(artifact, max_elements)
    names = list(backends) if backends is not None else artifact.backends
    if backends is None:  # graphs that are code run only from a trusted artifact
        names = [name for name in names if artifact.may_load(name)]
    try:
        transforms = artifact.transforms()
    except Exception as error:
        if not _foreign(error):
            raise
        raise _unreadable(artifact, WEIGHTS, error) from None
    errors = {name: 0.0 for name in names}
    generator = torch.Generator().manual_seed(seed)
    dtype = artifact.dtype
    stepper = _step_bound if artifact.kind == "bound" else _step_per_tensor
    with torch.no_grad():
        runners = {name: _runner(artifact, name) for name in names}
        for shapes in _cases(artifact):
            if artifact.kind == "bound":
                reference: List[Transform] = transforms
            else:
                reference = [transforms[0] for _ in shapes]
            params = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
            expected_states = [t.init_state(p) for t, p in zip(reference, params)]
            states = {name: [list(s) for s in expected_states] for name in names}
            difference = {name: [0.0] * len(shapes) for name in names}
            scale = [0.0] * len(shapes)
            for k in range(steps):
                grads = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
                step = torch.tensor(k)
                results = [
                    t.update(g, p, s, step)
                    for t, g, p, s in zip(reference, grads, params, expected_states)
                ]
                expected = [d for d, _ in results]
                expected_states = [s for _, s in results]
                for i, wanted in enumerate(expected):
                    scale[i] = _worst(scale[i], _largest(wanted))
                for name in names:
                    directions, states[name] = stepper(
                        runners[name], grads, params, states[name], step
                    )
                    for i, (actual, wanted) in enumerate(zip(directions, expected)):
                        gap = _largest(actual.to(wanted.dtype) - wanted)
                        if not _finite(actual):
                            gap = math.nan  # a non-finite direction never matches
                        difference[name][i] = _worst(difference[name][i], gap)
            for name in names:
                for gap, size in zip(difference[name], scale):
                    relative = gap / size if size > 0 else gap
                    errors[name] = _worst(errors[name], relative)
    return errors


def _runner(artifact: Artifact, name: str) -> Callable:
    """``artifact.runner(name)``, a file that onnxruntime cannot read reported as an
    :class:`ArtifactError` naming the backend's files (a per-rank graph loaded at its first
    call is reported there too)."""
    files = ", ".join(artifact.manifest["backends"].get(name, [])) or name
    try:
        run = artifact.runner(name)
    except Exception as error:
        if not _foreign(error):
            raise
        raise _unreadable(artifact, f"its {name} graph ({files})", error) from None

    def checked(*args: Any) -> Any:
        try:
            return run(*args)
        except Exception as error:
            if not _foreign(error):
                raise
            raise _unreadable(artifact, f"its {name} graph ({files})", error) from None

    return checked


def _largest(tensor: Tensor) -> float:
    """``max |tensor|`` (``nan`` if any element is NaN, ``inf`` if one is infinite; ``0.0`` for
    an empty tensor)."""
    if tensor.numel() == 0:
        return 0.0
    return tensor.abs().max().item()


def _finite(tensor: Tensor) -> bool:
    return tensor.numel() == 0 or bool(torch.isfinite(tensor).all())


def _worst(a: float, b: float) -> float:
    """The larger of two errors, NaN-propagating (``max(0.0, nan)`` is ``0.0``: not here), and
    an infinite error made ``nan`` (an infinite direction is no more a match than a NaN one)."""
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return math.nan
    return max(a, b)
