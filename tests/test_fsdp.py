"""FrozenOptimizer with FSDP2 (``fully_shard``: DTensor parameters) and the helpers of
compiledopt.runtime.distributed.

The references are independent of the code under test: the packaged rule run in one process on
the whole (plain) tensors, and finiteness flags computed by hand. The 2-process tests run one
spawned gloo job (tests/fsdp_worker.py) whose results they share.
"""

import hashlib
import json
import math
import re
import shutil

import pytest
import torch
import torch.distributed as dist
from fsdp_worker import (
    ARTIFACT,
    CLOSE,
    LR,
    ORTHOGONALIZED,
    RULE_CASES,
    STEPS,
    batches,
    make_model,
    rule_inputs,
    train,
)
from spawning import spawn
from torch import nn

import compiledopt as co
from compiledopt.runtime import distributed
from compiledopt.runtime.rounding import round_state

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

GRAPH_BACKENDS = ("compiled", "torchscript", "onnx", "aoti")
SPAWN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A one-rank gloo group in this process and its one-device mesh (DTensor on one rank:
    every op local, so results equal plain tensors')."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.tensor import init_device_mesh

    init = tmp_path_factory.mktemp("fsdp_mesh") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Both ranks' results of tests/fsdp_worker.py: ``(functions, training)``, one dict each
    per rank."""
    from fsdp_worker import worker

    out = tmp_path_factory.mktemp("fsdp")
    spawn(worker, (2, str(out / "init"), str(out)), nprocs=2, timeout=SPAWN_TIMEOUT_S)

    def load(name):
        return [torch.load(out / f"{name}{rank}.pt", weights_only=False) for rank in range(2)]

    return load("functions"), load("training")


def _transform():
    return co.pretrained.load(ARTIFACT).transforms()[0]


def _sharded(model: nn.Module, mesh) -> nn.Module:
    """``model`` with every parameter a DTensor on ``mesh`` (sharded along dimension 0)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            placement = [Shard(0)] if param.dim() else [Replicate()]
            module.register_parameter(
                name, nn.Parameter(distribute_tensor(param.detach(), mesh, placement))
            )
    return model


# -- plain tensors: every helper is the identity or the plain computation --------------------


def test_helpers_leave_plain_tensors_alone() -> None:
    t = torch.randn(3, 2)
    assert not distributed.is_distributed(t) and not distributed.is_distributed(1.0)
    assert distributed.local(t) is t
    assert distributed.replicate_like(t, torch.zeros(1)) is t
    assert distributed.place_like(t, torch.zeros(3, 2)) is t
    assert distributed.evenly_sharded(t)
    transform = _transform()
    grad, param, *state = rule_inputs((4, 3), 0)
    direction, new_state = distributed.run_rule(
        transform.update, grad, param, state, torch.tensor(2)
    )
    ref_direction, ref_state = transform.update(grad, param, state, torch.tensor(2))
    assert torch.equal(direction, ref_direction) and isinstance(new_state, list)
    assert all(torch.equal(a, b) for a, b in zip(new_state, ref_state))


def test_finiteness_of_plain_tensors() -> None:
    nan, inf = float("nan"), float("inf")
    tensors = [torch.ones(3), torch.tensor([1.0, nan]), torch.tensor(inf), torch.empty(0)]
    assert distributed.all_finite(tensors) == [True, False, False, True]
    assert distributed.all_finite([]) == []
    bucket = torch.tensor([[1.0, 2.0], [3.0, -inf], [nan, 0.0]])
    checks = [(bucket, (4, 5, 6), "gradient"), (torch.ones(2, 2), (7,), "direction")]
    assert distributed.finite_flags(checks) == [[True, False, False], [True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finiteness_matches_isfinite_at_every_position(dtype) -> None:
    """Each slice's flag equals ``isfinite(slice).all()`` whatever the dtype, the slice length
    (vector bodies and tails) and where the one NaN or infinity sits."""
    generator = torch.Generator().manual_seed(0)
    for count, length in [(1, 1), (1, 9), (1, 1025), (3, 1), (3, 8), (4, 33)]:
        clean = torch.randn(count * length, generator=generator).to(dtype)
        assert distributed.finite_flags([(clean, tuple(range(count)), "x")]) == [[True] * count]
        for position in range(count * length):
            for value in (float("nan"), float("inf"), -float("inf")):
                tensor = clean.clone()
                tensor[position] = value
                expected = torch.isfinite(tensor.reshape(count, length)).all(1).tolist()
                flags = distributed.finite_flags([(tensor, tuple(range(count)), "x")])
                assert flags == [expected], (count, length, position, value)
    integers = torch.arange(6).reshape(3, 2)
    assert distributed.finite_flags([(integers, (0, 1, 2), "x")]) == [[True] * 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_values_whose_sum_overflows_are_finite(dtype) -> None:
    """Slices are first judged by their sums; finite values near the dtype's largest overflow
    the sum, and such a slice is looked at again, never reported non-finite."""
    big = torch.finfo(dtype).max
    tensor = torch.full((3, 4), big, dtype=dtype)
    tensor[1] = -big
    tensor[2, 3] = float("inf")
    assert torch.isinf(tensor[:2].sum(1)).all()  # a sum in the dtype overflows
    assert distributed.finite_flags([(tensor, (0, 1, 2), "x")]) == [[True, True, False]]
    assert distributed.all_finite([tensor[0], tensor[1], tensor[2]]) == [True, True, False]


def test_backend_problem_with_plain_parameters() -> None:
    named = list(nn.Linear(2, 2).named_parameters())
    for backend in ("auto", "eager", *GRAPH_BACKENDS):
        assert distributed.backend_problem(named, backend) is None


# -- DTensor on a one-rank mesh ---------------------------------------------------------------


def test_backend_problem_names_the_dtensor_parameter(mesh) -> None:
    named = list(_sharded(nn.Sequential(nn.Linear(2, 3)), mesh).named_parameters())
    assert distributed.backend_problem(named, "eager") is None
    assert distributed.backend_problem(named, "auto") is None
    for backend in GRAPH_BACKENDS:
        problem = distributed.backend_problem(named, backend)
        assert re.search(rf"'0\.weight' is a DTensor.*the {backend} backend", problem)
        assert "backend='eager'" in problem


def test_dtensor_helpers_on_one_rank(mesh) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    like = distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)])
    step = distributed.replicate_like(torch.tensor(7), like)
    assert isinstance(step, DTensor) and step.placements == (Replicate(),)
    assert step.to_local().item() == 7 and distributed.replicate_like(step, like) is step
    assert distributed.replicate_like(3, like) == 3
    assert not distributed.is_distributed(distributed.local(like))
    assert torch.equal(distributed.local(like), torch.zeros(4, 2))
    whole = torch.arange(8.0).reshape(4, 2)
    placed = distributed.place_like(whole, like)
    assert placed.placements == like.placements and torch.equal(placed.full_tensor(), whole)
    replicated = distribute_tensor(whole, mesh, [Replicate()])
    assert distributed.place_like(replicated, like).placements == like.placements
    assert distributed.place_like(torch.ones(3), like).shape == (3,)  # another shape: as it is
    assert distributed.evenly_sharded(like)
    flags = distributed.all_finite([like, torch.tensor([float("nan")]), placed / 0.0])
    assert flags == [True, False, False]  # 0/0 is NaN in the first row


def test_rule_on_one_rank_dtensors_matches_plain(mesh) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    transform = _transform()
    for seed, shape in enumerate([(5, 3), (4,), (2, 3, 2)]):
        inputs = rule_inputs(shape, seed)
        ref_direction, ref_state = transform.update(*inputs[:2], list(inputs[2:]), torch.tensor(1))
        grad, param, *state = (distribute_tensor(t, mesh, [Shard(0)]) for t in inputs)
        direction, new_state = distributed.run_rule(
            transform.update, grad, param, state, torch.tensor(1)
        )
        assert direction.placements == param.placements
        torch.testing.assert_close(direction.full_tensor(), ref_direction, **CLOSE)
        for value, ref in zip(new_state, ref_state):
            torch.testing.assert_close(value.full_tensor(), ref, **CLOSE)


def test_bfloat16_state_rounding_on_dtensor(mesh) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    value = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    expected = round_state([value], torch.bfloat16, torch.tensor(11))[0]
    sharded = distribute_tensor(value, mesh, [Shard(0)])
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        rounded = round_state([sharded], torch.bfloat16, torch.tensor(11))[0]
    assert torch.equal(rounded.full_tensor(), expected)


def _fake_aoti_artifact(root):
    """The packaged artifact with a ``aoti`` graph that is not one (random bytes): building a
    FrozenOptimizer on it must refuse DTensor parameters before it loads any graph."""
    source = co.pretrained.resolve(ARTIFACT)
    target = root / "fake-aoti"
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    ranks = manifest["ranks"]
    manifest["backends"]["aoti"] = []
    for rank in ranks:
        name = f"rule_rank{rank}.pt2"
        data = bytes(range(256)) * 4
        (target / name).write_bytes(data)
        manifest["backends"]["aoti"].append(name)
        manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_frozen_optimizer_refuses_graph_backends_for_dtensor(mesh, tmp_path) -> None:
    params = list(_sharded(make_model(), mesh).named_parameters())
    for backend in ("compiled", "torchscript", "onnx"):
        with pytest.raises(ValueError, match=rf"'0\.weight' is a DTensor.*{backend} backend"):
            co.FrozenOptimizer(params, ARTIFACT, backend=backend)
    fake = _fake_aoti_artifact(tmp_path)
    with pytest.raises(ValueError, match=r"'0\.weight' is a DTensor.*aoti backend"):
        co.FrozenOptimizer(params, fake, backend="aoti", trust_code=True)
    assert co.FrozenOptimizer(params, ARTIFACT).backend == "eager"
    assert co.FrozenOptimizer(params, fake, trust_code=True).backend == "eager"


def test_frozen_optimizer_on_one_rank_dtensors_matches_plain(mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    reference, sharded = make_model(), make_model()
    fully_shard(sharded, mesh=mesh)
    data = batches()
    optimizers = [
        co.FrozenOptimizer(reference.parameters(), ARTIFACT, lr=LR, backend="eager"),
        co.FrozenOptimizer(sharded.parameters(), ARTIFACT, lr=LR),  # auto: eager
    ]
    train(reference, optimizers[0], data)
    train(sharded, optimizers[1], data)
    for p, q in zip(reference.parameters(), sharded.parameters()):
        torch.testing.assert_close(q.full_tensor(), p.detach(), **CLOSE)
        for key, value in optimizers[0].state[p].items():
            other = optimizers[1].state[q][key]
            if key == "step":
                assert int(other) == STEPS
            else:
                assert other.placements == q.placements
            torch.testing.assert_close(distributed.local(other), value, **CLOSE)


# -- two ranks: FSDP2 -------------------------------------------------------------------------


def test_rule_on_two_ranks_matches_one_process(spawned) -> None:
    functions, _ = spawned
    transform = _transform()
    for seed, (name, shape, _) in enumerate(RULE_CASES):
        grad, param, *state = rule_inputs(shape, seed)
        ref_direction, ref_state = transform.update(grad, param, state, torch.tensor(3))
        for rank in range(2):
            direction, *new_state = functions[rank]["rule"][name]
            # A matrix's direction goes through Newton–Schulz, whose five iterations amplify the
            # float32 rounding of sums taken in another order over shards (~1e-6 relative).
            close = ORTHOGONALIZED if len(shape) >= 2 else CLOSE
            torch.testing.assert_close(direction, ref_direction, **close, msg=name)
            for value, ref in zip(new_state, ref_state):
                torch.testing.assert_close(value, ref, **CLOSE, msg=name)
            assert all(functions[rank]["placements"][name]), name
        if len(shape) >= 2:  # a matrix's direction has unit RMS (vectors take an Adam-like rule)
            assert math.isclose(ref_direction.square().mean().item(), 1.0, rel_tol=1e-5)


def test_finiteness_agrees_on_every_rank(spawned) -> None:
    functions, _ = spawned
    for rank in range(2):
        # A NaN in rank 1's shard makes the whole tensor non-finite on both ranks.
        assert functions[rank]["all_finite"] == [False, True, True, False]
        assert functions[rank]["finite_flags"] == [[True, False], [False], [True]]
        assert functions[rank]["place_like"]
        assert functions[rank]["evenly_sharded"] == [True, False, True, True]


def test_fully_shard_training_matches_one_process(spawned) -> None:
    _, training = spawned
    model = make_model()
    optimizer = co.FrozenOptimizer(model.named_parameters(), ARTIFACT, lr=LR, backend="eager")
    train(model, optimizer, batches())
    for rank in range(2):
        result = training[rank]
        assert "error" not in result, result.get("error")
        assert result["backend"] == "eager"
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["params"][name], param.detach(), **CLOSE)
            assert not torch.equal(
                result["params"][name], dict(make_model().named_parameters())[name]
            )
            for key, value in optimizer.state[param].items():
                torch.testing.assert_close(result["state"][name][key], value, **CLOSE)
        assert result["state_sharded"] and result["reloaded"] and result["reloaded_whole"]
        assert result["skipped"] == 1 and result["unchanged"]
