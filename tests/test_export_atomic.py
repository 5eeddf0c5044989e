"""Exports are atomic: a killed, failed or concurrent export never loses or mixes artifacts."""

import os
import shutil
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
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".artifact.partial-")]
    assert left, "the killed export's staging folder should be there to clean"
    # the next export removes what the dead one left (its process is gone)
    _export(path, seed=2, overwrite=True)
    assert _which(path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


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


def test_torchscript_compiles_one_rule_at_a_time_in_a_process(tmp_path, monkeypatch):
    """TorchScript's compiler keeps process-wide registries: two exports in threads must not
    script at once (done concurrently, one could fail inside ``torch.jit.script``)."""
    script = torch.jit.script
    inside, most = [0], [0]
    count = threading.Lock()

    def watched(rule):
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # long enough for the other thread to arrive if nothing holds it back
        try:
            return script(rule)
        finally:
            with count:
                inside[0] -= 1

    monkeypatch.setattr(torch.jit, "script", watched)
    threads = [
        threading.Thread(target=_export, args=(tmp_path / f"artifact-{seed}", seed))
        for seed in (1, 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert [_which(tmp_path / f"artifact-{seed}") for seed in (1, 2)] == [1, 2]


def test_an_existing_destination_is_refused_before_any_work(tmp_path, monkeypatch):
    path = _export(tmp_path / "artifact", seed=1)
    monkeypatch.setattr(torchscript_module.BACKEND, "save", lambda *a: pytest.fail("built"))
    with pytest.raises(FileExistsError, match="exists"):
        _export(path, seed=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an artifact directory"):
        _export(tmp_path / "file", seed=2, overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


# -- what overwrite may replace ------------------------------------------------------------------


def _contents(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _web_app(folder: Path) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "My App", "start_url": "/"}')
    (folder / "index.html").write_text("<html></html>")
    (folder / "app.js").write_text("console.log(1)")


def _artifact_plus(extra: str):
    def make(folder: Path) -> None:
        _export(folder, seed=1)
        target = folder / extra
        if extra.endswith("/"):
            target.mkdir()
            (target / "notes.txt").write_text("mine")
        else:
            target.write_text("mine")

    return make


def _marker_without_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format": "compiledopt-artifact", "files": {}}')
    (folder / "report.pdf").write_bytes(b"%PDF")


@pytest.mark.parametrize(
    "make",
    [_web_app, _artifact_plus("notes.txt"), _artifact_plus("data/"), _marker_without_files],
    ids=["web-app", "artifact-plus-a-file", "artifact-plus-a-folder", "marker-lists-nothing"],
)
def test_overwrite_never_replaces_a_folder_that_is_not_only_an_artifact(
    make, tmp_path, monkeypatch
):
    folder = tmp_path / "target"
    make(folder)
    before = _contents(folder)
    monkeypatch.setattr(torchscript_module.BACKEND, "save", lambda *a: pytest.fail("built"))
    with pytest.raises(FileExistsError, match="refusing to replace"):
        _export(folder, seed=2, overwrite=True)
    assert _contents(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_folder_that_becomes_foreign_during_the_export_is_not_replaced(tmp_path, monkeypatch):
    # checked again just before the swap: a file a user put there meanwhile is never deleted
    path = _export(tmp_path / "artifact", seed=1)
    save = torchscript_module.BACKEND.save

    def save_then_user_writes(*args):
        save(*args)
        (path / "notes.txt").write_text("mine")

    monkeypatch.setattr(torchscript_module.BACKEND, "save", save_then_user_writes)
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        _export(path, seed=2, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    assert _which(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_overwrite_replaces_a_signed_artifact_and_an_empty_folder(tmp_path):
    path = _export(tmp_path / "artifact", seed=1)
    (path / "signature.json").write_text("{}")  # an artifact's own file, though not listed
    _export(path, seed=2, overwrite=True)
    assert _which(path) == 2 and not (path / "signature.json").exists()
    (tmp_path / "empty").mkdir()
    assert _which(_export(tmp_path / "empty", seed=1, overwrite=True)) == 1


# -- a kill at any moment of the replace ---------------------------------------------------------


class _Killed(BaseException):
    """The process dies here: nothing after it runs (no cleanup either)."""


def _kill_at(monkeypatch, point: int, exchange: bool):
    """From the moment the new artifact is complete, make the ``point``-th file-system change
    (rename, replace, unlink, rmdir, rmtree, the atomic exchange) kill the export before it is
    made; every change after the kill fails too (a dead process changes nothing), so the disk
    is left exactly as a SIGKILL at that moment leaves it. Returns a function telling whether
    the kill came."""
    from compiledopt.export import replace as replacing

    state = {"armed": False, "count": 0, "killed": False}

    def hook(real):
        def patched(*args, **kwargs):
            if state["killed"]:
                raise _Killed()
            if state["armed"]:
                state["count"] += 1
                if state["count"] == point:
                    state["killed"] = True
                    raise _Killed()
            return real(*args, **kwargs)

        return patched

    for name in ("rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, hook(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", hook(shutil.rmtree))
    if exchange:
        monkeypatch.setattr(replacing, "_exchange", hook(replacing._exchange))
    else:
        monkeypatch.setattr(replacing, "_renameat2", lambda: None)  # no atomic exchange here
    move = replacing.move_into_place

    def armed_move(*args):
        state["armed"] = True
        return move(*args)

    monkeypatch.setattr(replacing, "move_into_place", armed_move)
    return lambda: state["killed"]


def _hidden(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_kill_at_any_moment_of_a_replace_leaves_an_artifact_to_load(exchange, tmp_path):
    """Kill the replace before each of its file-system changes in turn, until one run is not
    killed: each time, the path holds the old artifact or the new one once recovered (as the
    next export or command does), and the next export cleans every folder left beside it."""
    from compiledopt.export import replace as replacing

    if exchange and replacing._renameat2() is None:
        pytest.skip("no renameat2 on this system")
    point = 0
    while True:
        point += 1
        assert point < 40, "the replace never completed"
        root = tmp_path / f"{point}"
        root.mkdir()
        path = _export(root / "artifact", seed=1)
        with pytest.MonkeyPatch.context() as patch:
            killed = _kill_at(patch, point, exchange)
            try:
                _export(path, seed=2, overwrite=True)
            except _Killed:
                pass
            was_killed = killed()
        if not was_killed:
            assert _which(path) == 2 and _hidden(root) == []
            break
        # the killed export ran in this process: give its folders a pid no process has
        for name in _hidden(root):
            (root / name).rename(root / name.replace(f"-{os.getpid()}-", "-999999999-"))
        replacing.recover(path)  # what the next export or command does first
        assert _which(path) in (1, 2), f"nothing to load after a kill before change {point}"
        _export(path, seed=2, overwrite=True)
        assert _which(path) == 2
        assert _hidden(root) == [], f"left beside it after a kill before change {point}"
        assert _visible(root) == ["artifact"]
    assert point >= 3  # the replace made several changes, each one a kill point


def _aside_name(kind: str, pid: int) -> str:
    from compiledopt.export import replace as replacing

    return f".artifact.{kind}-{replacing._host()}-{pid}-{time.time_ns()}-abc123"


def test_folders_of_a_running_export_are_left_alone(tmp_path):
    path = _export(tmp_path / "artifact", seed=1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        alive = tmp_path / _aside_name("partial", sleeper.pid)
        alive.mkdir()
        (alive / "weights.safetensors").write_bytes(b"being written")
        _export(path, seed=2, overwrite=True)
        assert (alive / "weights.safetensors").read_bytes() == b"being written"
    finally:
        sleeper.kill()
        sleeper.wait()
    _export(path, seed=1, overwrite=True)  # now its process is gone: cleaned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_a_left_aside_artifact_keeps_files_its_manifest_does_not_list(tmp_path):
    path = _export(tmp_path / "artifact", seed=1)
    retired = tmp_path / _aside_name("old", 999999999)
    shutil.copytree(path, retired)
    (retired / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="notes"):
        _export(path, seed=2, overwrite=True)
    assert sorted(p.name for p in retired.iterdir()) == ["manifest.json", "notes.txt"]
    assert (retired / "notes.txt").read_text() == "mine"


def test_commands_restore_an_artifact_left_aside_by_a_killed_replace(tmp_path, capsys):
    """A replace killed between its two renames leaves no artifact, the old one aside: the
    next command that opens the path renames it back (as ``mv .NAME.old-* NAME`` would)."""
    from compiledopt.cli import main

    path = _export(tmp_path / "artifact", seed=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    path.rename(tmp_path / _aside_name("old", 999999999))
    assert main(["inspect", str(path)]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
