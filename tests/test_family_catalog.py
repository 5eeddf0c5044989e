"""The family catalog is the one place a family is registered: a shape-bound family added to
``compiledopt.learned.catalog.BOUND`` (one entry) is validated, exported, checked by the manifest
schema, loaded and stepped by FrozenOptimizer with no other file touched."""

import json

import pytest
import torch
from torch import nn

import compiledopt as co
from compiledopt.export import ArtifactError, check_spec, export_bound, load_artifact
from compiledopt.learned import catalog
from compiledopt.learned.catalog import BOUND, BoundFamily, SpecField, is_positive, kinds
from compiledopt.learned.step_sizes import LearnedStepSize

TOY = "toy_step_size"


def _toy(param, fields):
    return LearnedStepSize.per_element(param, fields["scale"] * 0.5)


@pytest.fixture
def toy(monkeypatch):
    family = BoundFamily(_toy, (SpecField("scale", 1.0, is_positive, "a number > 0"),), "toy")
    monkeypatch.setitem(BOUND, TOY, family)
    return family


def test_a_registered_bound_family_is_a_spec_kind(toy):
    assert TOY in kinds() and catalog.spec_fields(TOY) == ("kind", "scale")
    assert check_spec({"kind": TOY, "scale": 2.0}) == {"kind": TOY, "scale": 2.0}
    with pytest.raises(ValueError, match=r"'scale': 0 is not a number > 0"):
        check_spec({"kind": TOY, "scale": 0})
    with pytest.raises(ValueError, match="unknown field 'lr' in a toy_step_size spec"):
        check_spec({"kind": TOY, "lr": 1.0})


def test_without_its_entry_the_kind_is_unknown():
    assert TOY not in kinds()
    with pytest.raises(ValueError, match="unknown transform spec kind 'toy_step_size'"):
        check_spec({"kind": TOY})


def test_a_registered_bound_family_exports_loads_and_steps(toy, tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    named = list(model.named_parameters())
    spec = {"kind": TOY, "scale": 0.4}  # a step size of 0.2 per element
    transforms = [_toy(p.detach(), {"scale": 0.4}) for _, p in named]
    path = export_bound(tmp_path / "toy", spec, transforms, named, backends=())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = co.FrozenOptimizer(model.parameters(), str(path), lr=0.5, backend="eager")
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()
    # Meta-SGD with step size 0.2 at lr 0.5: p <- p - 0.5 * 0.2 * g (an independent reference).
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_the_manifest_checks_a_registered_family_field(toy, tmp_path):
    model = nn.Linear(3, 2)
    named = list(model.named_parameters())
    transforms = [_toy(p.detach(), {"scale": 1.0}) for _, p in named]
    path = export_bound(tmp_path / "toy", {"kind": TOY}, transforms, named, backends=())
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["transform"]["scale"] = -1
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"invalid transform.scale: -1 \(expected a number > 0"):
        load_artifact(path)
