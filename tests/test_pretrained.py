"""Optimizers packaged inside compiledopt: found by name, loaded, described, taken by
FrozenOptimizer and the commands, and shipped in the wheel."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compiledopt as co
from compiledopt import pretrained
from compiledopt.apps.inspect import lr_basis
from compiledopt.cli import main
from compiledopt.export import ArtifactError, export_shape_agnostic, load_artifact
from compiledopt.learned.catalog import build_transform

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "export" / "coordinate-mlp"
PACKAGE = Path(co.__file__).resolve().parent
PACKAGED_FILES = {"manifest.json", "weights.safetensors", "rule.pt"} | {
    f"rule_rank{r}.onnx" for r in range(6)
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _train(artifact, backend: str, steps: int = 3) -> list:
    model = _model()
    x, y = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)
    optimizer = co.FrozenOptimizer(model.parameters(), artifact, backend=backend)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_names_path_load_info():
    assert "coordinate-mlp" in pretrained.names()
    assert pretrained.DEFAULT in pretrained.names()
    folder = pretrained.path("coordinate-mlp")
    assert folder == PACKAGE / "pretrained" / "coordinate-mlp"
    # Shipped: manifest, weights, TorchScript and ONNX; no AOTInductor native code.
    assert {p.name for p in folder.iterdir()} == PACKAGED_FILES
    artifact = pretrained.load("coordinate-mlp")
    assert artifact.path == folder and artifact.kind == "shape_agnostic"
    assert artifact.spec["name"] == "coordinate-mlp"
    assert artifact.backends == ["torchscript", "onnx"]
    assert artifact.manifest["ranks"] == [0, 1, 2, 3, 4, 5]
    # The same meta-trained weights as the artifact in export/ (one checkpoint, re-exported).
    packaged, shipped = (
        load_file(folder / "weights.safetensors"),
        load_file(SHIPPED / "weights.safetensors"),
    )
    assert packaged.keys() == shipped.keys()
    assert all(torch.equal(packaged[k], shipped[k]) for k in packaged)

    info = pretrained.info("coordinate-mlp")
    assert info["name"] == "coordinate-mlp" and info["path"] == folder
    assert info["transform"] == "coordinate-mlp"
    assert info["lr"] == artifact.manifest["lr"] == info["training"]["lr"] == 10.0
    assert info["backends"] == ["torchscript", "onnx"]
    training = info["training"]
    assert training["task_family"].startswith("regression")
    assert training["meta_steps"] == 1000 and training["seed"] == 0
    # This checkpoint predates recorded timings: the block says so rather than guess.
    assert training["wall_time_s"] is None and training["cpu_count"] == 2
    assert "CPU time not recorded" in info["summary"]
    assert info["schedule"] == training["schedule"] and isinstance(info["schedule"], dict)
    assert info["summary"].startswith("meta-trained on regression")
    assert "1000 steps" in info["summary"] and "recommended lr 10" in info["summary"]


def test_names_are_the_folders_with_a_manifest():
    folders = [
        p.name for p in (PACKAGE / "pretrained").iterdir() if (p / "manifest.json").is_file()
    ]
    assert pretrained.names() == sorted(folders)


def test_frozen_optimizer_by_name_equals_by_path():
    for backend in ("torchscript", "onnx"):
        by_name = _train("coordinate-mlp", backend)
        by_path = _train(pretrained.path("coordinate-mlp"), backend)
        assert all(torch.equal(a, b) for a, b in zip(by_name, by_path)), backend
        assert not all(torch.equal(a, b) for a, b in zip(by_name, _model().parameters()))
    optimizer = co.FrozenOptimizer(_model().parameters(), pretrained.DEFAULT, backend="eager")
    assert optimizer.artifact.path == pretrained.path(pretrained.DEFAULT)
    assert optimizer.param_groups[0]["lr"] == pretrained.info(pretrained.DEFAULT)["lr"]


def test_unknown_names_are_refused_naming_them_and_the_packaged_ones():
    params = _model().parameters()
    with pytest.raises(ArtifactError, match=r"no-such-optimizer .*packaged: .*coordinate-mlp"):
        co.FrozenOptimizer(params, "no-such-optimizer")
    with pytest.raises(ValueError, match=r"'no-such-optimizer' is not a packaged .*coordinate-mlp"):
        pretrained.path("no-such-optimizer")
    with pytest.raises(ValueError, match="not a packaged optimizer"):
        pretrained.load("../pretrained")
    with pytest.raises(ValueError, match="not a packaged optimizer"):
        pretrained.info("")
    # A string with a path separator is a path, never a name.
    with pytest.raises(ArtifactError, match="not a directory"):
        pretrained.resolve(f"nowhere{os.sep}coordinate-mlp")


def test_an_existing_path_comes_before_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SHIPPED, tmp_path / "coordinate-mlp")
    assert pretrained.resolve("coordinate-mlp") == Path("coordinate-mlp")
    optimizer = co.FrozenOptimizer(_model().parameters(), "coordinate-mlp", backend="eager")
    assert "aoti" in optimizer.artifact.backends  # the local copy, not the packaged one
    assert pretrained.resolve(tmp_path / "coordinate-mlp") == tmp_path / "coordinate-mlp"


def test_inspect_list(capsys):
    assert main(["inspect", "--list"]) == 0
    out = capsys.readouterr().out
    for name in pretrained.names():
        assert f"  {name}" in out
        assert pretrained.info(name)["summary"] in out
    assert f"{pretrained.DEFAULT} (default)" in out
    assert "lr 10, backends torchscript, onnx" in out


def test_inspect_by_name_shows_the_training_block(capsys):
    assert main(["inspect", "coordinate-mlp"]) == 0
    out = capsys.readouterr().out
    assert str(pretrained.path("coordinate-mlp")) in out
    assert "  training   meta-trained on regression" in out
    assert "CPU time not recorded; recommended lr 10, schedule 0% warmup, constant lr" in out
    assert '"meta_steps"' not in out and "meta_steps" in out  # each field on its own line
    # Its training block does not say where its lr was chosen: no lr line.
    assert not [line for line in out.splitlines() if line.startswith("  lr ")]
    # An artifact without a training block prints none.
    assert main(["inspect", str(SHIPPED)]) == 0
    assert "training" not in capsys.readouterr().out


def test_inspect_says_where_the_defaults_lr_was_chosen(capsys):
    assert main(["inspect", pretrained.DEFAULT]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  lr "))
    selected = pretrained.load(pretrained.DEFAULT).training["packaging"]["selected_on"]
    assert line.startswith(f"  lr         start at {pretrained.info(pretrained.DEFAULT)['lr']:g}: ")
    for entry in selected:
        assert f"{entry['family']} ({entry['split']}, {entry['steps']} steps)" in line


@pytest.mark.parametrize(
    "training",
    [
        None,
        {},
        {"packaging": "x"},
        {"packaging": {"selected_on": {"family": "a"}}},
        {"packaging": {"selected_on": [1, {"family": 2}, {"split": "s"}]}},
    ],
)
def test_an_lr_basis_of_another_shape_is_passed_over(training):
    assert lr_basis(training) is None


def test_an_lr_basis_keeps_what_it_can_read():
    selected = [{"family": "f", "steps": True, "split": 3}, {"family": "g", "steps": 5}]
    assert lr_basis({"packaging": {"selected_on": selected}}).endswith("on f; g (5 steps)")


def test_commands_take_names_and_refuse_unknown_ones(capsys):
    assert main(["verify", "coordinate-mlp", "--steps", "2"]) == 0
    assert "onnx" in capsys.readouterr().out
    for command in ("inspect", "verify", "finetune", "bench"):
        assert main([command, "no-such-optimizer"]) == 2, command
        err = capsys.readouterr().err
        assert f"compiledopt {command}: artifact not found: no-such-optimizer" in err
        assert "coordinate-mlp" in err
    assert main(["inspect"]) == 2
    assert "--list" in capsys.readouterr().err


def _manifest_copy(tmp_path, **changes) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(pretrained.path("coordinate-mlp"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("bad", [[1, 2], "regression", 3, None])
def test_a_manifest_with_a_non_dict_training_block_is_refused(tmp_path, bad):
    copy = _manifest_copy(tmp_path, training=bad)
    with pytest.raises(ArtifactError, match=r"'training' must be a JSON object"):
        load_artifact(copy)
    assert load_artifact(_manifest_copy(tmp_path / "ok", training={"seed": 1})).training == {
        "seed": 1
    }


def test_export_refuses_a_training_block_that_is_not_json(tmp_path):
    transform = build_transform("coordinate-mlp")
    spec = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {}}
    for bad, message in (([1], "JSON object"), ({"x": object()}, "JSON values")):
        with pytest.raises(ValueError, match=message):
            export_shape_agnostic(tmp_path / "a", spec, transform, ["torchscript"], training=bad)
        assert not (tmp_path / "a").exists()


def test_export_copies_the_checkpoints_training_metadata(tmp_path, capsys):
    state = torch.load(ROOT / "export" / "coordinate-mlp.checkpoint.pt", weights_only=True)
    state["metadata"]["training"] = {"task_family": "regression", "seed": 0, "lr": 3.0}
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(state, checkpoint)
    args = ["export", str(checkpoint), "--backends", "torchscript", "--ranks", "2"]
    assert main([*args, "--output", str(tmp_path / "a"), "--training", '{"seed": 5}']) == 0
    artifact = load_artifact(tmp_path / "a")
    assert artifact.training == {"task_family": "regression", "seed": 5, "lr": 3.0}
    assert artifact.manifest["lr"] == 3.0  # the block's lr is the manifest's suggestion
    assert main([*args, "--output", str(tmp_path / "b"), "--lr", "2"]) == 0
    assert load_artifact(tmp_path / "b").training["lr"] == 2.0
    del state["metadata"]["training"]
    torch.save(state, checkpoint)
    assert main([*args, "--output", str(tmp_path / "c")]) == 0
    assert "training" not in load_artifact(tmp_path / "c").manifest
    capsys.readouterr()


@pytest.mark.slow
def test_the_wheel_ships_the_packaged_optimizers(tmp_path):
    pytest.importorskip("hatchling", reason="building the wheel offline needs hatchling")
    python = sys.executable
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheels,
            ".",
        ],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = wheels.glob("compiledopt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        listed = archive.namelist()
    for name in pretrained.names():
        shipped = {
            n.rsplit("/", 1)[1] for n in listed if n.startswith(f"compiledopt/pretrained/{name}/")
        }
        assert shipped == {p.name for p in pretrained.path(name).iterdir()}, name
    assert not [n for n in listed if n.endswith(".pt2")]
    site = tmp_path / "site"
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], check=True
    )
    script = textwrap.dedent(
        """
        import sys
        import torch
        import compiledopt as co
        from compiledopt import pretrained

        assert co.__file__.startswith(sys.argv[1]), co.__file__
        artifact = pretrained.load(pretrained.DEFAULT)
        assert str(artifact.path).startswith(sys.argv[1]), artifact.path
        model = torch.nn.Linear(4, 2)
        before = model.weight.detach().clone()
        params = model.parameters()
        optimizer = co.FrozenOptimizer(params, pretrained.DEFAULT, backend="torchscript")
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        assert not torch.equal(model.weight, before)
        print("ok", pretrained.names())
        """
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [python, "-c", script, str(site)], cwd=outside, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
