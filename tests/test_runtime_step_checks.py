"""What a step checks of the parameters and gradients it is about to write, as they may have
changed since the constructor checked them (param groups edited by hand, a gradient resized or
retyped in place): each is refused naming the parameter and the value, before anything is
written, where torch.optim.AdamW steps it wrongly, or raises halfway through writing."""

import pytest
import torch
from torch import nn

import compiledopt as co

PACKAGED = "normalized-mlp"


def _params(seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]


def _frozen(params, backend="eager", **kwargs):
    return co.FrozenOptimizer(params, PACKAGED, backend=backend, **kwargs)


def _grads(params):
    for p in params:
        p.grad = torch.ones_like(p)


def _refused(optimizer, params, error, message):
    """The step raises ``error`` matching ``message`` and writes no parameter and no state."""
    before = [p.detach().clone() for p in params]
    states = [dict(optimizer.state[p]) for p in params]
    with pytest.raises(error, match=message):
        optimizer.step()
    for p, b, s in zip(params, before, states):
        assert torch.equal(p.detach(), b)
        assert dict(optimizer.state[p]) == s


def test_adamw_applies_a_parameter_listed_twice_by_hand_twice():
    # The reference: AdamW steps it twice (its count goes to 2); a FrozenOptimizer would apply
    # its one computed update twice and count one step.
    params = _params()
    adamw = torch.optim.AdamW(params)
    adamw.param_groups[0]["params"].append(params[0])
    _grads(params)
    adamw.step()
    assert int(adamw.state[params[0]]["step"]) == 2


@pytest.mark.parametrize("where", ["same group", "another group"])
def test_a_parameter_listed_twice_by_hand_is_refused(where):
    params = _params()
    if where == "same group":
        optimizer = _frozen(params)
        optimizer.param_groups[0]["params"].append(params[0])
    else:
        optimizer = _frozen([{"params": [params[0]]}, {"params": [params[1]]}])
        optimizer.param_groups[1]["params"].append(params[0])
    _grads(params)
    _refused(optimizer, params, ValueError, "parameter 2 is listed more than once")


def test_a_complex_parameter_added_by_hand_is_refused():
    # Its gradient would be cast to a real dtype (the imaginary part dropped) and its real part
    # stepped.
    params = _params()
    optimizer = _frozen(params)
    extra = nn.Parameter(torch.randn(2, dtype=torch.complex64))
    optimizer.param_groups[0]["params"].append(extra)
    _grads([*params, extra])
    _refused(
        optimizer,
        [*params, extra],
        ValueError,
        "parameter 2 has dtype torch.complex64",
    )


def test_an_expanded_parameter_is_refused_where_adamw_raises_after_writing_others():
    first, shared = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(1, 3).expand(4, 3))
    adamw = torch.optim.AdamW([first, shared])
    _grads([first, shared])
    before = first.detach().clone()
    with pytest.raises(RuntimeError, match="more than one element"):
        adamw.step()
    assert not torch.equal(first.detach(), before), "AdamW wrote the first parameter"
    with pytest.raises(ValueError, match=r"has elements that share memory \(shape \(4, 3\), "):
        _frozen([first, shared])
    # Made so after construction, it is refused by the step.
    params = _params()
    optimizer = _frozen(params)
    params[1].data = torch.randn(1).expand(3)
    _grads(params)
    _refused(optimizer, params, ValueError, r"parameter 1 has elements that share memory")


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param(
            lambda g: g.resize_(5),
            r"parameter 1: its gradient has shape \(5,\) and dtype torch.float32 on cpu, the "
            r"parameter shape \(3,\)",
            id="resize_",
        ),
        pytest.param(
            lambda g: setattr(g, "data", torch.ones(3, 1)),
            r"parameter 1: its gradient has shape \(3, 1\)",
            id="data",
        ),
    ],
)
def test_a_gradient_resized_in_place_is_refused_naming_it(backend, edit, message):
    # The setter of .grad refuses a gradient of another shape; resized in place, the eager rule
    # raised its own error and the TorchScript graph a raw interpreter error.
    params = _params()
    optimizer = _frozen(params, backend)
    _grads(params)
    edit(params[1].grad)
    _refused(optimizer, params, ValueError, message)


def test_a_gradient_of_an_integer_dtype_is_refused():
    params = _params()
    optimizer = _frozen(params)
    params[1].grad_dtype = None  # lets the setter take a gradient of any dtype
    _grads(params)
    params[1].grad = torch.ones(3, dtype=torch.int64)
    _refused(optimizer, params, ValueError, "parameter 1: its gradient has shape .* torch.int64")


def test_a_gradient_of_another_floating_dtype_steps_as_the_parameters_own():
    params, twins = _params(), _params()
    optimizer, reference = _frozen(params), _frozen(twins)
    params[1].grad_dtype = None
    _grads(twins)
    params[0].grad = torch.ones(4, 3)
    params[1].grad = torch.ones(3, dtype=torch.float64)
    optimizer.step()
    reference.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_maximize_set_in_a_group_by_hand_must_be_a_bool(value):
    # The constructor and add_param_group refuse a maximize that is not a bool; set in
    # param_groups after construction, a truthy "no" ascended (AdamW reads it as truthy too).
    params = _params()
    optimizer = _frozen(params)
    optimizer.param_groups[0]["maximize"] = value
    _grads(params)
    _refused(
        optimizer,
        params,
        ValueError,
        rf"Invalid maximize in the group of parameter 0: {value!r} \(expected a bool\)",
    )
    optimizer.param_groups[0]["maximize"] = True
    ascended = _params()
    reference = _frozen(ascended, maximize=True)
    _grads(ascended)
    optimizer.step()
    reference.step()
    for p, q in zip(params, ascended):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_parameter_appended_by_hand_to_a_named_group_steps_and_round_trips():
    # torch.optim.AdamW steps a parameter appended to a named group's params (its param_names
    # then one short); every step raised an IndexError (the messages' labels ran out).
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.randn(3))
    optimizer = _frozen(model.named_parameters(), nonfinite="raise")
    optimizer.param_groups[0]["params"].append(extra)
    adamw = torch.optim.AdamW(nn.Linear(3, 2).named_parameters())
    adamw.param_groups[0]["params"].append(nn.Parameter(torch.randn(3)))
    for opt in (optimizer, adamw):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
        assert int(opt.state[opt.param_groups[0]["params"][2]]["step"]) == 1
    resumed = _frozen(list(model.named_parameters()))
    resumed.param_groups[0]["params"].append(extra)
    resumed.load_state_dict(optimizer.state_dict())
    assert int(resumed.state[extra]["step"]) == 1
    extra.grad = torch.full((3,), float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite gradient for parameter 2"):
        optimizer.step()


def test_a_sparse_parameter_is_refused_naming_its_layout():
    # AdamW takes one and refuses its sparse gradient at the step; a FrozenOptimizer refuses it
    # when given (it took it as a tensor whose elements share memory: its strides read 0).
    sparse = nn.Parameter(torch.randn(3, 4).to_sparse())
    torch.optim.AdamW([sparse])
    with pytest.raises(
        ValueError,
        match=r"supports dense parameters; parameter of shape \(3, 4\) has layout "
        r"torch.sparse_coo",
    ):
        _frozen([sparse])
