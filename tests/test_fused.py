"""The fused CoordinateMLP formulation (for Inductor) equals the matmul formulation."""

import pytest
import torch
from registry import SHAPES

from compiledopt.export import freeze_transform
from compiledopt.learned import CoordinateMLP


def _perturbed(hidden_sizes):
    torch.manual_seed(0)
    transform = CoordinateMLP(hidden_sizes=hidden_sizes).double()
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(0.1 * torch.randn_like(weight))
    return transform


@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_fused_equals_matmul_form_over_steps(rank):
    reference = _perturbed((16,))
    fused = freeze_transform(reference, fused=True)
    assert fused.fused and not reference.fused
    generator = torch.Generator().manual_seed(rank)
    param = torch.randn(SHAPES[rank], generator=generator, dtype=torch.float64)
    states = [reference.init_state(param), fused.init_state(param)]
    for k in range(5):
        grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        step = torch.tensor(k)
        with torch.no_grad():
            expected, states[0] = reference.update(grad, param, states[0], step)
            actual, states[1] = fused.update(grad, param, states[1], step)
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
        assert expected.abs().max() > 0


def test_deeper_networks_keep_the_matmul_form(monkeypatch):
    deep = freeze_transform(_perturbed((8, 8)), fused=True)
    shallow = freeze_transform(_perturbed((8, 8)), fused=False)

    def unrolled(*args):
        raise AssertionError("the unrolled network ran for two hidden layers")

    monkeypatch.setattr(deep, "_fused_network", unrolled)
    param = torch.randn(4, 3, dtype=torch.float64)
    grad = torch.randn(4, 3, dtype=torch.float64)
    step = torch.tensor(0)
    a, _ = deep.update(grad, param, deep.init_state(param), step)
    b, _ = shallow.update(grad, param, shallow.init_state(param), step)
    # The fused statistics (row and column means as matrix-vector products) round differently
    # from mean() on some CPUs; the network itself is the same matmul form.
    torch.testing.assert_close(a, b, atol=1e-15, rtol=1e-12)
    assert a.abs().max() > 0
