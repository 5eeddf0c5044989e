"""Exports are atomic: a killed, failed or concurrent export never loses or mixes artifacts."""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compiledopt.export import build_shape_agnostic, export_shape_agnostic, load_artifact
from compiledopt.export import torchscript as torchscript_module
from compiledopt.export.verify import verify_artifact

SPEC = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
ROOT = Path(__file__).resolve().parents[1]


def _transform(seed: int):
    torch.manual_seed(seed)
    return build_shape_agnostic(SPEC)


#: Two different transforms, built once here: threads must not share the global generator.
TRANSFORMS = {seed: _transform(seed) for seed in (1, 2)}


def _export(path: Path, seed: int, overwrite: bool = False) -> Path:
    transform = TRANSFORMS[seed]
    return export_shape_agnostic(path, SPEC, transform, ["torchscript"], overwrite=overwrite)


def _weights_of(seed: int):
    return torch.nn.ModuleList([TRANSFORMS[seed]]).state_dict()


def _which(path: Path) -> int:
    """The seed whose transform the artifact at ``path`` holds (its graph checked against its
    weights, so a mixed artifact is caught)."""
    loaded = load_artifact(path, trust_code=True)
    assert verify_artifact(loaded, steps=3)["torchscript"] <= 1e-6
    weights = load_file(str(path / "weights.safetensors"))
    matches = [
        seed
        for seed in (1, 2)
        if all(torch.equal(weights[k], v) for k, v in _weights_of(seed).items())
    ]
    assert len(matches) == 1
    return matches[0]


def _visible(folder: Path):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


_KILLED = textwrap.dedent(
    """
    import sys, time
    import torch
    from compiledopt.export import build_shape_agnostic, export_shape_agnostic
    from compiledopt.export import torchscript

    spec = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
    torch.manual_seed(2)
    transform = build_shape_agnostic(spec)
    save = torchscript.BACKEND.save

    def slow(*args):
        save(*args)
        print("building", flush=True)
        time.sleep(120)

    torchscript.BACKEND.save = slow
    export_shape_agnostic(sys.argv[1], spec, transform, ["torchscript"], overwrite=True)
    """
)


def test_an_export_killed_during_overwrite_leaves_the_old_artifact(tmp_path):
    path = _export(tmp_path / "artifact", seed=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert process.stdout.readline().strip() == "building"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert _which(path) == 1
    assert _visible(tmp_path) == ["artifact"]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    path = _export(tmp_path / "artifact", seed=1)

    def broken(*args):
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(torchscript_module.BACKEND, "save", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        _export(path, seed=2, overwrite=True)
    with pytest.raises(RuntimeError, match="exporter failed"):
        _export(tmp_path / "new", seed=2)
    assert _which(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no staging left


def _race(tmp_path, monkeypatch, overwrite: bool):
    """Two exports of different transforms to one path, both building at the same time."""
    save = torchscript_module.BACKEND.save
    both_building = threading.Barrier(2, timeout=60)

    def slow(*args):
        save(*args)
        both_building.wait()
        time.sleep(0.2)

    monkeypatch.setattr(torchscript_module.BACKEND, "save", slow)
    path = tmp_path / "artifact"
    outcomes = {}

    def run(seed):
        try:
            _export(path, seed, overwrite=overwrite)
            outcomes[seed] = "done"
        except FileExistsError as error:
            outcomes[seed] = error

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return path, outcomes


def test_concurrent_exports_never_mix(tmp_path, monkeypatch):
    path, outcomes = _race(tmp_path, monkeypatch, overwrite=True)
    assert outcomes == {1: "done", 2: "done"}
    assert _which(path) in (1, 2)
    assert _visible(tmp_path) == ["artifact"]
    assert not [p for p in tmp_path.iterdir() if p.name != "artifact"]


def test_concurrent_exports_without_overwrite_one_wins(tmp_path, monkeypatch):
    path, outcomes = _race(tmp_path, monkeypatch, overwrite=False)
    winners = [seed for seed, outcome in outcomes.items() if outcome == "done"]
    assert len(winners) == 1, outcomes
    loser = next(outcome for outcome in outcomes.values() if outcome != "done")
    assert isinstance(loser, FileExistsError) and "exists" in str(loser)
    assert _which(path) == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_an_existing_destination_is_refused_before_any_work(tmp_path, monkeypatch):
    path = _export(tmp_path / "artifact", seed=1)
    monkeypatch.setattr(torchscript_module.BACKEND, "save", lambda *a: pytest.fail("built"))
    with pytest.raises(FileExistsError, match="exists"):
        _export(path, seed=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an artifact directory"):
        _export(tmp_path / "file", seed=2, overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
