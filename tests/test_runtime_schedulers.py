"""A tensor learning rate under LR schedulers, with several param groups: each group keeps its
own lr tensor, so a scheduler (which writes each group's tensor in place) gives every group the
lr a float lr would, where torch.optim.AdamW's groups share the default tensor (and
ReduceLROnPlateau halves it once per group)."""

import pytest
import torch
from torch import nn

import compiledopt as co

PACKAGED = "normalized-mlp"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _groups(model):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters()}]


def _frozen(groups, lr):
    return co.FrozenOptimizer(groups, PACKAGED, lr=lr, backend="eager")


def _adamw(groups, lr):
    return torch.optim.AdamW(groups, lr=lr)


def _plateau(optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)


def _per_group(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda e: 1.0, lambda e: 0.5**e])


def _one_cycle(optimizer):
    # No momentum to cycle: the rule's decays are the artifact's.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=10, cycle_momentum=False
    )


def _lrs(make, lr, schedule, steps=4):
    model = _model()
    optimizer = make(_groups(model), lr)
    scheduler = schedule(optimizer)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)
        else:
            scheduler.step()
    return [float(group["lr"]) for group in optimizer.param_groups]


@pytest.mark.parametrize("schedule", [_plateau, _per_group, _one_cycle])
def test_every_group_follows_its_schedule_with_a_tensor_lr_as_with_a_float(schedule):
    expected = _lrs(_adamw, 0.01, schedule)  # the reference: AdamW with a float lr
    assert _lrs(_frozen, 0.01, schedule) == pytest.approx(expected, rel=1e-12)
    assert _lrs(_frozen, torch.tensor(0.01), schedule) == pytest.approx(expected, rel=1e-6)


def test_adamw_groups_share_the_default_lr_tensor():
    # What the test above guards against: AdamW's plateau reductions apply once per group.
    expected = _lrs(_adamw, 0.01, _plateau)
    shared = _lrs(_adamw, torch.tensor(0.01), _plateau)
    assert shared[0] == pytest.approx(expected[0] / 8, rel=1e-6)


def test_the_first_group_keeps_the_given_tensor_and_later_ones_a_copy():
    model = _model()
    lr = torch.tensor(0.01)
    optimizer = _frozen(_groups(model), lr)
    first, second = (group["lr"] for group in optimizer.param_groups)
    assert first is lr, "one group's lr is the tensor given, as torch.optim keeps it"
    assert second is not lr and torch.equal(second, lr)
    optimizer.add_param_group({"params": [nn.Parameter(torch.randn(2))]})
    assert optimizer.param_groups[2]["lr"] is not lr
    given = torch.tensor(0.5)
    optimizer.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lr": given})
    assert optimizer.param_groups[3]["lr"] is given, "an lr given with the group is kept"


def test_a_state_dict_whose_groups_share_an_lr_tensor_loads_them_apart():
    # Saved by an optimizer whose groups shared the default tensor (AdamW's do, and did here),
    # the state_dict (deep-copied on load) keeps them shared: loaded so, a scheduler would write
    # it once per group.
    model = _model()
    saved = _frozen(_groups(model), torch.tensor(0.01)).state_dict()
    saved["param_groups"][1]["lr"] = saved["param_groups"][0]["lr"]
    optimizer = _frozen(_groups(model), 0.01)
    optimizer.load_state_dict(saved)
    first, second = (group["lr"] for group in optimizer.param_groups)
    assert first is not second and torch.equal(first, second)
    scheduler = _plateau(optimizer)
    for _ in range(3):
        scheduler.step(1.0)
    assert [float(g["lr"]) for g in optimizer.param_groups] == pytest.approx([0.0025] * 2)
