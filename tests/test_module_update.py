"""clone_module / update_module / DifferentiableSGD against a torch.func reference (float64)."""

import torch
from models import batch, conv_model, mse
from torch import nn
from torch.func import functional_call

import compiledopt as co


def test_two_step_maml_matches_functional_reference():
    model = conv_model()
    sgd = co.optim.DifferentiableSGD(0.2)
    learner = co.clone_module(model)
    for t in range(2):
        x, y = batch(t)
        grads = torch.autograd.grad(mse(learner(x), y), learner.parameters(), create_graph=True)
        sgd(learner, grads)
    x, y = batch(2)
    mse(learner(x), y).backward()
    got = [p.grad.clone() for p in model.parameters()]

    reference = conv_model()
    names = [n for n, _ in reference.named_parameters()]
    start = [p.detach().clone().requires_grad_() for p in reference.parameters()]
    theta = dict(zip(names, start))
    for t in range(2):
        x, y = batch(t)
        grads = torch.autograd.grad(
            mse(functional_call(reference, theta, (x,)), y), list(theta.values()), create_graph=True
        )
        theta = {n: v - 0.2 * g for (n, v), g in zip(theta.items(), grads)}
    x, y = batch(2)
    want = torch.autograd.grad(mse(functional_call(reference, theta, (x,)), y), start)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_update_module_adds_and_keeps_ties():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert len(list(model.parameters())) == 2
    clone = co.clone_module(model)
    assert clone[0] is clone[2] and clone[0] is not shared
    updates = [torch.ones(3, 3), None]
    co.update_module(clone, updates)
    torch.testing.assert_close(clone[0].weight, shared.weight + 1)
    assert clone[2].weight is clone[0].weight
    assert clone[0].bias is not shared.bias and torch.equal(clone[0].bias, shared.bias)
    assert isinstance(shared.weight, nn.Parameter)  # the original is untouched


def test_clone_is_independent_and_differentiable():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    clone = co.clone_module(model)
    clone.train()
    x = torch.randn(5, 3)
    out = clone(x).sum()
    assert not torch.equal(clone[1].running_mean, model[1].running_mean)
    assert torch.count_nonzero(model[1].running_mean) == 0
    clone.register_forward_hook(lambda *args: None)
    assert len(model._forward_hooks) == 0
    out.backward()
    assert model[0].weight.grad is not None  # gradients reach the original


def test_recurrent_modules_clone_and_update():
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, batch_first=True)
    clone = co.clone_module(model)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(clone(x)[0], model(x)[0])
    grads = torch.autograd.grad(clone(x)[0].sum(), clone.parameters(), create_graph=True)
    co.optim.DifferentiableSGD(0.1)(clone, grads)
    expected = nn.LSTM(3, 4, batch_first=True)
    with torch.no_grad():
        for p, q, g in zip(expected.parameters(), model.parameters(), grads):
            p.copy_(q - 0.1 * g)
    torch.testing.assert_close(clone(x)[0], expected(x)[0])
    clone(x)[0].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_differentiable_sgd_uses_grad_attributes_by_default():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    model.bias.grad = None
    weight, bias, grad = (
        model.weight.detach().clone(),
        model.bias.detach().clone(),
        model.weight.grad,
    )
    co.optim.DifferentiableSGD(0.5)(model)
    torch.testing.assert_close(model.weight, weight - 0.5 * grad)
    assert torch.equal(model.bias, bias)
