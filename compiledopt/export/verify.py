"""Replay random gradients through every backend of an artifact and the eager reference."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt.export.artifact import Artifact, load_artifact
from compiledopt.transforms.base import Transform

# Sizes used for shape-agnostic artifacts: two per rank, one with a size-1 dimension.
_SIZES = {
    0: [(), ()],
    1: [(7,), (1,)],
    2: [(6, 5), (1, 9)],
    3: [(4, 3, 5), (2, 1, 3)],
    4: [(5, 3, 2, 2), (3, 1, 3, 3)],
    5: [(2, 3, 2, 2, 3), (3, 1, 2, 1, 2)],
}


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
    artifact: Artifact | str,
    steps: int = 10,
    seed: int = 0,
    backends: Optional[Sequence[str]] = None,
    *,
    trust_code: bool = False,
    trusted_keys: Optional[Sequence[Any]] = None,
) -> Dict[str, float]:
    """The max relative error of each backend against the eager reference over ``steps`` steps.

    Every backend and the reference start from the same random parameters and the transform's
    initial state, see the same random gradients, and carry their own state from step to step.
    The error of a parameter is ``max|d − d_ref|`` over its elements and the steps, divided by
    ``max|d_ref|`` over the same (the scale of its directions during the run: a per-step ratio
    would blow up at a step where a one-element direction happens to pass near zero); the result
    is the largest over parameters and test shapes.

    ``backends`` defaults to every backend of the artifact that it may load: its graphs that are
    code (TorchScript, AOTInductor) only with ``trust_code`` or a signature by one of
    ``trusted_keys`` (see :func:`~compiledopt.export.load_artifact`); naming such a backend of an
    untrusted artifact raises :class:`~compiledopt.export.UntrustedCodeError`.
    """
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact, trust_code=trust_code, trusted_keys=trusted_keys)
    elif trust_code:
        artifact = artifact.trusting()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r}")
    names = list(backends) if backends is not None else artifact.backends
    if backends is None:  # graphs that are code run only from a trusted artifact
        names = [name for name in names if artifact.may_load(name)]
    transforms = artifact.transforms()
    errors = {name: 0.0 for name in names}
    generator = torch.Generator().manual_seed(seed)
    dtype = artifact.dtype
    with torch.no_grad():
        for shapes in _cases(artifact):
            if artifact.kind == "bound":
                reference: List[Transform] = transforms
            else:
                reference = [transforms[0] for _ in shapes]
            params = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
            grads_per_step = [
                [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
                for _ in range(steps)
            ]
            initial = [t.init_state(p) for t, p in zip(reference, params)]
            expected = _replay_reference(reference, params, initial, grads_per_step)
            for name in names:
                run = artifact.runner(name)
                stepper = _step_bound if artifact.kind == "bound" else _step_per_tensor
                states = [list(s) for s in initial]
                difference = [0.0] * len(shapes)
                scale = [0.0] * len(shapes)
                for k, grads in enumerate(grads_per_step):
                    directions, states = stepper(run, grads, params, states, torch.tensor(k))
                    for i, (actual, wanted) in enumerate(zip(directions, expected[k])):
                        if wanted.numel():
                            gap = (actual.to(wanted.dtype) - wanted).abs().max().item()
                            difference[i] = max(difference[i], gap)
                            scale[i] = max(scale[i], wanted.abs().max().item())
                for gap, size in zip(difference, scale):
                    errors[name] = max(errors[name], gap / size if size > 0 else gap)
    return errors


def _replay_reference(transforms, params, states, grads_per_step) -> List[List[Tensor]]:
    out = []
    for k, grads in enumerate(grads_per_step):
        step = torch.tensor(k)
        results = [t.update(g, p, s, step) for t, g, p, s in zip(transforms, grads, params, states)]
        out.append([d for d, _ in results])
        states = [s for _, s in results]
    return out
