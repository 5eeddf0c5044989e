"""Every bad input raises a clear exception that names the offending value."""

import math

import pytest
import torch
from torch import nn

import compiledopt as co

FACTORIES = {
    "module": co.optim.ModuleTransform(nn.Linear),
    "kronecker": co.optim.KroneckerTransform(co.nn.KroneckerLinear),
    "metacurvature": co.optim.MetaCurvatureTransform,
}


@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf, "0.1", True, None])
def test_invalid_lr(lr):
    with pytest.raises(ValueError, match="Invalid lr"):
        co.optim.LearnableOptimizer(nn.Linear(2, 2), co.optim.MetaCurvatureTransform, lr=lr)
    with pytest.raises(ValueError, match="Invalid lr"):
        co.optim.DifferentiableSGD(lr)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="Tensor"):
        co.optim.LearnableOptimizer(torch.zeros(3), co.optim.MetaCurvatureTransform)
    with pytest.raises(TypeError, match="list"):
        co.update_module([nn.Parameter(torch.zeros(2))], [None])
    with pytest.raises(TypeError, match="int"):
        co.clone_module(3)


def test_model_without_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        co.optim.LearnableOptimizer(model, co.optim.MetaCurvatureTransform)


def test_factory_returning_a_non_module():
    with pytest.raises(TypeError, match=r"returned Tensor .*'weight' of shape \(2, 3\)"):
        co.optim.LearnableOptimizer(nn.Linear(3, 2), lambda p: p * 2)
    with pytest.raises(TypeError, match="returned function"):
        co.optim.ModuleTransform(lambda n, m: lambda g: g)(torch.zeros(3))
    with pytest.raises(TypeError, match="returned int"):
        co.optim.KroneckerTransform(lambda n, m, bias, psd: 7)(torch.zeros(3))
    with pytest.raises(TypeError, match="str"):
        co.optim.LearnableOptimizer(nn.Linear(3, 2), "kronecker")


def test_kronecker_layer_without_state_interface():
    with pytest.raises(TypeError, match="no init_state"):
        co.optim.KroneckerTransform(lambda n, m, bias, psd: nn.Identity())(torch.zeros(3))


@pytest.mark.parametrize("name", FACTORIES)
def test_unsupported_shapes(name):
    factory = FACTORIES[name]
    with pytest.raises(ValueError, match=r"\(1, 1, 1, 1, 1, 2\)"):
        factory(torch.zeros(1, 1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"empty parameter of shape \(0, 3\)"):
        factory(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"torch\.int64"):
        factory(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"torch\.complex64"):
        factory(torch.zeros(3, dtype=torch.complex64))


@pytest.mark.parametrize("name", FACTORIES)
def test_gradient_of_wrong_shape(name):
    transform = FACTORIES[name](torch.zeros(4, 3))
    with pytest.raises(
        ValueError, match=r"shape \[3, 4\] given to a transform bound to shape \[4, 3\]"
    ):
        transform(torch.zeros(3, 4))
    step = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\[12\]"):
        transform.update(torch.zeros(12), torch.zeros(12), [], step)


@pytest.mark.parametrize("n, m", [(0, 3), (3, -1), (2.5, 2), (True, 2)])
def test_kronecker_layer_sizes(n, m):
    for layer in (co.nn.KroneckerLinear, co.nn.KroneckerRNN, co.nn.KroneckerLSTM):
        with pytest.raises(ValueError, match="positive integer"):
            layer(n, m)


def test_update_module_mismatches():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="1 updates for a module with 2 parameters"):
        co.update_module(model, [None])
    with pytest.raises(
        ValueError, match=r"shape \(3, 2\) for parameter 'weight' of shape \(2, 3\)"
    ):
        co.update_module(model, [torch.zeros(3, 2), None])
    with pytest.raises(TypeError, match="'bias' is float"):
        co.update_module(model, [None, 1.0])


def test_parameter_update_never_swallows_errors():
    model = nn.Linear(3, 2)
    unused = nn.Parameter(torch.zeros(2))
    get_update = co.optim.ParameterUpdate(
        [*model.parameters(), unused], co.optim.MetaCurvatureTransform
    )
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="not have been used"):
        get_update(model(x).sum(), [*model.parameters(), unused])
    updates = get_update(model(x).sum(), [*model.parameters(), unused], allow_unused=True)
    assert updates[2] is None and updates[0].shape == (2, 3)

    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        get_update(model(x).sum() + frozen.sum(), [*model.parameters(), frozen])
    updates = get_update(
        model(x).sum() + frozen.sum(), [*model.parameters(), frozen], allow_nograd=True
    )
    assert updates[2] is None and updates[1].shape == (2,)

    with pytest.raises(ValueError, match="built for 3 parameters, got 2"):
        get_update(model(x).sum(), list(model.parameters()))
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(3, 2\)"):
        get_update(model(x).sum(), [torch.zeros(3, 2), *list(model.parameters())[1:], unused])
    with pytest.raises(TypeError, match="one Tensor"):
        co.optim.ParameterUpdate(torch.zeros(3), co.optim.MetaCurvatureTransform)


def test_transform_dictionary_bad_values():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="mapping"):
        co.optim.TransformDictionary([p])
    with pytest.raises(TypeError, match=r"shape \(2,\)"):
        co.optim.TransformDictionary({p: 3})
    with pytest.raises(KeyError, match=r"shape \(2,\) and no default"):
        co.optim.TransformDictionary({})(p)


def test_metacurvature_lr():
    for lr in (math.nan, "x"):
        with pytest.raises(ValueError, match="Invalid lr"):
            co.optim.MetaCurvatureTransform(torch.zeros(3), lr=lr)


@pytest.mark.parametrize("layer", ["KroneckerLinear", "KroneckerRNN", "KroneckerLSTM"])
def test_kronecker_layer_input_of_the_wrong_size(layer):
    # learn2learn raises ValueError here too; a bare reshape RuntimeError names neither shape.
    module = getattr(co.nn, layer)(3, 4)
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"\(3, 4\) = 12 elements.*shape \[5, 2\]"):
        if layer == "KroneckerLinear":
            module(x)
        else:
            module.step(x, module.init_state(torch.zeros(3, 4)))
