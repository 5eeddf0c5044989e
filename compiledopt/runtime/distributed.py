"""Distributed (``DTensor``) parameters in a FrozenOptimizer step.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) or tensor parallelism every parameter, its
gradient and the optimizer's state are ``DTensor``: each rank holds a shard of one logical
tensor. A learned rule's per-tensor statistics (``max|x|``, ``mean(x²)``, norms) must be over the
whole logical tensor, as in one process, and every rank must take the same decisions (skip a
step, raise). This module holds what that takes:

* :func:`run_rule` calls a rule ``rule(grad, param, state, *scalars)`` on ``DTensor`` inputs:
  DTensor's reductions produce partial results that are all-reduced where they are used, so the
  rule computes the statistics of the logical tensor; its own weights and the plain tensors it
  makes (the step count, index grids) count as replicated on every rank. A parameter whose
  shards are uneven (a sharded size that the mesh does not divide, or an empty shard) is gathered
  first, computed whole on every rank, and its results sharded back.
* :func:`all_finite` and :func:`finite_flags`: the finiteness of a step's tensors, from the local
  shards and one all-reduce (``MIN``) per device mesh, so that all ranks agree.
* :func:`backend_problem`: only the eager backend runs ``DTensor`` parameters (the compiled and
  exported graphs take plain tensors); any other is refused when the optimizer is built.
* :func:`place_like`: a loaded state tensor sharded as its parameter.

Every function is the identity, or the plain computation, for plain tensors, and none needs
``torch.distributed`` to be initialised unless a ``DTensor`` is involved.
"""

import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.tensor import DTensor

__all__ = [
    "all_finite",
    "backend_problem",
    "evenly_sharded",
    "finite_flags",
    "is_distributed",
    "local",
    "place_like",
    "replicate_like",
    "row_sums",
    "run_rule",
]

#: The only runtime backend that runs ``DTensor`` parameters.
DTENSOR_BACKEND = "eager"


@functools.cache
def _dtensor_type() -> Any:
    """The ``DTensor`` class (imported once: ``is_distributed`` runs per parameter per step)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_distributed(tensor: Any) -> "TypeGuard[DTensor]":
    """Whether ``tensor`` is a ``DTensor`` (a shard of a logical tensor spread over a mesh)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of ``tensor`` (``DTensor.to_local()``, no communication), or
    ``tensor`` itself when it is a plain tensor."""
    return tensor.to_local() if is_distributed(tensor) else tensor


def replicate_like(value: Any, like: Tensor) -> Any:
    """``value``, a plain tensor, as a ``DTensor`` replicated on every rank of ``like``'s device
    mesh (each rank keeps its own copy as its local tensor, moved to ``like``'s local device; no
    communication, so every rank must hold the same value, as a step count does).

    Returned unchanged: a ``value`` that is not a tensor, or is a ``DTensor`` already, and any
    ``value`` when ``like`` is a plain tensor.
    """
    if not is_distributed(like) or not isinstance(value, Tensor) or is_distributed(value):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(
        value.to(like.to_local().device), mesh, [Replicate()] * mesh.ndim, run_check=False
    )


def evenly_sharded(tensor: Tensor) -> bool:
    """Whether every sharded dimension of ``tensor`` is divided evenly by the mesh dimensions
    that shard it (all shards the same size, none empty). ``True`` for a plain tensor and for a
    replicated ``DTensor``.

    DTensor refuses some view operations (flattening a tensor unevenly sharded along a dimension
    it merges) and a reduction such as ``max`` fails on an empty shard, so :func:`run_rule`
    gathers an unevenly sharded tensor first.
    """
    if not is_distributed(tensor):
        return True
    mesh = tensor.device_mesh
    parts: Dict[int, int] = {}
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            # Shard and its strided variant have .dim; the Placement base class does not.
            dim = placement.dim % max(tensor.dim(), 1)  # type: ignore[attr-defined]
            parts[dim] = parts.get(dim, 1) * mesh.size(mesh_dim)
    return all(tensor.shape[dim] % count == 0 for dim, count in parts.items())


def place_like(value: Any, like: Tensor) -> Any:
    """``value`` laid out as ``like``, a parameter: for a ``DTensor`` ``like`` of the same shape,
    a plain ``value`` (the whole logical tensor, as a one-process checkpoint holds it; every rank
    must hold the same) is sharded as ``like`` is (each rank keeps its own shard, no
    communication), and a ``DTensor`` ``value`` with other placements is redistributed to
    ``like``'s (``like``'s mesh, which must be the value's). Anything else, and any ``value``
    when ``like`` is a plain tensor, is returned unchanged.
    """
    if not is_distributed(like) or not isinstance(value, Tensor) or value.shape != like.shape:
        return value
    if is_distributed(value):
        if tuple(value.placements) == tuple(like.placements):
            return value
        return value.redistribute(like.device_mesh, like.placements)
    from torch.distributed.tensor import distribute_tensor

    device = like.to_local().device
    return distribute_tensor(
        value.to(device), like.device_mesh, like.placements, src_data_rank=None
    )


def _replicated(value: Any) -> Any:
    """A ``DTensor`` ``value`` redistributed to ``Replicate`` on every mesh dimension (an
    all-gather of its shards); anything else unchanged."""
    if not is_distributed(value):
        return value
    from torch.distributed.tensor import Replicate

    mesh = value.device_mesh
    return value.redistribute(mesh, [Replicate()] * mesh.ndim)


def _settled(value: Any) -> Any:
    """A ``DTensor`` ``value`` with its pending reductions (``Partial`` placements) carried out,
    so it is ``Replicate`` there: a state tensor is kept as values, never as a pending sum, which
    ``torch.distributed.checkpoint`` could not save. Anything else unchanged."""
    if not is_distributed(value) or not any(p.is_partial() for p in value.placements):
        return value
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in value.placements]
    return value.redistribute(value.device_mesh, placements)


def run_rule(
    rule: Callable[..., Tuple[Tensor, Sequence[Tensor]]],
    grad: Tensor,
    param: Tensor,
    state: Sequence[Tensor],
    *scalars: Any,
) -> Tuple[Tensor, List[Tensor]]:
    """``rule(grad, param, state, *scalars) -> (direction, new_state)`` for one parameter,
    computed over the whole logical tensor when ``param`` is a ``DTensor``.

    For a plain ``param`` this is ``rule(grad, param, state, *scalars)`` with the new state as a
    list. For a ``DTensor`` ``param`` (``grad`` and ``state`` are ``DTensor`` too, normally with
    its placements; a plain state tensor counts as replicated):

    * ``scalars`` (the step count, a seed: plain tensors, the same on every rank) are made
      replicated ``DTensor`` (:func:`replicate_like`);
    * the rule runs under DTensor's ``implicit_replication``: the plain tensors it uses, its
      weights, the constants and index grids it makes, count as replicated, and its reductions
      are over the logical tensor (DTensor all-reduces their partial results), so it computes
      what one process computes on the whole tensors, up to the order of floating-point sums;
    * a ``param`` that is not :func:`evenly_sharded` is gathered first (``grad``, ``param`` and
      ``state`` replicated on every rank: an all-gather each, and the whole tensors in memory
      for the call), computed whole, and its direction and new state sharded back (no
      communication);
    * the direction and every new state tensor of ``param``'s shape are returned with
      ``param``'s placements (redistributed where the rule's placements differ); a state tensor
      of another shape (a statistic reduced over a sharded axis) is returned with its pending
      reductions done (``Partial`` becomes ``Replicate``).

    Every rank must call this for the same parameters in the same order (it communicates).
    ``implicit_replication`` is a process-wide switch that is off again when the call returns.
    """
    if not is_distributed(param):
        direction, new_state = rule(grad, param, state, *scalars)
        return direction, list(new_state)
    from torch.distributed.tensor.experimental import implicit_replication

    like = param
    if not evenly_sharded(param):
        grad, param, state = _replicated(grad), _replicated(param), [_replicated(s) for s in state]
    scalars = tuple(replicate_like(s, param) for s in scalars)
    with implicit_replication():
        direction, new_state = rule(grad, param, state, *scalars)
    return place_like(direction, like), [_settled(place_like(v, like)) for v in new_state]


def _flags(tensor: Tensor, count: int) -> Tensor:
    """Whether each of the ``count`` slices of ``tensor`` (of its local shard, for a
    ``DTensor``) along the first dimension is all finite: ``count`` booleans, exactly.

    A slice is finite when its smallest and largest values are (both propagate NaN, and an
    infinity is one of them): one reading pass and no temporary of the tensor's size, about a
    tenth of the time of ``isfinite(t).all()`` on the CPU, which writes a boolean tensor and
    takes several passes."""
    shard = local(tensor)
    if not shard.is_floating_point() or shard.numel() == 0:
        return torch.ones(count, dtype=torch.bool, device=shard.device)
    if count == 1:
        low, high = torch.aminmax(shard)
    else:
        rows = shard.reshape(count, shard.numel() // count)
        low, high = rows.amin(1), rows.amax(1)  # aminmax(dim=) is several times slower
    return torch.isfinite(low).logical_and_(torch.isfinite(high)).reshape(count)


def _sums_finite(tensor: Tensor, count: int) -> Tensor:
    """Whether the sum of each of the ``count`` slices of a plain ``tensor`` is finite: where it
    is, the slice is all finite (an infinity is never cancelled by finite values and opposite
    infinities make NaN); where it is not, the slice holds a NaN or an infinity, or its finite
    values overflowed the sum (rare: values near the dtype's largest; :func:`finite_flags`
    checks those slices again with :func:`_flags`). A sum reads the tensor at several times the
    speed of ``aminmax`` on the CPU (vectorised adds), and a step checks every tensor it wrote.
    Half-precision values are summed in float32 (65504 · n does not overflow it)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return torch.ones(count, dtype=torch.bool, device=tensor.device)
    if count == 1:
        return torch.isfinite(tensor.sum(dtype=_sum_dtype(tensor)).reshape(1))
    return torch.isfinite(row_sums(tensor, count))


def row_sums(tensor: Tensor, rows: int) -> Tensor:
    """The sum of each of the ``rows`` slices of a floating-point ``tensor`` along its first
    dimension (``rows`` values), half-precision values summed in float32."""
    return tensor.reshape(rows, -1).sum(1, dtype=_sum_dtype(tensor))


def _sum_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def finite_flags(checks: Sequence[Tuple[Tensor, Sequence[Any], Any]]) -> List[List[bool]]:
    """For each ``(tensor, members, what)``: whether each of its ``len(members)`` slices along
    the first dimension is all finite (a tensor with one member is one slice, whatever its
    shape); for a ``DTensor`` (one member), whether the whole logical tensor is. A boolean
    ``tensor`` is taken as the flags themselves (``len(members)`` of them).

    Plain tensors are checked by their slices' sums, and a slice whose sum is not finite is
    checked again exactly (see :func:`_sums_finite`). The flags of a ``DTensor`` are taken
    exactly on the local shards and combined over its device mesh with one ``all_reduce(MIN)``
    per mesh dimension, for all the step's ``DTensor`` of that mesh together, so every rank
    reads the same flags. Read back with one host synchronisation (a second one only when a
    plain tensor's sum was not finite). Every rank must call this with the same list of
    ``DTensor`` (it communicates).

    Raises:
        ValueError: a ``DTensor`` with more than one member (slices of a sharded tensor are not
            this rank's to check).
    """
    if not checks:
        return []
    device = local(checks[0][0]).device
    flags: List[Tensor] = []
    meshes: Dict[Any, List[int]] = {}
    for k, (tensor, members, what) in enumerate(checks):
        if is_distributed(tensor):
            if len(members) != 1:
                raise ValueError(
                    f"finite_flags: {what} is a DTensor checked as {len(members)} slices; a "
                    "DTensor is checked whole (one member)"
                )
            meshes.setdefault(tensor.device_mesh, []).append(k)
            flags.append(_flags(tensor, 1))
        elif tensor.dtype == torch.bool:  # flags taken already (see BatchedRule)
            flags.append(tensor.reshape(len(members)))
        else:
            flags.append(_sums_finite(tensor, len(members)))
    if meshes:
        import torch.distributed as dist

        for mesh, positions in meshes.items():
            shard_device = local(checks[positions[0]][0]).device
            # int32: every backend reduces it (gloo has no MIN over bool).
            combined = torch.cat([flags[k].to(shard_device) for k in positions]).to(torch.int32)
            for mesh_dim in range(mesh.ndim):
                if mesh.size(mesh_dim) > 1:
                    group = mesh.get_group(mesh_dim)
                    dist.all_reduce(combined, op=dist.ReduceOp.MIN, group=group)
            for k, value in zip(positions, combined.bool().unbind(0)):
                flags[k] = value.reshape(1)
    values = torch.cat([f.to(device) for f in flags]).tolist()
    out, start = [], 0
    for tensor, members, _ in checks:
        found = values[start : start + len(members)]
        start += len(members)
        exact = is_distributed(tensor) or tensor.dtype == torch.bool
        if not all(found) and not exact:  # a non-finite sum: look exactly
            found = _flags(tensor, len(members)).tolist()
        out.append(found)
    return out


def all_finite(tensors: Sequence[Tensor]) -> List[bool]:
    """Whether each tensor is all finite, a ``DTensor`` over its whole logical tensor, the same
    answer on every rank: one ``all_reduce(MIN)`` per device mesh (dimension) for all the
    ``DTensor`` of the list, one host synchronisation (see :func:`finite_flags`). Plain and
    ``DTensor`` tensors may be mixed; every rank must pass the same ``DTensor``."""
    return [flags[0] for flags in finite_flags([(t, (0,), "a tensor") for t in tensors])]


def backend_problem(named_params: Iterable[Tuple[str, Tensor]], backend: str) -> "str | None":
    """Why ``backend`` cannot run these parameters, or ``None``: only the eager backend runs
    ``DTensor`` parameters (the compiled and exported graphs take plain tensors and would
    compute each rank's shard on its own, or fail). The message names the first ``DTensor``
    parameter and the backend. ``"auto"`` is never a problem (see :func:`check_backend`)."""
    if backend in ("auto", DTENSOR_BACKEND):
        return None
    for name, param in named_params:
        if is_distributed(param):
            return (
                f"parameter {name!r} is a DTensor (sharded, e.g. by FSDP2): the {backend} "
                "backend cannot run it (its graphs take plain tensors, and a rule's per-tensor "
                f"statistics must cover the whole sharded tensor); backend='{DTENSOR_BACKEND}' "
                "(or 'auto', which picks it) runs DTensor parameters"
            )
    return None
