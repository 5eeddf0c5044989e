"""Artifacts: every exportable registry entry round-trips through TorchScript in a fresh process,
and every kind of damage is refused with the documented error."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from registry import REGISTRY, SHAPES

from compiledopt import cli
from compiledopt.export import ArtifactError, export_bound, export_shape_agnostic, load_artifact
from compiledopt.export.verify import verify_artifact

EXPORTABLE = [entry for entry in REGISTRY if entry.spec is not None]
RANKS = (1, 2, 4)


def _export(entry, directory: Path, backends=("torchscript",), ranks=RANKS) -> Path:
    params = [torch.nn.Parameter(torch.randn(SHAPES[r])) for r in ranks]
    if entry.spec["kind"] == "shape_agnostic":
        transform = entry.build(params[0], perturb=0.05)
        return export_shape_agnostic(directory, entry.spec, transform, backends, ranks=ranks)
    transforms = [entry.build(p, perturb=0.05, seed=i) for i, p in enumerate(params)]
    named = [(f"layer{r}.weight", p) for r, p in zip(ranks, params)]
    return export_bound(directory, entry.spec, transforms, named, backends)


@pytest.fixture(scope="module")
def torchscript_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {entry.name: _export(entry, root / entry.name) for entry in EXPORTABLE}


def test_every_exportable_entry_matches_eager_in_a_fresh_process(torchscript_artifacts):
    script = textwrap.dedent(
        """
        import json, sys
        from compiledopt.export.verify import verify_artifact
        print(json.dumps({p: verify_artifact(p, steps=10, trust_code=True) for p in sys.argv[1:]}))
        """
    )
    paths = [str(p) for p in torchscript_artifacts.values()]
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == set(paths)
    for path, per_backend in errors.items():
        assert per_backend["torchscript"] <= 1e-6, (path, per_backend)


def test_registry_entries_are_exportable():
    """Every entry but the arbitrary-constructor ModuleTransform carries an export spec."""
    assert {e.name for e in REGISTRY if e.spec is None} == {"module_identity"}


@pytest.mark.slow
@pytest.mark.parametrize("entry", EXPORTABLE, ids=[e.name for e in EXPORTABLE])
def test_onnx_matches_eager(entry, tmp_path):
    if entry.name == "celo2":  # ONNX for ranks 0-2 only (sizes pick its factored axes)
        pytest.skip("celo2's ONNX graphs (ranks 0 to 2) are checked in test_celo2.py")
    # NormalizedMLP's graphs take 15-30 s each to export (the network of a large tensor in
    # pieces): ranks 1 and 2 here; the packaged artifact's graphs of every rank are verified in
    # test_exported_pieces.
    ranks = (1, 2) if entry.name == "normalized_mlp" else RANKS
    path = _export(entry, tmp_path / "a", backends=("onnx",), ranks=ranks)
    assert verify_artifact(path, steps=10)["onnx"] <= ONNX_TOLERANCE.get(entry.name, 1e-6)


# The one miss of the 1e-6 target, measured: CoordinateLSTM's direction (~1e-3) is a cancellation
# of output-head terms ~3e-2, so one float32 rounding difference between onnxruntime and torch in
# those terms is ~2e-6 of the result (eager float32 itself is that far from float64 there).
ONNX_TOLERANCE = {"coordinate_lstm": 5e-6}


# -- damage -------------------------------------------------------------------------------


@pytest.fixture()
def artifact(tmp_path, torchscript_artifacts):
    target = tmp_path / "artifact"
    shutil.copytree(torchscript_artifacts["kronecker_rnn"], target)
    return target


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _rewrite(path: Path, **changes) -> None:
    manifest = {**_manifest(path), **changes}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_loads_and_inspects(artifact, capsys):
    loaded = load_artifact(artifact)
    assert loaded.kind == "bound" and loaded.backends == ["torchscript"]
    assert [b["name"] for b in loaded.bindings] == [
        "layer1.weight",
        "layer2.weight",
        "layer4.weight",
    ]
    assert loaded.bindings[1]["state"] == [{"name": "hidden", "shape": [4, 3]}]
    assert cli.main(["inspect", str(artifact)]) == 0
    assert "layer4.weight" in capsys.readouterr().out


def test_flipped_byte(artifact):
    data = bytearray((artifact / "rule.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (artifact / "rule.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for rule\.pt"):
        load_artifact(artifact)


def test_truncated_file(artifact):
    weights = artifact / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"checksum mismatch for weights\.safetensors"):
        load_artifact(artifact)


def test_truncated_manifest(artifact):
    text = (artifact / "manifest.json").read_text()
    (artifact / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(artifact)


def test_missing_file(artifact):
    (artifact / "rule.pt").unlink()
    with pytest.raises(ArtifactError, match=r"missing file rule\.pt"):
        load_artifact(artifact)
    with pytest.raises(ArtifactError, match="not a directory"):
        load_artifact(artifact / "nowhere")


def test_unknown_format_version(artifact):
    _rewrite(artifact, format_version=2)
    with pytest.raises(ArtifactError, match="unknown format version 2"):
        load_artifact(artifact)
    _rewrite(artifact, format_version=1, format="something-else")
    with pytest.raises(ArtifactError, match="not a compiledopt artifact"):
        load_artifact(artifact)


def test_unknown_transform_spec(artifact):
    _rewrite(artifact, transform={"kind": "kronecker", "layer": "Evil"})
    with pytest.raises(ArtifactError, match="unknown Kronecker layer 'Evil'"):
        load_artifact(artifact)


def test_shape_and_dtype_mismatch(artifact):
    loaded = load_artifact(artifact)
    good = [(b["name"], torch.zeros(b["shape"])) for b in loaded.bindings]
    loaded.check_bindings(good)
    wrong_shape = [*good[:2], ("conv.weight", torch.zeros(3, 2, 2, 3))]
    with pytest.raises(ArtifactError, match=r"'conv.weight' has shape \(3, 2, 2, 3\)"):
        loaded.check_bindings(wrong_shape)
    wrong_dtype = [good[0], ("fc.weight", torch.zeros(4, 3, dtype=torch.float64)), good[2]]
    with pytest.raises(ArtifactError, match=r"'fc\.weight' .* dtype torch\.float64"):
        loaded.check_bindings(wrong_dtype)
    with pytest.raises(ArtifactError, match="bound to 3 parameters, got 2"):
        loaded.check_bindings(good[:2])


def test_verify_command_fails_when_a_graph_disagrees(artifact, capsys):
    # Its only graph is TorchScript (code): unverified unless trusted, and that is a failure.
    assert cli.main(["verify", str(artifact)]) == 1
    assert "no backend was verified" in capsys.readouterr().out
    assert cli.main(["verify", "--trust-code", str(artifact)]) == 0
    # Change the weights consistently (checksum updated): the graph no longer matches them.
    from safetensors.torch import load_file, save_file

    weights = load_file(str(artifact / "weights.safetensors"))
    save_file({k: v + 0.5 for k, v in weights.items()}, str(artifact / "weights.safetensors"))
    manifest = _manifest(artifact)
    digest = hashlib.sha256((artifact / "weights.safetensors").read_bytes()).hexdigest()
    manifest["files"]["weights.safetensors"] = digest
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["verify", "--trust-code", str(artifact)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli.main(["inspect", str(artifact / "missing")]) == 2


def test_export_command_from_a_training_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    assert (
        cli.main(
            [
                "train",
                "--transform",
                "learned-step-size",
                "--meta-steps",
                "1",
                "--unroll",
                "2",
                "--horizon",
                "2",
                "--tasks-per-step",
                "1",
                "--eval-every",
                "0",
                "--no-progress",
                "--output",
                str(checkpoint),
            ]
        )
        == 0
    )
    out = tmp_path / "artifact"
    assert (
        cli.main(["export", str(checkpoint), "--output", str(out), "--backends", "torchscript"])
        == 0
    )
    assert cli.main(["verify", "--trust-code", str(out)]) == 0
    assert load_artifact(out).manifest["lr"] == pytest.approx(0.1)
    assert cli.main(["export", str(checkpoint), "--output", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
