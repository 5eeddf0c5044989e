"""The seed documentation's examples (learn2learn.optim), typos fixed, run against compiledopt.

Fixes: ``l2l`` -> ``co``; ``create_gaph`` -> ``create_graph``; ``torch.nn.Linear()`` given its
sizes; ``ParameterUpdate(model, ...)`` given ``model.parameters()``; ``model.parameters() +
get_update.parameters()`` (generators don't add) made a list; ``data.add_(-lr, update)`` (removed
signature) -> ``data.add_(update, alpha=-lr)``; and the ``ParameterUpdate`` example, which added
``T(g)`` and so ascended, applies the updates with ``DifferentiableSGD`` and descends.
"""

import torch
import torch.nn.functional as F
from torch import nn

import compiledopt as co

torch.manual_seed(0)
X = torch.randn(32, 784)
y = torch.randint(0, 10, (32,))
X_val = torch.randn(32, 784)
y_val = torch.randint(0, 10, (32,))
lr = 0.1


def loss(output, target):
    return F.cross_entropy(output, target)


def test_learnable_optimizer_example():
    linear = nn.Linear(784, 10)
    transform = co.optim.ModuleTransform(torch.nn.Linear)
    metaopt = co.optim.LearnableOptimizer(linear, transform, lr=0.01)
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.001)
    before = [p.detach().clone() for p in linear.parameters()]
    for _ in range(2):
        metaopt.zero_grad()
        opt.zero_grad()
        error = loss(linear(X), y)
        error.backward()
        opt.step()  # update metaopt
        metaopt.step()  # update linear
    assert all(not torch.equal(a, b) for a, b in zip(before, linear.parameters()))
    assert all(w.grad is not None for w in metaopt.parameters())
    assert all(isinstance(p, nn.Parameter) for p in linear.parameters())


def test_parameter_update_example_descends():
    model = torch.nn.Linear(784, 10)
    transform = co.optim.KroneckerTransform(co.nn.KroneckerLinear)
    get_update = co.optim.ParameterUpdate(model.parameters(), transform)
    opt = torch.optim.SGD(list(model.parameters()) + list(get_update.parameters()), lr=0.01)
    sgd = co.optim.DifferentiableSGD(lr=lr)
    for iteration in range(10):
        opt.zero_grad()
        learner = co.clone_module(model)
        error = loss(learner(X), y)
        updates = get_update(error, learner.parameters(), create_graph=True)
        sgd(learner, updates)  # p <- p - lr * T(g): descends
        adapted = loss(learner(X), y)
        assert adapted < error, f"iteration {iteration}: the update did not descend"
        loss(learner(X_val), y_val).backward()
        opt.step()
    assert all(w.grad is not None for w in get_update.parameters())


def test_differentiable_sgd_example():
    model = nn.Linear(784, 10)
    before = [p.detach().clone() for p in model.parameters()]
    sgd = co.optim.DifferentiableSGD(0.1)
    gradients = torch.autograd.grad(loss(model(X), y), model.parameters(), create_graph=True)
    sgd(model, gradients)  # model is updated in-place
    for b, p, g in zip(before, model.parameters(), gradients):
        torch.testing.assert_close(p, b - 0.1 * g)
        assert p.grad_fn is not None  # differentiable


def test_module_transform_example():
    classifier = torch.nn.Linear(784, 10, bias=False)
    linear_transform = co.optim.ModuleTransform(torch.nn.Linear)
    linear_update = linear_transform(classifier.weight)  # a (1, 7840) -> (1, 7840) map
    loss(classifier(X), y).backward()
    update = linear_update(classifier.weight.grad)
    assert update.shape == classifier.weight.shape
    inner = linear_update.transform
    expected = inner(classifier.weight.grad.reshape(1, -1)).reshape(10, 784)
    torch.testing.assert_close(update, expected)
    before = classifier.weight.detach().clone()
    classifier.weight.data.add_(update, alpha=-lr)  # Not differentiable: see DifferentiableSGD.
    torch.testing.assert_close(classifier.weight.data, before - lr * update)


def test_kronecker_transform_example():
    classifier = torch.nn.Linear(784, 10, bias=False)
    kronecker_transform = co.optim.KroneckerTransform(co.nn.KroneckerLinear)
    kronecker_update = kronecker_transform(classifier.weight)
    loss(classifier(X), y).backward()
    update = kronecker_update(classifier.weight.grad)
    torch.testing.assert_close(update, classifier.weight.grad)  # identity at initialisation
    assert sum(w.numel() for w in kronecker_update.parameters()) == 10 * 10 + 784 * 784
    classifier.weight.data.add_(update, alpha=-lr)


def test_metacurvature_transform_example():
    classifier = torch.nn.Linear(784, 10, bias=False)
    metacurvature_update = co.optim.MetaCurvatureTransform(classifier.weight)
    loss(classifier(X), y).backward()
    update = metacurvature_update(classifier.weight.grad)
    torch.testing.assert_close(update, classifier.weight.grad)
    classifier.weight.data.add_(update, alpha=-lr)
