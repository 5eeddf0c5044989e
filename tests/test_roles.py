"""Parameter roles and rules: which rule each parameter steps with, decided from its group (its
role, found from shapes or from module types, and an optional rule), carried by ``state_dict``,
checked when loaded, and computed as a float64 reference of each rule says."""

import copy
from typing import Dict, List

import pytest
import torch
from test_normalized import reference
from torch import Tensor, nn

import compiledopt as co
from compiledopt.export import export_shape_agnostic, load_artifact
from compiledopt.learned import NormalizedMLP
from compiledopt.roles import ROLES, check_routes, param_groups, roles_of

SPEC = {"kind": "shape_agnostic", "name": "normalized-mlp", "kwargs": {"hidden_sizes": [6]}}
SPEC4 = {"kind": "shape_agnostic", "name": "normalized-mlp", "kwargs": {"hidden_sizes": [4]}}


class TinyLM(nn.Module):
    """Embedding, one pre-norm block (attention projections, MLP), a final norm and a head."""

    def __init__(self, vocab: int = 11, width: int = 8, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width, bias=False)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention)
        x = x + self.down(torch.relu(self.up(self.norm2(x))))
        return self.head(self.final(x))


def _roles(model: nn.Module) -> Dict[str, str]:
    return {name: group["role"] for group in param_groups(model) for name, _ in group["params"]}


def test_roles_from_module_types() -> None:
    roles = _roles(TinyLM())
    assert roles["embed.weight"] == "embedding"
    assert roles["head.weight"] == "head"
    for name in ("qkv.weight", "proj.weight", "up.weight", "down.weight"):
        assert roles[name] == "matrix", name
    for name in ("norm1.weight", "norm1.bias", "qkv.bias", "final.weight", "down.bias"):
        assert roles[name] == "vector", name
    assert "input" not in roles.values()  # an embedding reads the input


def test_tied_head_is_the_embedding_and_listed_once() -> None:
    model = TinyLM(tied=True)
    groups = param_groups(model)
    names = [name for group in groups for name, _ in group["params"]]
    assert names.count("embed.weight") == 1 and "head.weight" not in names
    assert _roles(model)["embed.weight"] == "embedding"
    # The optimizer takes the groups and steps the shared tensor once.
    optimizer = co.FrozenOptimizer(groups, "normalized-mlp", backend="eager")
    assert len(optimizer.rules_of()) == len(list(model.parameters()))


def test_roles_of_mlps_and_single_layers() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert _roles(mlp) == {
        "0.weight": "input",
        "0.bias": "vector",
        "2.weight": "matrix",
        "2.bias": "vector",
        "4.weight": "head",
        "4.bias": "vector",
    }
    # One layer is both first and last: it is the head (an output layer).
    assert _roles(nn.Linear(5, 2)) == {"weight": "head", "bias": "vector"}
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert _roles(conv) == {
        "0.weight": "input",
        "0.bias": "vector",
        "1.weight": "vector",
        "1.bias": "vector",
        "3.weight": "head",
        "3.bias": "vector",
    }
    # Parameters that need no gradient are left out.
    frozen = nn.Linear(3, 3)
    frozen.weight.requires_grad_(False)
    assert [g["role"] for g in param_groups(frozen)] == ["vector"]
    assert roles_of(frozen)[id(frozen.weight)] == "head"


def test_param_groups_bad_input() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        param_groups([torch.zeros(2)])
    with pytest.raises(ValueError, match="'role'"):
        param_groups(nn.Linear(2, 2), role="matrix")
    with pytest.raises(ValueError, match="Invalid rule: 3"):
        param_groups(nn.Linear(2, 2), rule=3)
    options = param_groups(nn.Linear(2, 2), lr=0.1, weight_decay=0.01)
    assert all(g["lr"] == 0.1 and g["weight_decay"] == 0.01 for g in options)


def test_check_routes() -> None:
    rules = ("artifact", "adam")
    assert check_routes({}, rules) == dict.fromkeys(ROLES, "artifact")
    assert check_routes({"head": "adam"}, rules)["head"] == "adam"
    with pytest.raises(ValueError, match="unknown role 'heads'"):
        check_routes({"heads": "adam"}, rules)
    with pytest.raises(ValueError, match="role 'head' has rule 'orthogonal'"):
        check_routes({"head": "orthogonal"}, rules)
    with pytest.raises(ValueError, match="a mapping"):
        check_routes(["head"], rules)


# --------------------------------------------------------------------------------------------
# The optimizer: rules per parameter, against a float64 reference of each rule
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact64(tmp_path_factory):
    """A float64 shape-agnostic NormalizedMLP artifact with weights off their init, routing
    matrices to ``orthogonal``, vectors and embeddings to ``adam`` and the head to ``learned``."""
    torch.manual_seed(0)
    transform = NormalizedMLP(hidden_sizes=(6,)).double()  # SPEC
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(0.5 * torch.randn(weight.shape, generator=generator, dtype=torch.float64))
    path = tmp_path_factory.mktemp("routed") / "artifact"
    routes = {"matrix": "orthogonal", "vector": "adam", "embedding": "adam", "head": "learned"}
    export_shape_agnostic(
        path, SPEC, transform, backends=(), lr=1e-2, dtype=torch.float64, routes=routes
    )
    return path, transform, routes


def _reference_steps(
    transform: NormalizedMLP, rule: str, param: Tensor, grads: List[Tensor], lr: float
) -> Tensor:
    """``param`` after one step per gradient, each direction from the readable float64 reference
    of the transform configured as ``rule`` says."""
    options = {
        "orthogonal": dict(orthogonalize=True, adam_vectors=True),
        "adam": dict(adam_vectors=True),
        "learned": dict(),
    }[rule]
    configured = copy.deepcopy(transform)
    configured.orthogonalize = options.get("orthogonalize", False)
    configured.adam_vectors = options.get("adam_vectors", False)
    value = param.detach().double().clone()
    state = [torch.zeros_like(value) for _ in range(3)]
    for k, grad in enumerate(grads):
        if rule == "adam" and value.dim() >= 2:  # the reference's Adam-like path is per vector
            direction, state = reference(configured, grad.reshape(-1), state, k)
            direction = direction.reshape(value.shape)
            state = [s.reshape(value.shape) for s in state]
        else:
            direction, state = reference(configured, grad, state, k)
        value = value - lr * direction
    return value


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_each_parameter_steps_with_its_rule(artifact64, backend: str) -> None:
    path, transform, routes = artifact64
    model = TinyLM(vocab=7, width=4).double()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = co.FrozenOptimizer(param_groups(model), path, lr=1e-2, backend=backend)
    roles = _roles(model)
    expected_rules = [routes.get(roles[n], "artifact") for n, _ in model.named_parameters()]
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert dict(zip(names, optimizer.rules_of())) == dict(
        zip([n for n, _ in model.named_parameters()], expected_rules)
    )
    generator = torch.Generator().manual_seed(5)
    grads: Dict[str, List[Tensor]] = {n: [] for n in initial}
    for _ in range(3):
        for name, param in model.named_parameters():
            g = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.grad = g
            grads[name].append(g.clone())
        optimizer.step()
    for name, param in model.named_parameters():
        rule = routes.get(roles[name], "learned")
        expected = _reference_steps(transform, rule, initial[name], grads[name], 1e-2)
        torch.testing.assert_close(
            param.detach(), expected, rtol=1e-6, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_auto_role_is_the_rank_and_a_group_rule_overrides(artifact64) -> None:
    path, _, _ = artifact64
    model = TinyLM().double()
    optimizer = co.FrozenOptimizer(model.parameters(), path, backend="eager")
    ranks = [p.dim() for p in model.parameters()]
    assert optimizer.rules_of() == ["orthogonal" if r >= 2 else "adam" for r in ranks]
    params = list(model.parameters())
    optimizer = co.FrozenOptimizer(
        [{"params": params[:2], "rule": "learned"}, {"params": params[2:], "role": "head"}],
        path,
        backend="eager",
    )
    assert optimizer.rules_of() == ["learned"] * 2 + ["learned"] * (len(params) - 2)
    # An artifact without routes runs its transform as configured for every role.
    plain = co.FrozenOptimizer(param_groups(model), "normalized-mlp", backend="eager")
    assert set(plain.rules_of()) == {"artifact"}
    assert plain.routes == dict.fromkeys(ROLES, "artifact")


def test_roles_travel_in_state_dict_and_are_checked_on_load(artifact64) -> None:
    path, _, _ = artifact64
    model = TinyLM().double()
    optimizer = co.FrozenOptimizer(param_groups(model), path, backend="eager")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    assert [g["role"] for g in saved["param_groups"]] == [g["role"] for g in param_groups(model)]
    # A new optimizer of one group loads the roles and rules with the state.
    other = co.FrozenOptimizer(param_groups(model), path, backend="eager")
    for group in other.param_groups:
        group["role"], group["rule"] = "auto", "learned"
    other.load_state_dict(saved)
    assert other.rules_of() == optimizer.rules_of()
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["role"] = "weights"
    with pytest.raises(ValueError, match="Invalid role in a state_dict's param group 0: 'weights'"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["param_groups"][1]["rule"] = "lion"
    with pytest.raises(ValueError, match="Invalid rule in a state_dict's param group 1: 'lion'"):
        other.load_state_dict(bad)
    # A state_dict saved before groups had roles loads as 'auto' with the artifact's routes.
    old = copy.deepcopy(saved)
    for group in old["param_groups"]:
        del group["role"], group["rule"]
    other.load_state_dict(old)
    assert all(g["role"] == "auto" and g["rule"] is None for g in other.param_groups)


def test_bad_roles_and_rules_are_refused(artifact64) -> None:
    path, _, _ = artifact64
    params = [nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))]
    with pytest.raises(ValueError, match="Invalid role in a param group: 'hidden'"):
        co.FrozenOptimizer([{"params": params, "role": "hidden"}], path)
    with pytest.raises(ValueError, match="Invalid rule in a param group: 'muon'"):
        co.FrozenOptimizer([{"params": params, "rule": "muon"}], path)
    optimizer = co.FrozenOptimizer(params, path, backend="eager")
    optimizer.param_groups[0]["rule"] = "muon"  # set behind the optimizer's back
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="Invalid rule: 'muon'"):
        optimizer.step()
    assert torch.equal(params[0], before)


def test_exported_graphs_refuse_rules_they_do_not_compute(tmp_path) -> None:
    transform = NormalizedMLP(hidden_sizes=(4,))
    path = tmp_path / "artifact"
    export_shape_agnostic(  # rank 1 only: each ONNX graph of it takes 15-20 s to export
        path,
        SPEC4,
        transform,
        backends=("onnx",),
        ranks=(1,),
        lr=1e-3,
        routes={"matrix": "orthogonal"},
    )
    artifact = load_artifact(path)
    matrix = [nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match=r"onnx backend .* not the rules \['orthogonal'\]"):
        co.FrozenOptimizer(matrix, artifact, backend="onnx")
    # 'auto' skips the graphs; a vector-only model, or rule 'artifact', may use them.
    assert co.FrozenOptimizer(matrix, artifact).backend in ("compiled", "eager")
    vector = [nn.Parameter(torch.zeros(4))]
    assert co.FrozenOptimizer(vector, artifact, backend="onnx").backend == "onnx"
    pinned = [{"params": matrix, "rule": "artifact"}]
    assert co.FrozenOptimizer(pinned, artifact, backend="onnx").backend == "onnx"


def test_manifest_routes_are_checked(tmp_path) -> None:
    transform = NormalizedMLP(hidden_sizes=(4,))
    with pytest.raises(ValueError, match="unknown role 'weights'"):
        export_shape_agnostic(tmp_path / "a", SPEC4, transform, (), routes={"weights": "adam"})
    with pytest.raises(ValueError, match="rule 'muon'"):
        export_shape_agnostic(tmp_path / "b", SPEC4, transform, (), routes={"head": "muon"})
