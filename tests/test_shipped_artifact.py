"""The learned optimizer shipped in export/: intact, complete, and every backend equal to eager."""

from pathlib import Path

import torch
from torch import nn

import compiledopt as co
from compiledopt.export import load_artifact
from compiledopt.export.verify import verify_artifact

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "coordinate-mlp"


def test_shipped_artifact_verifies_on_every_backend():
    artifact = load_artifact(SHIPPED)  # checksums of every file
    assert artifact.kind == "shape_agnostic"
    assert artifact.spec["name"] == "coordinate-mlp"
    assert sorted(artifact.backends) == ["aoti", "onnx", "torchscript"]
    assert artifact.manifest["ranks"] == [0, 1, 2, 3, 4, 5]
    errors = verify_artifact(artifact, steps=10, trust_code=True)
    assert sorted(errors) == ["aoti", "onnx", "torchscript"]
    assert all(error <= 1e-6 for error in errors.values()), errors
    assert list(verify_artifact(artifact, steps=2)) == ["onnx"]  # untrusted: data only


def test_shipped_artifact_trains_a_model_without_meta_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    x, y = torch.randn(64, 1, 8, 8), torch.randn(64, 1)
    optimizer = co.FrozenOptimizer(model.parameters(), SHIPPED, backend="eager")
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
