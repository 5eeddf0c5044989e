"""load_state_dict of a state_dict saved with the parameters named otherwise or in another
order: refused naming both names (torch.optim loads each state by position onto whatever
parameter is there, and renames the parameters after the saved ones), or loaded as saved once a
pre-hook has reordered it."""

import copy

import pytest
import torch
from torch import nn

import compiledopt as co

PACKAGED = "normalized-mlp"


def _pair():
    torch.manual_seed(0)
    return nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))


def _stepped(make, a, b):
    optimizer = make([("a", a), ("b", b)])
    a.grad, b.grad = torch.ones(3), -5 * torch.ones(3)
    optimizer.step()
    return optimizer


def test_adamw_loads_a_swapped_state_dict_onto_the_wrong_parameters():
    # The reference behaviour this guards against: AdamW's state of "b" lands on "a".
    a, b = _pair()
    saved = _stepped(torch.optim.AdamW, a, b)
    swapped = torch.optim.AdamW([("b", b), ("a", a)])
    swapped.load_state_dict(saved.state_dict())
    assert torch.equal(swapped.state[b]["exp_avg"], saved.state[a]["exp_avg"])
    assert swapped.param_groups[0]["param_names"] == ["a", "b"]


def _frozen(params):
    return co.FrozenOptimizer(params, PACKAGED, backend="eager")


def test_a_state_dict_saved_with_the_parameters_in_another_order_is_refused_naming_them():
    a, b = _pair()
    saved = _stepped(_frozen, a, b).state_dict()
    swapped = _frozen([("b", b), ("a", a)])
    with pytest.raises(
        ValueError,
        match="the state_dict's param group 0 lists parameter 'a' at position 0, where this "
        "optimizer has 'b' and lists it at position 1",
    ):
        swapped.load_state_dict(saved)
    assert len(swapped.state) == 0, "nothing is loaded"
    assert swapped.param_groups[0]["param_names"] == ["b", "a"]


def test_a_state_dict_reordered_by_a_pre_hook_loads_and_steps_as_the_uninterrupted_run():
    a, b = _pair()
    original = _stepped(_frozen, a, b)
    saved = copy.deepcopy(original.state_dict())
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    resumed = _frozen([("b", b2), ("a", a2)])

    def reorder(optimizer, state_dict):
        group = state_dict["param_groups"][0]
        ids = dict(zip(group["param_names"], group["params"]))
        group["param_names"] = ["b", "a"]
        group["params"] = [ids["b"], ids["a"]]
        return state_dict

    resumed.register_load_state_dict_pre_hook(reorder)
    resumed.load_state_dict(saved)
    for p, q in ((a, a2), (b, b2)):
        for key, value in original.state[p].items():
            torch.testing.assert_close(resumed.state[q][key], value, rtol=0, atol=0)
    for _ in range(3):
        for p, q in ((a, a2), (b, b2)):
            grad = torch.randn(3)
            p.grad, q.grad = grad, grad.clone()
        original.step()
        resumed.step()
    torch.testing.assert_close(a2, a, rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)


def test_names_on_one_side_only_load_by_position_as_torch_optim_does():
    a, b = _pair()
    saved = _stepped(_frozen, a, b).state_dict()
    unnamed = _frozen([a, b])
    unnamed.load_state_dict(saved)
    assert int(unnamed.state[a]["step"]) == 1


@pytest.mark.parametrize(
    "saved_names, names",
    [
        (["a", "b"], ["module.a", "module.b"]),  # saved before DistributedDataParallel wrapped it
        (["_orig_mod.a", "_orig_mod.b"], ["a", "b"]),  # saved from a torch.compile'd model
        (["a", "b"], ["encoder.x", "encoder.y"]),  # a model renamed since: loads by position
    ],
)
def test_names_changed_by_a_wrapper_or_a_rename_load_by_position(saved_names, names):
    a, b = _pair()
    saved = _stepped(_frozen, a, b).state_dict()
    saved["param_groups"][0]["param_names"] = saved_names
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    resumed = _frozen(list(zip(names, (a2, b2))))
    resumed.load_state_dict(saved)
    for q in (a2, b2):
        assert int(resumed.state[q]["step"]) == 1


def test_a_swap_behind_a_wrapper_prefix_is_refused():
    a, b = _pair()
    saved = _stepped(_frozen, a, b).state_dict()
    swapped = _frozen([("module.b", b), ("module.a", a)])
    with pytest.raises(ValueError, match="lists parameter 'a' at position 0, where this optimizer"):
        swapped.load_state_dict(saved)


def _tampered(optimizer):
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0]["params"] = [0, 0]
    return saved


def test_adamw_loads_a_state_dict_listing_an_id_twice_onto_the_wrong_parameter():
    a, b = _pair()
    original = _stepped(torch.optim.AdamW, a, b)
    fresh = torch.optim.AdamW([("a", a), ("b", b)])
    fresh.load_state_dict(_tampered(original))
    assert a not in fresh.state and torch.equal(
        fresh.state[b]["exp_avg"], original.state[a]["exp_avg"]
    )


def test_a_state_dict_listing_an_id_twice_is_refused():
    a, b = _pair()
    original = _stepped(_frozen, a, b)
    fresh = _frozen([("a", a), ("b", b)])
    with pytest.raises(
        ValueError, match="the state_dict's param group 0 lists parameter id 0, which an earlier"
    ):
        fresh.load_state_dict(_tampered(original))
    assert len(fresh.state) == 0


def _edited(edit):
    a, b = _pair()
    saved = copy.deepcopy(_stepped(_frozen, a, b).state_dict())
    edit(saved)
    return saved, _frozen([("a", a), ("b", b)])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(state=[1]), "the state_dict's 'state' must be a dict, got list"),
        (
            lambda s: s.update(param_groups=None),
            "the state_dict's 'param_groups' must be a list, got NoneType",
        ),
        (
            lambda s: s.update(param_groups=[1]),
            "the state_dict's param group 0 must be a dict, got int",
        ),
        (
            lambda s: s["param_groups"][0].pop("params"),
            "the state_dict's param group 0 must list its parameter ids in 'params', got None",
        ),
        (
            lambda s: s["param_groups"][0].update(params=[[0], 1]),
            r"the state_dict's param group 0 lists \[0\] as a parameter id",
        ),
        (
            lambda s: s["param_groups"][0].update(param_names=["a", "b", "c"]),
            r"the state_dict's param group 0 has param_names \['a', 'b', 'c'\] for 2 parameters",
        ),
    ],
)
def test_a_malformed_state_dict_is_refused_naming_the_entry(edit, message):
    # torch.optim's loader (AdamW's) fails on these with an AttributeError, a TypeError or a
    # KeyError, or (more param_names than params) loads them.
    saved, fresh = _edited(edit)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(saved)
    assert len(fresh.state) == 0 and fresh.param_groups[0]["param_names"] == ["a", "b"]
