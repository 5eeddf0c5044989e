"""Edge cases of the optimizer API that torch.optim.AdamW handles: FrozenOptimizer handles them
alike or refuses them with a message naming the value."""

import copy
import warnings

import pytest
import torch
from torch import nn

import compiledopt as co


def _model_with_empty_layers(seed=0):
    torch.manual_seed(seed)
    # nn.Linear(4, 0): a (0, 4) weight and a (0,) bias, next to ordinary parameters.
    return nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 0), nn.Linear(0, 2)])


def _loss(model, x):
    return model[0](x).pow(2).mean() + model[1](x).sum() + model[2](x[:, :0]).pow(2).mean()


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnx"])
def test_zero_element_parameters_step_as_adamw_steps_them(backend):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    model, alone, adamw_model = (_model_with_empty_layers() for _ in range(3))
    optimizer = co.FrozenOptimizer(model.parameters(), "normalized-mlp", backend=backend)
    # The reference for the other parameters: the same rule without the empty ones.
    nonempty = [p for p in alone.parameters() if p.numel()]
    reference = co.FrozenOptimizer(nonempty, "normalized-mlp", backend=backend)
    adamw = torch.optim.AdamW(adamw_model.parameters())
    for _ in range(3):
        for m, opt in ((model, optimizer), (alone, reference), (adamw_model, adamw)):
            opt.zero_grad()
            _loss(m, x).backward()
            opt.step()
    for p, q in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, a in zip(model.parameters(), adamw_model.parameters()):
        assert int(optimizer.state[p]["step"]) == int(adamw.state[a]["step"]) == 3
        assert all(v.shape == p.shape for k, v in optimizer.state[p].items() if k != "step"), (
            "the rule's state of these parameters has their shape"
        )


def test_a_zero_element_parameter_round_trips_its_state():
    model = _model_with_empty_layers()
    optimizer = co.FrozenOptimizer(model.parameters(), "normalized-mlp", backend="eager")
    x = torch.randn(8, 4)
    optimizer.zero_grad()
    _loss(model, x).backward()
    optimizer.step()
    copy_model = copy.deepcopy(model)
    restored = co.FrozenOptimizer(copy_model.parameters(), "normalized-mlp", backend="eager")
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for opt, m in ((optimizer, model), (restored, copy_model)):
        opt.zero_grad()
        _loss(m, x).backward()
        opt.step()
    for p, q in zip(model.parameters(), copy_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert int(restored.state[q]["step"]) == 2


def test_a_parameter_listed_twice_in_a_group_is_refused():
    w = nn.Parameter(torch.randn(3, 3))
    # torch.optim only warns (and AdamW then steps it twice a step): a FrozenOptimizer would
    # apply the one computed update twice and count one step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.optim.AdamW([w, w])
    assert any("duplicate parameters" in str(c.message) for c in caught)
    with pytest.raises(ValueError, match=r"parameter of shape \(3, 3\) is listed more than once"):
        co.FrozenOptimizer([w, w], "normalized-mlp", backend="eager")
    with pytest.raises(ValueError, match="parameter 'w' is listed more than once"):
        co.FrozenOptimizer([("w", w), ("w", w)], "normalized-mlp", backend="eager")
    optimizer = co.FrozenOptimizer([nn.Parameter(torch.randn(2))], "normalized-mlp")
    with pytest.raises(ValueError, match="listed more than once"):
        optimizer.add_param_group({"params": [w, w]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda ps: torch.optim.AdamW(ps, lr=0.5), "betas"),
        (lambda ps: torch.optim.SGD(ps, lr=0.5), "momentum"),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.5), "eps"),
    ],
)
@pytest.mark.parametrize("stepped", [False, True])
def test_another_optimizers_state_dict_is_refused_even_before_its_first_step(make, key, stepped):
    model = nn.Linear(4, 2)
    other = make(model.parameters())
    if stepped:
        model(torch.randn(3, 4)).sum().backward()
        other.step()
    optimizer = co.FrozenOptimizer(model.parameters(), "normalized-mlp", backend="eager")
    before = copy.deepcopy(optimizer.state_dict())
    # A saved state is refused naming its parameter; with none, the group's foreign entry.
    has_state = bool(other.state_dict()["state"])
    refusal = "parameter 0: .*another optimizer" if has_state else f"group 0 has '{key}'"
    with pytest.raises(ValueError, match=refusal):
        optimizer.load_state_dict(other.state_dict())
    assert optimizer.state_dict() == before  # its lr (not the other's 0.5) and no foreign keys


@pytest.mark.parametrize("key, value", [("momentum", 0.9), ("eps", 1e-8), ("betas", (0.9, 0.99))])
def test_a_group_with_another_optimizers_setting_is_refused_and_own_entries_round_trip(key, value):
    weight, bias = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=f"Invalid param group entry '{key}'"):
        co.FrozenOptimizer([{"params": [weight], key: value}], backend="eager")
    optimizer = co.FrozenOptimizer([weight], backend="eager")
    with pytest.raises(ValueError, match=f"Invalid param group entry '{key}'"):
        optimizer.add_param_group({"params": [bias], key: value})
    assert len(optimizer.param_groups) == 1
    # An entry of the user's own (torch.optim keeps any) goes through state_dict and back.
    optimizer.add_param_group({"params": [bias], "name": "decoder bias"})
    fresh = co.FrozenOptimizer([weight], backend="eager")
    fresh.add_param_group({"params": [bias]})
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.param_groups[1]["name"] == "decoder bias"


@pytest.mark.parametrize("key, value", [("role", "bogus"), ("role", ["matrix"]), ("rule", "bogus")])
def test_a_role_or_rule_set_in_a_group_after_construction_is_refused_by_name(key, value):
    p = nn.Parameter(torch.randn(3, 3))
    optimizer = co.FrozenOptimizer([p], "normalized-mlp", backend="eager")
    # The same refusal as for a group given so (add_param_group), and nothing written.
    with pytest.raises(ValueError, match=f"Invalid {key}.*{value!r}".replace("[", r"\[")):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(2))], key: value})
    optimizer.param_groups[0][key] = value
    before = p.detach().clone()
    p.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match=f"Invalid {key}.*{value!r}".replace("[", r"\[")):
        optimizer.step()
    assert torch.equal(p, before) and not optimizer.state[p]


def test_a_group_routed_to_a_rule_the_backend_cannot_compute_is_refused_when_added():
    p, q = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    # The constructor refuses such a group on an exported backend (its graphs compute the rule
    # as configured); add_param_group and load_state_dict refuse it alike, rather than leave an
    # optimizer whose every step raises.
    refusal = "the onnx backend runs the graphs .*, not the rules? .*'adam'"
    with pytest.raises(ValueError, match=refusal):
        co.FrozenOptimizer([{"params": [q], "rule": "adam"}], "normalized-mlp", backend="onnx")
    optimizer = co.FrozenOptimizer([p], "normalized-mlp", backend="onnx")
    with pytest.raises(ValueError, match=refusal):
        optimizer.add_param_group({"params": [q], "rule": "adam"})
    assert len(optimizer.param_groups) == 1
    eager = co.FrozenOptimizer([{"params": [q], "rule": "adam"}], "normalized-mlp", backend="eager")
    loading = co.FrozenOptimizer([q], "normalized-mlp", backend="onnx")
    with pytest.raises(ValueError, match=refusal):
        loading.load_state_dict(eager.state_dict())
    assert loading.param_groups[0]["rule"] is None
    before = p.detach().clone()
    p.grad = torch.randn(4, 3)
    optimizer.step()  # the optimizer still steps
    assert not torch.equal(p, before)


@pytest.fixture(scope="module")
def kronecker_without_empty_layers(tmp_path_factory):
    """A bound (Kronecker) artifact exported for the parameters of
    :func:`_model_with_empty_layers` that have elements: no bound family but a per-element one
    can be built for a zero-element parameter."""
    from compiledopt.export import build_bound, export_bound

    spec = {"kind": "kronecker", "layer": "KroneckerRNN", "bias": True, "psd": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        named = [(n, p) for n, p in _model_with_empty_layers().named_parameters() if p.numel()]
    path = tmp_path_factory.mktemp("bound") / "kronecker"
    transforms = build_bound(spec, [p.shape for _, p in named])
    return export_bound(path, spec, transforms, named, ("torchscript",), lr=0.1)


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_zero_element_parameters_step_with_a_bound_artifact_as_with_a_shape_agnostic_one(
    kronecker_without_empty_layers, backend
):
    # A bound artifact binds the parameters with elements; the zero-element ones step as a
    # shape-agnostic rule (and AdamW) steps them: the count advanced, nothing else (they were
    # refused: "bound to 3 parameters, got 6").
    artifact = kronecker_without_empty_layers
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, alone = _model_with_empty_layers(), _model_with_empty_layers()
    optimizer = co.FrozenOptimizer(
        model.named_parameters(), artifact, backend=backend, trust_code=True
    )
    nonempty = [(n, p) for n, p in alone.named_parameters() if p.numel()]
    reference = co.FrozenOptimizer(nonempty, artifact, backend=backend, trust_code=True)
    for _ in range(3):
        for m, opt in ((model, optimizer), (alone, reference)):
            opt.zero_grad()
            _loss(m, x).backward()
            opt.step()
    for p, q in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert int(optimizer.state[p]["step"]) == 3
        if p.numel():
            assert optimizer.state[p].keys() == reference.state[q].keys()
        else:
            assert list(optimizer.state[p]) == ["step"]
    # Saved and loaded into a fresh optimizer, it goes on as the uninterrupted one.
    resumed_model = copy.deepcopy(model)
    resumed = co.FrozenOptimizer(
        resumed_model.named_parameters(), artifact, backend=backend, trust_code=True
    )
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m, opt in ((model, optimizer), (resumed_model, resumed), (alone, reference)):
        opt.zero_grad()
        _loss(m, x).backward()
        opt.step()
    for p, q, r in zip(model.parameters(), resumed_model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(p, r, rtol=0, atol=0)
    # A state for a zero-element parameter it leaves out is refused as another rule's.
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][2]["extra"] = torch.zeros(0, 4)
    with pytest.raises(ValueError, match=r"parameter 1.weight: .*unexpected \['extra'\]"):
        resumed.load_state_dict(saved)


def test_a_param_group_without_params_or_with_none_is_refused_naming_it():
    # AdamW raises a KeyError 'params' and "'NoneType' object is not iterable".
    with pytest.raises(KeyError):
        torch.optim.AdamW([{"lr": 0.1}])
    with pytest.raises(ValueError, match=r"^a param group has no 'params'$"):
        co.FrozenOptimizer([{"lr": 0.1}], "normalized-mlp", backend="eager")
    with pytest.raises(
        TypeError,
        match="a param group's params must be a tensor or an iterable of tensors, got NoneType",
    ):
        co.FrozenOptimizer([{"params": None}], "normalized-mlp", backend="eager")
    optimizer = co.FrozenOptimizer([nn.Parameter(torch.zeros(2))], "normalized-mlp")
    with pytest.raises(TypeError, match="got int"):
        optimizer.add_param_group({"params": 3})
