"""The learned optimizer on a CUDA device: the same steps as on the CPU, a state that moves
between devices, and low-precision parameters. Skipped without a CUDA device."""

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.runtime import warming

PACKAGED = "normalized-mlp"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))
    return model.to(device=device, dtype=dtype)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 12, generator=generator).to(device=device, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=generator).to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()


def test_a_state_saved_on_the_gpu_resumes_on_the_cpu():
    # Three steps on the GPU, the state_dict loaded by an optimizer of the same model on the
    # CPU, three more there: the CPU run that took all six steps (eager rule on both).
    gpu, cpu = _model("cuda"), _model("cpu")
    moving = co.FrozenOptimizer(gpu.parameters(), PACKAGED, backend="eager")
    reference = co.FrozenOptimizer(cpu.parameters(), PACKAGED, backend="eager")
    _train(gpu, moving, 3, seed=0)
    _train(cpu, reference, 3, seed=0)
    moved = _model("cpu")
    moved.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    resumed = co.FrozenOptimizer(moved.parameters(), PACKAGED, backend="eager")
    resumed.load_state_dict(moving.state_dict())
    for state in resumed.state.values():
        assert all(v.device.type == "cpu" for v in state.values())
    _train(moved, resumed, 3, seed=1)
    _train(cpu, reference, 3, seed=1)
    for p, q in zip(moved.parameters(), cpu.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_on_the_gpu_train_and_stay_finite(dtype):
    model = _model("cuda", dtype)
    optimizer = co.FrozenOptimizer(model.parameters(), PACKAGED)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, 5, seed=0)
    for p, b in zip(model.parameters(), before):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, b)


def test_auto_on_the_gpu_steps_like_eager():
    # auto starts on the eager rule and hands over to a compiled one once its background compile
    # is ready (waited for here, where one started): within the compiled rule's rounding of the
    # eager run, whichever ran each step.
    runs = []
    for backend in ("eager", "auto"):
        model = _model("cuda")
        optimizer = co.FrozenOptimizer(model.parameters(), PACKAGED, backend=backend)
        _train(model, optimizer, 5, seed=0)
        assert warming.wait(600)
        _train(model, optimizer, 5, seed=1)
        runs.append([p.detach().cpu() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
