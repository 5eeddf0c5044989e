"""Entry point of the 2-process FSDP2 (``fully_shard``, DTensor parameters) tests (spawned, so
importable). The test process imports the same model, data and rule inputs for its one-process
reference."""

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

import compiledopt as co
from compiledopt.runtime import distributed

ARTIFACT = "normalized-mlp"
LR = 0.01
STEPS = 5
BATCH = 32
#: How close the sharded results are to one process's: the sums over shards are taken in
#: another order, and a matrix's direction goes through Newton–Schulz, whose iterations amplify
#: that float32 rounding (``ORTHOGONALIZED``).
CLOSE = dict(atol=1e-6, rtol=1e-5)
ORTHOGONALIZED = dict(atol=2e-5, rtol=1e-5)
#: (name, shape, placement) of the tensors the rule is run on directly: even and uneven shards
#: (``(3, 16)``: 2 + 1 rows; ``(1, 4)``: an empty shard on rank 1), a shard along dimension 1,
#: a vector and a replicated scalar.
RULE_CASES = (
    ("even", (16, 8), 0),
    ("uneven_matrix", (3, 16), 0),
    ("uneven_rank3", (7, 3, 2), 0),
    ("empty_shard", (1, 4), 0),
    ("columns", (6, 4), 1),
    ("uneven_vector", (5,), 0),
    ("scalar", (), None),
)


def make_model() -> nn.Module:
    """The model both sides train: ``Linear(8, 16)`` shards evenly over 2 ranks, ``Linear(16, 3)``
    does not (2 + 1 rows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` batches of ``BATCH`` examples (each rank trains on its half of each)."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 3, generator=generator))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, optimizer, data) -> None:
    """Mean squared error steps (the mean over each rank's half-batch; FSDP averages the ranks'
    gradients, so the step is the full batch's)."""
    for x, y in data:
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


def rule_inputs(shape: Tuple[int, ...], seed: int) -> Tuple[torch.Tensor, ...]:
    """A gradient, a parameter and a (nonzero) NormalizedMLP state of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    grad = 3 * torch.randn(shape, generator=generator)
    param = torch.randn(shape, generator=generator)
    fast = 0.1 * torch.randn(shape, generator=generator)
    slow = 0.1 * torch.randn(shape, generator=generator)
    absolute = torch.rand(shape, generator=generator)
    return grad, param, fast, slow, absolute


def _full(value: Any) -> Any:
    return value.full_tensor() if distributed.is_distributed(value) else value


def _placements(value: Any) -> Any:
    """A ``DTensor``'s placements (a tuple), ``None`` for a plain tensor."""
    return tuple(value.placements) if distributed.is_distributed(value) else None


def _same_shards(value: Any, like: Any) -> bool:
    """Whether ``value`` is ``like``: a ``DTensor`` with its placements and an equal shard on
    this rank, or a plain tensor equal to it."""
    return _placements(value) == _placements(like) and torch.equal(
        distributed.local(value), distributed.local(like)
    )


def check_functions(rank: int, world: int) -> Dict[str, Any]:
    """compiledopt.runtime.distributed on a 2-rank mesh: the rule's results (gathered) on each
    case of RULE_CASES, finiteness flags, place_like."""
    from torch.distributed.tensor import (
        DTensor,
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )

    mesh = init_device_mesh("cpu", (world,))
    transform = co.pretrained.load(ARTIFACT).transforms()[0]
    out: Dict[str, Any] = {"rule": {}, "placements": {}}
    for seed, (name, shape, dim) in enumerate(RULE_CASES):
        placement = [Replicate()] if dim is None else [Shard(dim)]
        grad, param, *state = (
            distribute_tensor(t, mesh, placement) for t in rule_inputs(shape, seed)
        )
        direction, new_state = distributed.run_rule(
            transform.update, grad, param, state, torch.tensor(3)
        )
        out["rule"][name] = [_full(direction), *map(_full, new_state)]
        out["placements"][name] = [
            tuple(t.placements) == tuple(param.placements) for t in (direction, *new_state)
        ]
    # Finiteness: a NaN in rank 1's shard only; a plain inf; a stacked bucket of 2 slices.
    shard = torch.ones(2, 3)
    if rank == 1:
        shard[1, 2] = float("nan")
    nan_on_one = DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)
    finite = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    out["all_finite"] = distributed.all_finite(
        [nan_on_one, finite, torch.ones(3), torch.tensor([1.0, float("inf")])]
    )
    bucket = torch.tensor([[1.0, 2.0], [float("inf"), 0.0]])
    out["finite_flags"] = distributed.finite_flags(
        [(bucket, (0, 1), "b"), (nan_on_one, (2,), "n"), (finite, (3,), "f")]
    )
    like = distribute_tensor(torch.zeros(5, 2), mesh, [Shard(0)])
    whole = torch.arange(10.0).reshape(5, 2)
    placed = distributed.place_like(whole, like)
    rows = whole[:3] if rank == 0 else whole[3:]  # torch.chunk's split: 3 + 2 rows
    out["place_like"] = (
        tuple(placed.placements) == tuple(like.placements)
        and torch.equal(placed.to_local(), rows)
        and torch.equal(placed.full_tensor(), whole)
    )
    out["evenly_sharded"] = [
        distributed.evenly_sharded(t) for t in (finite, like, nan_on_one, torch.ones(3))
    ]
    return out


def train_sharded(rank: int, world: int, artifact: str = ARTIFACT) -> Dict[str, Any]:
    """FrozenOptimizer (eager, ``artifact``) on a fully_shard model: STEPS steps on this rank's
    half of each batch, then a state_dict round trip and a step with a NaN in one rank's gradient
    shard."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    named = list(model.named_parameters())
    optimizer = co.FrozenOptimizer(named, artifact, lr=LR, backend="eager")
    half = BATCH // world
    data = [
        (x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
        for x, y in batches()
    ]
    train(model, optimizer, data)
    out: Dict[str, Any] = {
        "backend": optimizer.backend,
        "params": {n: p.full_tensor() for n, p in named},
        "state": {n: {k: _full(v) for k, v in optimizer.state[p].items()} for n, p in named},
        "state_sharded": all(
            distributed.is_distributed(v) and tuple(v.placements) == tuple(p.placements)
            for n, p in named
            for k, v in optimizer.state[p].items()
            if k != "step"
        ),
        "placements": {
            n: {k: _placements(v) for k, v in optimizer.state[p].items()} for n, p in named
        },
    }
    # state_dict round trip: the loaded state is the saved one, sharded as before.
    saved = optimizer.state_dict()
    fresh = co.FrozenOptimizer(named, artifact, lr=LR, backend="eager")
    fresh.load_state_dict(saved)
    out["reloaded"] = all(
        _same_shards(fresh.state[p][k], v)
        for _, p in named
        for k, v in optimizer.state[p].items()
        if k != "step"
    ) and all(int(fresh.state[p]["step"]) == STEPS for _, p in named)
    # A state_dict of whole tensors (as one process saves it) is sharded as the parameters
    # (state of the parameter's shape; other state, a rule's factored statistics, is loaded
    # whole: a plain tensor counts as replicated).
    whole = {
        **saved,
        "state": {i: {k: _full(v) for k, v in st.items()} for i, st in saved["state"].items()},
    }
    fresh = co.FrozenOptimizer(named, artifact, lr=LR, backend="eager")
    fresh.load_state_dict(whole)
    out["reloaded_whole"] = all(
        [  # a list, not a generator: every rank gathers every state (no early exit)
            _same_shards(fresh.state[p][k], v)
            if v.shape == p.shape
            else torch.equal(_full(fresh.state[p][k]), _full(v))
            for _, p in named
            for k, v in optimizer.state[p].items()
            if k != "step"
        ]
    )
    # A NaN in rank 1's shard of one gradient: every rank skips the step.
    before = {n: p.full_tensor() for n, p in named}
    x, y = data[0]
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if rank == 1:
        named[2][1].grad.to_local()[0, 0] = float("nan")
    optimizer.step()
    out["skipped"] = optimizer.skipped_steps
    out["unchanged"] = all(torch.equal(p.full_tensor(), before[n]) for n, p in named)
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str, artifact: str = ARTIFACT) -> None:
    """Saves ``functions{rank}.pt`` (:func:`check_functions`, for the packaged ARTIFACT only: its
    rule inputs are NormalizedMLP's) and ``training{rank}.pt`` (:func:`train_sharded` with
    ``artifact``, a packaged name or an artifact's path) in ``out_dir``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if artifact == ARTIFACT:
            torch.save(check_functions(rank, world), f"{out_dir}/functions{rank}.pt")
        try:  # needs the runtime integration; an error is the same on every rank
            training = train_sharded(rank, world, artifact)
        except Exception as error:  # reported to the test
            training = {"error": f"{type(error).__name__}: {error}"}
        torch.save(training, f"{out_dir}/training{rank}.pt")
    finally:
        dist.destroy_process_group()
