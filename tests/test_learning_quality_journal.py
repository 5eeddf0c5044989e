"""The learning-quality suite in pieces (``--journal``) and with narrower lr grids (``--lrs``):
an interrupted run resumes with only its missing runs, a damaged journal still resumes, a record
of another job (lr, artifact, torch) is never reused, and ``--lrs`` parses and keeps the untuned
baselines. Quick settings on the tiny ``logistic`` and ``regression`` tasks."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite is not installed: it lives in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.learning_quality import journal, optimizers, options, run, runner  # noqa: E402

_RUN_JOB = run.run_job


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two fresh CoordinateMLP artifacts (TorchScript only) that differ only in the manifest's
    lr: the same runs at a given lr, but two artifacts."""
    from compiledopt.export import export_shape_agnostic
    from compiledopt.learned.catalog import build_transform

    torch.manual_seed(0)
    first = tmp_path_factory.mktemp("artifact") / "coordinate-mlp"
    spec = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {}}
    export_shape_agnostic(first, spec, build_transform("coordinate-mlp"), ["torchscript"], lr=1.0)
    second = first.parent / "coordinate-mlp-2"
    shutil.copytree(first, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["lr"] = 2.0
    (second / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return str(first), str(second)


def _argv(tmp_path, tasks="logistic", optimizer="normalized-mlp", kinds="adamw", name="lq"):
    argv = ["--optimizer", optimizer, "--quick", "--tasks", tasks, "--kinds", kinds]
    argv += ["--jobs", "1", "--no-plots", "--output", str(tmp_path / name)]
    return [*argv, "--journal", str(tmp_path / "journal.jsonl")]


def _count_runs(monkeypatch, interrupt_after=None):
    """The jobs run from now on (task, kind, lr, seed), in order; with ``interrupt_after``, a
    Ctrl-C as the job after that many starts."""
    calls = []

    def counted(job):
        if interrupt_after is not None and len(calls) == interrupt_after:
            raise KeyboardInterrupt
        calls.append((job["task"], job["optimizer"], job["lr"], job["seed"]))
        return _RUN_JOB(job)

    monkeypatch.setattr(run, "run_job", counted)
    return calls


def _entries(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _identity(record):
    return record["task"], record["optimizer"], record["lr"], record["seed"]


def test_an_interrupted_run_resumes_from_its_journal_running_only_the_missing_jobs(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "journal.jsonl"
    argv = [*_argv(tmp_path, tasks="logistic,regression"), "--lrs", "adamw=1e-2,3e-2"]
    calls = _count_runs(monkeypatch, interrupt_after=3)
    assert runner.main(argv) == 130
    assert "interrupted: 3 of 8 runs finished" in capsys.readouterr().err
    assert not (tmp_path / "lq.json").exists()
    first = _entries(path)
    assert [_identity(entry["record"]) for entry in first] == calls and len(calls) == 3
    assert all(entry["key"]["torch"] == str(torch.__version__) for entry in first)

    calls = _count_runs(monkeypatch)
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"journal {path}: 3 of 8 runs recorded there, 5 to run" in printed
    assert "the 5 runs left" in printed
    assert "(--lrs; the untuned baseline(s) 0.001, 0.003 added)" in printed
    assert len(calls) == 5 and not set(calls) & {_identity(e["record"]) for e in first}
    doc = json.loads((tmp_path / "lq.json").read_text())
    runs = {_identity(record): record for record in doc["runs"]}
    assert len(doc["runs"]) == len(runs) == 8
    for entry in first:  # the very records of the first run, its timings included
        assert runs[_identity(entry["record"])] == entry["record"]
    assert doc["settings"]["lrs"] == {"adamw": [1e-2, 3e-2]}
    assert doc["settings"]["journal"] == str(path)
    assert doc["sweeps"] == {"adamw": [1e-3, 3e-3, 1e-2, 3e-2]}
    for info in doc["tasks"].values():
        assert {"adamw@default", "adamw@3e-3", "adamw@tuned"} <= set(
            info["summary_of_runs"]["final_val_loss"]
        )
    assert any("3 of 8 runs reused from the journal" in note for note in doc["notes"])
    assert len(_entries(path)) == 8

    calls = _count_runs(monkeypatch)
    assert runner.main(argv) == 0
    assert "8 of 8 runs recorded there, 0 to run" in capsys.readouterr().out
    assert calls == []
    again = json.loads((tmp_path / "lq.json").read_text())
    assert again["runs"] == doc["runs"] and again["aggregates"] == doc["aggregates"]


def test_a_journal_with_garbage_and_a_cut_last_line_still_resumes(tmp_path, monkeypatch, capsys):
    path = tmp_path / "journal.jsonl"
    argv = [*_argv(tmp_path), "--lrs", "adamw=1e-3,3e-3"]
    _count_runs(monkeypatch, interrupt_after=1)
    assert runner.main(argv) == 130
    capsys.readouterr()
    line = path.read_text()
    assert line.count("\n") == 1
    with open(path, "a") as handle:  # then a killed run's half-written line, with no newline
        handle.write("not json\n[1, 2]\n\n" + line[: len(line) // 2])

    calls = _count_runs(monkeypatch)
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 runs recorded there, 1 to run" in printed
    assert "3 line(s) ignored (3 unreadable, 0 of other runs)" in printed
    assert len(calls) == 1
    last = json.loads(path.read_text().splitlines()[-1])  # a line of its own
    assert path.read_text().endswith("\n") and _identity(last["record"]) == calls[0]

    calls = _count_runs(monkeypatch)
    assert runner.main(argv) == 0  # the line after the cut one was written whole
    assert "2 of 2 runs recorded there, 0 to run" in capsys.readouterr().out
    assert calls == []


def test_records_of_another_lr_artifact_or_torch_are_not_reused(
    tmp_path, monkeypatch, capsys, artifacts
):
    path = tmp_path / "journal.jsonl"
    first, second = artifacts

    def argv(artifact, adamw="1e-3,3e-3"):
        argv = _argv(tmp_path, optimizer=artifact, kinds="learned,adamw")
        return [*argv, "--optimizer-lr", "0.5", "--lrs", "learned=0.5", "--lrs", f"adamw={adamw}"]

    calls = _count_runs(monkeypatch)
    assert runner.main(argv(first)) == 0
    assert sorted(calls) == [
        ("logistic", "adamw", 1e-3, 0),
        ("logistic", "adamw", 3e-3, 0),
        ("logistic", "learned", 0.5, 0),
    ]
    calls = _count_runs(monkeypatch)
    assert runner.main(argv(second)) == 0  # the same lr, another artifact
    printed = capsys.readouterr().out
    assert "2 of 3 runs recorded there, 1 to run" in printed
    assert "1 line(s) ignored (0 unreadable, 1 of other runs)" in printed
    assert calls == [("logistic", "learned", 0.5, 0)]
    calls = _count_runs(monkeypatch)
    assert runner.main(argv(second, "1e-3,3e-3,1e-2")) == 0  # one more lr
    assert calls == [("logistic", "adamw", 1e-2, 0)]

    entries = _entries(path)
    for entry in entries:
        assert entry["key"]["torch"] == str(torch.__version__)
        if entry["record"]["lr"] == 1e-3:  # as if recorded with another torch
            entry["key"]["torch"] = "0.0"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    calls = _count_runs(monkeypatch)
    assert runner.main(argv(second, "1e-3,3e-3,1e-2")) == 0
    assert calls == [("logistic", "adamw", 1e-3, 0)]
    assert "3 of 4 runs recorded there, 1 to run" in capsys.readouterr().out


def test_a_job_key_holds_what_the_run_depends_on():
    job = {"task": "cnn", "seed": 1, "steps": 300, "optimizer": "learned", "lr": 3e-3}
    job.update(roles="auto", weight_decay=0.0, backends={"learned": "torchscript"})
    artifacts = {"learned": "sha256:aa"}
    key = journal.job_key(job, artifacts)
    assert key["artifact"] == "sha256:aa" and key["backend"] == "torchscript"
    assert key["torch"] == str(torch.__version__)
    changed = [
        {**job, "lr": 1e-2},
        {**job, "seed": 2},
        {**job, "steps": 30},
        {**job, "roles": "none"},
        {**job, "weight_decay": 0.1},
        {**job, "backends": {"learned": "eager"}},
    ]
    keys = {journal.canonical(journal.job_key(other, artifacts)) for other in changed}
    keys.add(journal.canonical(journal.job_key(job, {"learned": "sha256:bb"})))
    assert journal.canonical(key) not in keys and len(keys) == len(changed) + 1
    adamw = {**job, "optimizer": "adamw"}
    plain = journal.job_key({**adamw, "roles": "none", "backends": {}}, {})
    assert journal.job_key(adamw, artifacts) == plain  # AdamW runs no artifact, takes no roles
    assert plain["artifact"] is None and plain["backend"] is None and plain["roles"] is None


def _parse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_lrs_option_parses_grids_and_refuses_bad_values(capsys):
    base = ["--optimizer", "x"]
    settings = options.settings(
        options.parse([*base, "--lrs", "adamw=1e-3,3e-3,0.01", "--lrs", "learned= 1e-2,3e-3,0.01"])
    )
    assert settings["lrs"] == {"adamw": [1e-3, 3e-3, 1e-2], "learned": [3e-3, 1e-2]}
    default = options.settings(options.parse(base))
    assert default["lrs"] == {} and default["journal"] is None
    assert "unknown optimizer kind 'adam'" in _parse_error([*base, "--lrs", "adam=1e-3"], capsys)
    assert "needs KIND=LR[,LR...]" in _parse_error([*base, "--lrs", "adamw"], capsys)
    for bad, value in [
        ("0", "0"),
        ("-1e-3", "-1e-3"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e-3,x", "x"),
        ("1e-3,", ""),
        ("", ""),
    ]:
        err = _parse_error([*base, "--lrs", f"sgd={bad}"], capsys)
        assert f"sgd: lr {value!r} is not a positive finite number" in err
    twice = [*base, "--lrs", "adamw=1e-3", "--lrs", "adamw=3e-3"]
    assert "adamw given more than once" in _parse_error(twice, capsys)
    assert "not allowed with argument --default-lr-only" in _parse_error(
        [*base, "--lrs", "adamw=1e-3", "--default-lr-only"], capsys
    )


def test_lr_grids_replace_the_sweeps_and_keep_the_untuned_baselines():
    grids = {"learned": [1e-2, 3e-2], "old": [30.0], "adamw": [1e-2], "sgd": [0.1]}
    assert optimizers.plan(3e-3, 10.0, quick=False, grids=grids) == {
        "learned": [3e-3, 1e-2, 3e-2],  # the default lr added
        "old": [10.0, 30.0],
        "adamw": [1e-3, 3e-3, 1e-2],  # both untuned AdamW lrs added
        "sgd": [0.1],  # no default: exactly the grid
    }
    quick = optimizers.plan(3e-3, None, quick=True, grids={"adamw": [1e-3, 3e-3, 1e-2]})
    assert quick["adamw"] == [1e-3, 3e-3, 1e-2]
    assert quick["learned"] == optimizers.plan(3e-3, None, quick=True)["learned"]  # no grid
