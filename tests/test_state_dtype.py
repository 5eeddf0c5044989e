"""bfloat16 optimizer state: stochastic rounding and FrozenOptimizer(state_dtype=bfloat16)."""

import io

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.export import build_shape_agnostic, export_shape_agnostic
from compiledopt.runtime.compiled import CompiledTensorRule
from compiledopt.runtime.rounding import stochastic_round_bfloat16

MLP = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("state-dtype")
    return export_shape_agnostic(
        root / "mlp", MLP, build_shape_agnostic(MLP), ("torchscript",), ranks=(1, 2), lr=1e-3
    )


def _neighbours(x: torch.Tensor):
    """The bfloat16 values just below and just above (or equal to) each float32 in ``x``."""
    nearest = x.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf")))
    below = torch.where(nearest.float() <= x, nearest, down)
    above = torch.where(nearest.float() >= x, nearest, up)
    return below.float(), above.float()


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, generator=generator) * torch.logspace(-6, 6, 512)
    below, above = _neighbours(x)
    seeds = 2000
    total = torch.zeros(512, dtype=torch.float64)
    for seed in range(seeds):
        r = stochastic_round_bfloat16(x, torch.tensor(seed))
        assert r.dtype == torch.bfloat16
        r = r.float()
        assert bool(((r == below) | (r == above)).all())
        total += r.double()
    mean = total / seeds
    spacing = (above - below).double().clamp_min(1e-45)
    # A two-point distribution has std <= spacing / 2; 6 standard errors of the mean.
    bias = ((mean - x.double()).abs() / spacing).max().item()
    assert bias < 6 * 0.5 / seeds**0.5
    # Round-to-nearest is biased by up to half a spacing: the test tells them apart.
    nearest_bias = ((x.to(torch.bfloat16).double() - x.double()).abs() / spacing).max().item()
    assert nearest_bias > 0.4


def test_stochastic_rounding_keeps_exact_and_special_values():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 2.0**-130]).to(torch.bfloat16).float()
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    for seed in range(50):
        out = stochastic_round_bfloat16(torch.cat([exact, special]), torch.tensor(seed)).float()
        assert torch.equal(out[: len(exact)], exact)
        assert out[-3] == float("inf") and out[-2] == float("-inf") and bool(out[-1].isnan())
    with pytest.raises(ValueError, match="float64"):
        stochastic_round_bfloat16(torch.zeros(3, dtype=torch.float64), torch.tensor(0))


def _accumulate(artifact, steps: int, **kwargs):
    """``steps`` optimizer steps on one tensor with a constant gradient; the optimizer."""
    param = nn.Parameter(torch.zeros(1000))
    grad = torch.linspace(0.5, 2.0, 1000)
    optimizer = co.FrozenOptimizer([param], artifact, lr=0.0, **kwargs)
    for _ in range(steps):
        param.grad = grad.clone()
        optimizer.step()
    return optimizer, param, grad


def test_bfloat16_second_moment_keeps_tracking(artifact):
    steps = 1000
    optimizer, param, grad = _accumulate(
        artifact, steps, backend="eager", state_dtype=torch.bfloat16
    )
    state = optimizer.state[param]
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k != "step")
    # v_t = (1 - β₂ᵗ) g² exactly, for a constant gradient.
    expected = (1 - 0.999**steps) * grad.double() ** 2
    relative = state["second_moment"].double() / expected - 1
    assert abs(relative.mean().item()) < 0.01
    assert relative.abs().max().item() < 0.25
    # Round-to-nearest storage stalls once 0.1% steps fall under half a bfloat16 spacing.
    v = torch.zeros(1000, dtype=torch.bfloat16)
    for _ in range(steps):
        v = (v.float() * 0.999 + grad**2 * 0.001).to(torch.bfloat16)
    assert (v.double() / expected - 1).mean().item() < -0.2


def test_bfloat16_state_halves_memory_and_trains(artifact):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    losses, bytes_per_param = {}, {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        optimizer = co.FrozenOptimizer(
            model.parameters(), artifact, backend="eager", lr=3.0, state_dtype=dtype
        )
        for _ in range(60):
            optimizer.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            optimizer.step()
        losses[dtype] = loss.item()
        params = sum(p.numel() for p in model.parameters())
        state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
        bytes_per_param[dtype] = sum(v.numel() * v.element_size() for v in state) / params
    assert (
        bytes_per_param[None] > 16
        and bytes_per_param[torch.bfloat16] < 0.55 * bytes_per_param[None]
    )
    start = ((y - y.mean()) ** 2).mean().item()
    assert losses[torch.bfloat16] < 0.8 * start
    assert abs(losses[torch.bfloat16] - losses[None]) < 0.1 * losses[None]


def test_bfloat16_state_dict_resumes_exactly(artifact):
    def run(model, optimizer, steps):
        generator = torch.Generator().manual_seed(len(optimizer.state))
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(8, 4, generator=generator)).square().mean().backward()
            optimizer.step()

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = co.FrozenOptimizer(
            model.parameters(),
            artifact,
            backend="torchscript",
            state_dtype=torch.bfloat16,
            trust_code=True,
        )
        return model, opt

    model, optimizer = make()
    run(model, optimizer, 3)
    run(model, optimizer, 4)
    resumed_model, resumed = make()
    run(resumed_model, resumed, 3)
    buffer = io.BytesIO()
    torch.save({"m": resumed_model.state_dict(), "o": resumed.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model, fresh = make()
    fresh_model.load_state_dict(saved["m"])
    fresh.load_state_dict(saved["o"])
    assert all(
        v.dtype == torch.bfloat16 for s in fresh.state.values() for k, v in s.items() if k != "step"
    )
    run(fresh_model, fresh, 4)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_backend_rounds_in_graph_like_eager(artifact):
    eager, p_eager, _ = _accumulate(artifact, 20, backend="eager", state_dtype=torch.bfloat16)
    compiled, p_compiled, _ = _accumulate(
        artifact, 20, backend="compiled", state_dtype=torch.bfloat16
    )
    # converted and rounded in the compiled graph itself
    rule = compiled._schema_strategy.rules(p_compiled.device).single
    assert isinstance(rule, CompiledTensorRule) and rule.state_dtype == torch.bfloat16
    for key, value in eager.state[p_eager].items():
        other = compiled.state[p_compiled][key]
        assert other.dtype == value.dtype
        if key != "step":
            torch.testing.assert_close(other.float(), value.float(), rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.float16, torch.int32, "bf16"])
def test_bad_state_dtype_is_refused(artifact, bad):
    param = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="state_dtype"):
        co.FrozenOptimizer([param], artifact, state_dtype=bad)
