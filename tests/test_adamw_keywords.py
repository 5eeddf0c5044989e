"""AdamW habits: FrozenOptimizer is built the way torch.optim.AdamW is, and each AdamW keyword is
honoured with AdamW's meaning or refused with a message that says why (one test per row of the
table in docs/integrations.md)."""

import copy
import logging

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.pretrained import DEFAULT


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(optimizer, model, sign: float = 1.0, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        optimizer.zero_grad()
        (sign * model(x).square().mean()).backward()
        optimizer.step()


def test_no_artifact_is_the_packaged_default_and_says_so(caplog) -> None:
    model = _model()
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        optimizer = co.FrozenOptimizer(model.parameters(), backend="eager")
    assert optimizer.artifact.path.name == DEFAULT
    assert f"the packaged default {DEFAULT!r}" in caplog.text
    assert optimizer.defaults["lr"] == optimizer.artifact.manifest["lr"]
    with_lr = co.FrozenOptimizer(model.parameters(), lr=1e-3, backend="eager")
    assert with_lr.defaults["lr"] == 1e-3


def test_lr_given_in_the_artifact_position_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match=r"not the learning rate; pass lr=0\.001 by keyword"):
        co.FrozenOptimizer(_model().parameters(), 1e-3)


@pytest.mark.parametrize(
    "keyword, value, shown",
    [
        ("betas", (0.9, 0.999), r"Invalid betas: \(0\.9, 0\.999\): FrozenOptimizer has no betas"),
        ("eps", 1e-8, r"Invalid eps: 1e-08: FrozenOptimizer has no eps"),
        ("amsgrad", True, r"Invalid amsgrad: True: the learned rule keeps no second-moment"),
        ("capturable", True, r"Invalid capturable: True: .*CUDA-graph capture"),
        ("differentiable", True, r"Invalid differentiable: True: .*LearnableOptimizer"),
        ("amsgrad", "no", r"Invalid amsgrad: 'no' \(a bool\)"),
        ("foreach", "yes", r"Invalid foreach: 'yes' \(None or a bool\)"),
        ("fused", 1, r"Invalid fused: 1 \(None or a bool\)"),
        ("maximize", "yes", r"Invalid maximize: 'yes'"),
    ],
)
def test_keywords_it_cannot_honour_are_refused(keyword, value, shown) -> None:
    with pytest.raises(ValueError, match=shown):
        co.FrozenOptimizer(_model().parameters(), **{keyword: value})


@pytest.mark.parametrize("keyword", ["amsgrad", "capturable", "differentiable"])
def test_adamw_defaults_of_those_keywords_are_accepted(keyword) -> None:
    optimizer = co.FrozenOptimizer(_model().parameters(), backend="eager", **{keyword: False})
    assert optimizer.backend == "eager"


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted_and_changes_nothing(foreach) -> None:
    reference, model = _model(), _model()
    _train(co.FrozenOptimizer(reference.parameters(), backend="eager"), reference)
    _train(co.FrozenOptimizer(model.parameters(), backend="eager", foreach=foreach), model)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_fused_asks_for_the_compiled_backend() -> None:
    params = _model().parameters()
    assert co.FrozenOptimizer(params, fused=True).backend == "compiled"
    assert co.FrozenOptimizer(_model().parameters(), fused=False, backend="eager").backend == (
        "eager"
    )
    with pytest.raises(ValueError, match="fused=True asks for the compiled backend"):
        co.FrozenOptimizer(_model().parameters(), fused=True, backend="eager")


def test_maximize_ascends_as_descent_on_the_negated_loss() -> None:
    ascending, descending = _model(), _model()
    optimizer = co.FrozenOptimizer(ascending.parameters(), backend="eager", maximize=True)
    _train(optimizer, ascending, sign=-1.0)
    _train(co.FrozenOptimizer(descending.parameters(), backend="eager"), descending)
    for a, b in zip(ascending.parameters(), descending.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The caller's gradients are left as they were computed, as torch.optim leaves them.
    grads = [p.grad.clone() for p in ascending.parameters()]
    optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(ascending.parameters(), grads))


def test_maximize_is_per_group_and_travels_in_the_state_dict() -> None:
    model = _model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    optimizer = co.FrozenOptimizer(
        [{"params": first, "maximize": True}, {"params": second}], backend="eager"
    )
    assert [g["maximize"] for g in optimizer.param_groups] == [True, False]
    saved = optimizer.state_dict()
    other = co.FrozenOptimizer(model.parameters(), backend="eager")
    other = co.FrozenOptimizer(
        [{"params": first}, {"params": second}], backend="eager"
    )  # same layout, no maximize
    other.load_state_dict(saved)
    assert [g["maximize"] for g in other.param_groups] == [True, False]
    old = copy.deepcopy(saved)
    for group in old["param_groups"]:
        del group["maximize"]
    other.load_state_dict(old)
    assert [g["maximize"] for g in other.param_groups] == [False, False]
    with pytest.raises(ValueError, match="Invalid maximize: 1"):
        other.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "maximize": 1})


def test_weight_decay_is_decoupled_like_adamw() -> None:
    """With a zero gradient history the learned rule's direction is zero, so one step is the
    decay alone: ``p ← p − lr·wd·p``, as AdamW applies it."""
    param = nn.Parameter(torch.full((3,), 2.0))
    optimizer = co.FrozenOptimizer([param], lr=0.1, weight_decay=0.5, backend="eager")
    reference = nn.Parameter(torch.full((3,), 2.0))
    adamw = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.5)
    param.grad, reference.grad = torch.zeros(3), torch.zeros(3)
    optimizer.step()
    adamw.step()
    torch.testing.assert_close(param.detach(), reference.detach())


def _decayed(make, weight_decay, where):
    param = nn.Parameter(torch.full((3,), 2.0))
    if where == "constructor":
        optimizer = make([param], weight_decay)
    else:  # a group added later, or loaded from a state_dict
        optimizer = make([nn.Parameter(torch.zeros(1))], 0.0)
        optimizer.add_param_group({"params": [param], "weight_decay": weight_decay})
        if where == "loaded":
            again = make([nn.Parameter(torch.zeros(1))], 0.0)
            again.add_param_group({"params": [param], "weight_decay": 0.0})
            again.load_state_dict(optimizer.state_dict())
            optimizer = again
    param.grad = torch.zeros(3)
    optimizer.step()
    return param.detach()


@pytest.mark.parametrize("where", ["constructor", "add_param_group", "loaded"])
def test_a_tensor_weight_decay_is_taken_as_adamw_takes_it(where) -> None:
    # It was refused by the constructor, add_param_group and load_state_dict (a step took one
    # set in param_groups, whose state_dict then failed to load).
    def frozen(params, wd):
        return co.FrozenOptimizer(params, lr=0.1, weight_decay=wd, backend="eager")

    def adamw(params, wd):
        return torch.optim.AdamW(params, lr=0.1, weight_decay=wd)

    expected = _decayed(adamw, torch.tensor(0.5), where)
    torch.testing.assert_close(_decayed(frozen, torch.tensor(0.5), where), expected)
    torch.testing.assert_close(_decayed(frozen, 0.5, where), expected)


@pytest.mark.parametrize(
    "value, message",
    [
        (torch.tensor([0.1, 0.2]), "Tensor weight_decay must be 1-element"),
        (torch.tensor(-0.1), r"Invalid weight_decay: -0.1\d* \(expected a finite number"),
        (torch.tensor(True), r"Invalid weight_decay: tensor\(True\) \(expected a real number\)"),
    ],
)
def test_a_bad_tensor_weight_decay_is_refused_naming_it(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        co.FrozenOptimizer([nn.Parameter(torch.zeros(2))], weight_decay=value, backend="eager")
