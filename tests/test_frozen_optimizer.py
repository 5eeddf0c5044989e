"""FrozenOptimizer: a real torch.optim.Optimizer over exported artifacts."""

import io
import math

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.export import (
    ArtifactError,
    build_bound,
    build_shape_agnostic,
    export_bound,
    export_shape_agnostic,
)

ADAM = {"kind": "shape_agnostic", "name": "adam", "kwargs": {}}
MLP = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
KRONECKER = {"kind": "kronecker", "layer": "KroneckerRNN", "bias": True, "psd": True}


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _data(dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=generator).to(dtype), torch.randn(
        32, 1, generator=generator
    ).to(dtype)


def _perturbed(transform, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in transform.parameters():
            w.add_(0.05 * torch.randn(w.shape, generator=generator).to(w.dtype))
    return transform


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    model = _model()
    return {
        "adam64": export_shape_agnostic(
            root / "adam64",
            ADAM,
            build_shape_agnostic(ADAM),
            ("torchscript",),
            ranks=(1, 2),
            dtype=torch.float64,
        ),
        "mlp": export_shape_agnostic(
            root / "mlp",
            MLP,
            _perturbed(build_shape_agnostic(MLP)),
            ("torchscript",),
            ranks=(1, 2),
            lr=1.0,
        ),
        "kronecker": export_bound(
            root / "kronecker",
            KRONECKER,
            [
                _perturbed(t, i)
                for i, t in enumerate(build_bound(KRONECKER, [p.shape for p in model.parameters()]))
            ],
            list(model.named_parameters()),
            ("torchscript",),
            lr=0.1,
        ),
    }


def _train(model, optimizer, steps, data=None, scheduler=None):
    x, y = data or _data(next(model.parameters()).dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("backend", ["eager", "torchscript", "compiled"])
def test_adam_artifact_matches_torch_optim_adam(artifacts, backend):
    model, reference = _model(torch.float64), _model(torch.float64)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]
    optimizer = co.FrozenOptimizer(
        groups, artifacts["adam64"], lr=1e-2, backend=backend, trust_code=True
    )
    adam = torch.optim.Adam(
        [{"params": reference[0].parameters()}, {"params": reference[2].parameters(), "lr": 3e-3}],
        lr=1e-2,
        foreach=False,
    )
    _train(model, optimizer, 50)
    _train(reference, adam, 50)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "kronecker"])
def test_backends_agree(artifacts, name):
    results = {}
    for backend in ["eager", "torchscript", "compiled"]:
        model = _model()
        optimizer = co.FrozenOptimizer(
            model.named_parameters(), artifacts[name], backend=backend, trust_code=True
        )
        assert optimizer.backend == backend
        _train(model, optimizer, 50)
        results[backend] = [p.detach().clone() for p in model.parameters()]
    start = [p.detach() for p in _model().parameters()]
    for backend, params in results.items():
        for a, b, p0 in zip(params, results["eager"], start):
            delta = (b - p0).abs().max()
            assert delta > 0
            assert (a - b).abs().max() <= 1e-6 * max(delta, b.abs().max()), backend
    assert co.FrozenOptimizer(_model().parameters(), artifacts[name]).backend in ("compiled",)


@pytest.mark.parametrize("name", ["mlp", "kronecker"])
def test_state_dict_round_trip_is_exact(artifacts, name):
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts[name], backend="eager")
    _train(model, optimizer, 7)

    resumed_model = _model()
    resumed = co.FrozenOptimizer(resumed_model.parameters(), artifacts[name], backend="eager")
    _train(resumed_model, resumed, 3)
    buffer = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "optimizer": resumed.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model = _model(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = co.FrozenOptimizer(fresh_model.parameters(), artifacts[name], backend="eager")
    fresh.load_state_dict(saved["optimizer"])
    _train(fresh_model, fresh, 4)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_does_not_recompile(artifacts):
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts["mlp"], backend="compiled")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2.0, total_steps=101, cycle_momentum=False
    )
    _train(model, optimizer, 1, scheduler=scheduler)  # compiles for the shapes seen
    _train(model, optimizer, 3, scheduler=scheduler)  # dynamic shapes settle
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, optimizer, 96, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] < 1e-3  # the schedule really ran


def test_plain_loop_with_clipping_and_a_compiled_model(artifacts):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts["mlp"], lr=10.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    x, y = _data()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = ((compiled(x) - y) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.25)


def test_parameters_without_gradient_are_untouched(artifacts):
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts["kronecker"], backend="eager")
    _train(model, optimizer, 2)
    frozen = model[2].bias
    before = frozen.detach().clone()
    state_before = {k: v.clone() for k, v in optimizer.state[frozen].items()}
    x, y = _data()
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    frozen.grad = None
    optimizer.step()
    assert torch.equal(frozen, before)
    assert all(torch.equal(v, optimizer.state[frozen][k]) for k, v in state_before.items())
    assert int(optimizer.state[model[0].weight]["step"]) == 3
    _train(model, optimizer, 1)  # steps now differ between parameters: still works
    assert int(optimizer.state[frozen]["step"]) == 3


@pytest.mark.parametrize("name", ["mlp", "kronecker"])
def test_state_is_updated_in_place(artifacts, name):
    # As in torch.optim, optimizer.state[p] stays the same dict across steps (references that
    # schedulers, checkpointing or user code hold keep seeing the current state).
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts[name], backend="eager")
    _train(model, optimizer, 1)
    held = {p: optimizer.state[p] for p in model.parameters()}
    _train(model, optimizer, 2)
    for p, state in held.items():
        assert state is optimizer.state[p]
        assert int(state["step"]) == 3


def test_nonfinite_gradients(artifacts):
    model = _model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = co.FrozenOptimizer(groups, artifacts["mlp"])
    x, y = _data()
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    after = list(model.parameters())
    assert not torch.equal(after[0], before[0])  # the finite group stepped
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    assert optimizer.skipped_steps == 1 and not optimizer.state[model[2].weight]

    strict = co.FrozenOptimizer(model.named_parameters(), artifacts["mlp"], nonfinite="raise")
    model[0].bias.grad[0] = math.inf
    with pytest.raises(FloatingPointError, match=r"parameter 0\.bias"):
        strict.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), after))


def test_grad_scaler_and_hooks(artifacts):
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts["mlp"], lr=1.0)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert calls == ["pre", "post"]
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # An overflow: GradScaler skips the step, the optimizer never sees it.
    optimizer.zero_grad()
    scaler.scale(((model(x) - y) ** 2).mean() * math.inf).backward()
    scaler.step(optimizer)
    assert calls == ["pre", "post"]


def test_bf16_model_keeps_float32_state(artifacts):
    model = _model(torch.bfloat16)
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts["mlp"], lr=1.0)
    _train(model, optimizer, 3)
    state = optimizer.state[model[0].weight]
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    restored = co.FrozenOptimizer(model.parameters(), artifacts["mlp"], lr=1.0)
    restored.load_state_dict(optimizer.state_dict())
    for key, value in state.items():
        assert torch.equal(restored.state[model[0].weight][key], value)


def test_add_param_group(artifacts):
    model = _model()
    optimizer = co.FrozenOptimizer(model[0].parameters(), artifacts["mlp"])
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.5})
    _train(model, optimizer, 1)
    assert all(optimizer.state[p] for p in model.parameters())
    bound = co.FrozenOptimizer(model.parameters(), artifacts["kronecker"])
    with pytest.raises(ValueError, match="bound to 4 parameters"):
        bound.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


@pytest.mark.parametrize("edit", ["appended", "removed"])
def test_a_bound_artifacts_parameters_edited_by_hand_are_refused_before_anything_is_written(
    artifacts, edit
):
    # add_param_group refuses a new group; a parameter appended to a group's params by hand
    # raised an IndexError, and one removed stepped the others through a rule missing one
    # binding (the eager rule silently).
    model = _model()
    optimizer = co.FrozenOptimizer(model.parameters(), artifacts["kronecker"], backend="eager")
    params = optimizer.param_groups[0]["params"]
    if edit == "appended":
        params.append(nn.Parameter(torch.zeros(2)))
    else:
        params.pop()
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    count = 5 if edit == "appended" else 3
    with pytest.raises(
        ValueError, match=f"bound to 4 parameters; the param groups now list {count}"
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not optimizer.state


def test_bad_input(artifacts, tmp_path):
    model = _model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"Invalid lr: -0\.1"):
        co.FrozenOptimizer(params, artifacts["mlp"], lr=-0.1)
    with pytest.raises(ValueError, match="Invalid weight_decay: nan"):
        co.FrozenOptimizer(params, artifacts["mlp"], weight_decay=math.nan)
    with pytest.raises(ValueError, match="Invalid backend: 'tpu'"):
        co.FrozenOptimizer(params, artifacts["mlp"], backend="tpu")
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        co.FrozenOptimizer(params, artifacts["mlp"], nonfinite="silent")
    with pytest.raises(ArtifactError, match="has no onnx graph"):
        co.FrozenOptimizer(params, artifacts["mlp"], backend="onnx")
    with pytest.raises(ValueError, match="more than one parameter group"):
        co.FrozenOptimizer([{"params": params}, {"params": params[:1]}], artifacts["mlp"])
    with pytest.raises(ValueError, match="complex64"):
        co.FrozenOptimizer([nn.Parameter(torch.zeros(2, dtype=torch.complex64))], artifacts["mlp"])
    with pytest.raises(ArtifactError, match="not a directory"):
        co.FrozenOptimizer(params, tmp_path / "missing")
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(ArtifactError, match=r"parameter '2.weight' has shape \(2, 8\)"):
        co.FrozenOptimizer(other.named_parameters(), artifacts["kronecker"])
    renamed = [(f"layer.{n}", p) for n, p in model.named_parameters()]
    with pytest.raises(ArtifactError, match=r"'layer\.0\.weight' is where"):
        co.FrozenOptimizer(renamed, artifacts["kronecker"])
    sparse = nn.Embedding(5, 2, sparse=True)
    optimizer = co.FrozenOptimizer(sparse.parameters(), artifacts["mlp"])
    sparse(torch.tensor([1, 2])).sum().backward()
    before = sparse.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert torch.equal(sparse.weight, before)


@pytest.mark.slow
def test_distributed_data_parallel_keeps_ranks_identical(artifacts, tmp_path):
    import torch.multiprocessing as mp
    from ddp_worker import worker

    args = (2, str(tmp_path / "init"), str(artifacts["mlp"]), str(tmp_path))
    mp.spawn(worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    start = list(_model().parameters())
    for a, b, p0 in zip(*ranks, start):
        assert torch.equal(a, b)
        assert not torch.equal(a, p0.detach())
