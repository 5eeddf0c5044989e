"""A state edited by hand between steps, in ways that keep a tensor's ``id()`` (set in place with
``.data =``, renamed, resized): the next step refuses it, naming the parameter, the key and the
value, before anything is written, as it refuses a state replaced by a new tensor."""

import pytest
import torch
from torch import nn

import compiledopt as co

PACKAGED = "normalized-mlp"


def _stepped():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    optimizer = co.FrozenOptimizer([w], PACKAGED, backend="eager")
    w.grad = torch.randn_like(w)
    optimizer.step()
    return w, optimizer


def _first(optimizer, w):
    return next(k for k in optimizer.state[w] if k != "step")


def _last(optimizer, w):
    return [k for k in optimizer.state[w] if k != "step"][-1]


def _retyped(optimizer, w):
    # ``.data =`` keeps the tensor object (and its id) and swaps its storage and dtype.
    optimizer.state[w][_first(optimizer, w)].data = torch.zeros(4, 3, dtype=torch.float64)
    return rf"parameter 0: state '{_first(optimizer, w)}' has dtype torch.float64, expected"


def _resized(optimizer, w):
    optimizer.state[w][_first(optimizer, w)].resize_(7)
    return rf"parameter 0: state '{_first(optimizer, w)}' has shape \(7,\), but the rule keeps"


def _reshaped_data(optimizer, w):
    optimizer.state[w][_first(optimizer, w)].data = torch.zeros(9)
    return rf"parameter 0: state '{_first(optimizer, w)}' has shape \(9,\)"


def _renamed_last(optimizer, w):
    # The same tensors in the same order, under another name.
    key = _last(optimizer, w)
    optimizer.state[w]["renamed"] = optimizer.state[w].pop(key)
    return rf"missing \['{key}'\], unexpected \['renamed'\]"


def _on_meta(optimizer, w):
    optimizer.state[w][_first(optimizer, w)] = torch.zeros(4, 3, device="meta")
    return rf"parameter 0: state '{_first(optimizer, w)}' is on meta, the parameter on cpu"


@pytest.mark.parametrize("edit", [_retyped, _resized, _reshaped_data, _renamed_last, _on_meta])
def test_a_state_edited_in_place_is_checked_again_and_refused(edit):
    w, optimizer = _stepped()
    before = w.detach().clone()
    saved = {k: v.clone() for k, v in optimizer.state[w].items()}
    message = edit(optimizer, w)
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert torch.equal(w.detach(), before), "a refused step writes no parameter"
    assert int(optimizer.state[w]["step"]) == int(saved["step"]) == 1


def test_a_state_tensor_replaced_by_one_of_the_same_layout_steps_as_the_original():
    # The shortcut for a state the last step wrote keys on more than ids: an equal replacement
    # (a clone) steps exactly as the original, as torch.optim's optimizers step a state set so.
    w, optimizer = _stepped()
    twin, twin_optimizer = _stepped()
    for key, value in optimizer.state[w].items():
        optimizer.state[w][key] = value.clone()
    grad = torch.randn_like(w)
    w.grad, twin.grad = grad.clone(), grad.clone()
    optimizer.step()
    twin_optimizer.step()
    torch.testing.assert_close(w, twin, rtol=0, atol=0)
