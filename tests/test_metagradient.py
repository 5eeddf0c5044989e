"""LearnableOptimizer's meta-gradients against an independent torch.func reference (float64)."""

from typing import Dict, List

import pytest
import torch
from models import batch, conv_model, mse
from registry import LEARNED, LEARNED_IDS, Entry
from torch import Tensor
from torch.func import functional_call

import compiledopt as co
from compiledopt.transforms import UpdateFunction

LR = 0.3


def _grads(model, params: Dict[str, Tensor], data) -> Dict[str, Tensor]:
    x, y = data
    loss = mse(functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _reference_metagradients(model, metaopt, steps: int) -> List[Dict[str, Tensor]]:
    """∇φ L_{t+1}(θ_t − lr·T_φ(g_t)) at the last step, with θ_t and the state s_t obtained by
    running the rule ``steps - 1`` times first (state treated as a constant, one-step truncation).
    Written with torch.func on detached copies: it shares nothing with LearnableOptimizer."""
    names = metaopt.param_names
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = [t.init_state(theta[n]) for n, t in zip(names, metaopt.transforms)]
    for t in range(steps):
        g = _grads(model, {n: v.requires_grad_() for n, v in theta.items()}, batch(t))
        weights = [
            {
                f"transform.{k}": w.detach().clone().requires_grad_()
                for k, w in tr.named_parameters()
            }
            for tr in metaopt.transforms
        ]
        step = torch.tensor(t)
        new_theta, new_states = {}, []
        for i, (n, tr) in enumerate(zip(names, metaopt.transforms)):
            direction, state = functional_call(
                UpdateFunction(tr), weights[i], (g[n], theta[n].detach(), states[i], step)
            )
            new_theta[n] = theta[n].detach() - LR * direction
            new_states.append([s.detach() for s in state])
        if t == steps - 1:
            x, y = batch(steps)
            loss = mse(functional_call(model, new_theta, (x,)), y)
            flat = [w for ws in weights for w in ws.values()]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            out, k = [], 0
            for ws in weights:
                out.append({})
                for name in ws:
                    out[-1][name.removeprefix("transform.")] = grads[k]
                    k += 1
            return out
        theta = {n: v.detach() for n, v in new_theta.items()}
        states = new_states
    raise AssertionError("unreachable")


def _run(entry: Entry, steps: int):
    model = conv_model()
    metaopt = co.optim.LearnableOptimizer(model, lambda p: entry.build(p), lr=LR)
    reference = _reference_metagradients(conv_model(), metaopt, steps)
    for t in range(steps + 1):
        metaopt.zero_grad()
        for w in metaopt.parameters():
            w.grad = None
        x, y = batch(t)
        mse(model(x), y).backward()
        if t < steps:
            metaopt.step()
    return metaopt, reference


@pytest.mark.parametrize("entry", LEARNED, ids=LEARNED_IDS)
@pytest.mark.parametrize("steps", [1, 2])
def test_one_step_metagradient_matches_reference(entry: Entry, steps: int):
    metaopt, reference = _run(entry, steps)
    checked = 0
    for transform, expected in zip(metaopt.transforms, reference):
        for name, weight in transform.named_parameters():
            want = expected[name]
            if want is None:
                assert weight.grad is None or torch.count_nonzero(weight.grad) == 0, name
                continue
            assert weight.grad is not None, f"{entry.name}: no meta-gradient reached {name}"
            torch.testing.assert_close(weight.grad, want, atol=1e-9, rtol=1e-7)
            checked += int(want.abs().max() > 0)
    assert checked > 0, "the reference meta-gradient is zero everywhere: the test would be vacuous"


def test_per_element_step_sizes_closed_form():
    """T(g) = m ⊙ g (MetaCurvature on 0-D/1-D) gives ∂L_{t+1}/∂m = −lr · g_{t+1} ⊙ g_t."""
    torch.manual_seed(0)
    scalar = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    model = torch.nn.ParameterList([scalar, bias])
    x = torch.randn(4, dtype=torch.float64)

    def loss_at(k: float) -> Tensor:
        return ((scalar * x + bias - k) ** 2).sum() + (bias**3).sum()

    metaopt = co.optim.LearnableOptimizer(model, co.optim.MetaCurvatureTransform, lr=LR)
    loss_at(1.0).backward()
    g_t = [scalar.grad.clone(), bias.grad.clone()]
    metaopt.step()
    metaopt.zero_grad()
    loss_at(2.0).backward()
    g_next = [scalar.grad.clone(), bias.grad.clone()]
    for transform, a, b in zip(metaopt.transforms, g_t, g_next):
        torch.testing.assert_close(transform.scale.grad, -LR * b * a, atol=1e-12, rtol=1e-10)


def test_gradient_accumulation_over_two_backwards_adds_up():
    """Two backwards of halves give the same meta-gradient as one backward of the sum."""
    results = []
    for split in (False, True):
        model = conv_model()
        metaopt = co.optim.LearnableOptimizer(model, co.optim.MetaCurvatureTransform, lr=LR)
        x, y = batch(0)
        mse(model(x), y).backward()
        metaopt.step()
        metaopt.zero_grad()
        x, y = batch(1)
        if split:
            mse(model(x[:3]), y[:3]).backward()
            mse(model(x[3:]), y[3:]).backward()
        else:
            (mse(model(x[:3]), y[:3]) + mse(model(x[3:]), y[3:])).backward()
        results.append([w.grad.clone() for w in metaopt.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
