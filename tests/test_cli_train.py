"""``compiledopt train``: meta-trains, checkpoints, resumes, and refuses bad arguments."""

import io
import json

import pytest
import torch
from cli_checks import one_line

from compiledopt import cli
from compiledopt.cli import train
from compiledopt.learned import CoordinateMLP, LearnedStepSize
from compiledopt.learned.catalog import CATALOG, build_transform

SMALL = [
    "--meta-steps",
    "2",
    "--unroll",
    "2",
    "--horizon",
    "4",
    "--tasks-per-step",
    "2",
    "--eval-every",
    "2",
    "--eval-tasks",
    "1",
    "--eval-steps",
    "3",
    "--no-progress",
]


def _train(argv):
    args = cli.build_parser().parse_args(["train", *argv])
    out = io.StringIO()
    assert train.run(args, out) == 0
    return out.getvalue()


def test_train_writes_a_checkpoint_and_a_summary(tmp_path):
    path = tmp_path / "mlp.pt"
    kwargs = json.dumps({"hidden_sizes": [4]})
    text = _train(
        [
            "--transform",
            "coordinate-mlp",
            "--transform-kwargs",
            kwargs,
            "--output",
            str(path),
            *SMALL,
        ]
    )
    assert "compiledopt train: summary" in text and "held-out" in text
    state = torch.load(path, weights_only=True)
    assert state["meta_step"] == 2
    assert state["metadata"]["transform_spec"] == {
        "name": "coordinate-mlp",
        "kwargs": {"hidden_sizes": [4]},
    }
    rebuilt = build_transform("coordinate-mlp", {"hidden_sizes": [4]})
    rebuilt.load_state_dict(state["transform"])
    assert isinstance(rebuilt, CoordinateMLP)


def test_resume_continues_exactly(tmp_path):
    base = ["--transform", "learned-step-size", *SMALL[2:]]
    _train(["--meta-steps", "4", "--output", str(tmp_path / "full.pt"), *base])
    _train(["--meta-steps", "2", "--output", str(tmp_path / "part.pt"), *base])
    _train(["--meta-steps", "4", "--output", str(tmp_path / "part.pt"), "--resume", *base])
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    part = torch.load(tmp_path / "part.pt", weights_only=True)
    assert torch.equal(full["transform"]["log_lr"], part["transform"]["log_lr"])
    assert full["history"] == part["history"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--transform", "kronecker"], "invalid choice"),
        (["--family", "imagenet"], "invalid choice"),
        (["--meta-steps", "0"], "must be an integer in [1, 10,000,000], got 0"),
        (["--inner-lr", "nan"], "positive finite"),
        (["--transform-kwargs", "{not json"], "not valid JSON"),
        (["--transform-kwargs", "[1]"], "must be a JSON object"),
    ],
)
def test_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_catalog():
    assert set(CATALOG) >= {"coordinate-mlp", "coordinate-lstm", "learned-step-size"}
    assert all(build_transform(name).shape_agnostic for name in CATALOG)
    assert isinstance(build_transform("learned-step-size", {"step_size": 0.5}), LearnedStepSize)
    with pytest.raises(ValueError, match="Unknown transform: 'rmsprop'"):
        build_transform("rmsprop")


# -- a resumed run keeps its settings, unless a change is asked for by name ---------------------


def _base(path):
    return ["--transform", "learned-step-size", *SMALL[2:], "--output", str(path)]


def test_resume_refuses_a_changed_meta_lr(tmp_path, capsys):
    path = tmp_path / "run.pt"
    _train(["--meta-steps", "2", "--meta-lr", "0.001", *_base(path)])
    saved = path.read_bytes()
    argv = ["train", "--meta-steps", "4", "--meta-lr", "0.01", "--resume", *_base(path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "compiledopt train: --resume: meta_lr is 0.001 in the checkpoint, 0.01 now "
        "(pass --allow-changes meta_lr to change them deliberately)"
    ]
    assert path.read_bytes() == saved


def test_resume_names_every_changed_setting(tmp_path, capsys):
    path = tmp_path / "run.pt"
    _train(["--meta-steps", "2", *_base(path)])
    argv = ["train", "--meta-steps", "4", "--inner-lr", "0.5", "--clip-norm", "3", "--resume"]
    assert cli.main([*argv, *_base(path)]) == 2
    err = capsys.readouterr().err
    assert "inner_lr is 0.1 in the checkpoint, 0.5 now" in err
    assert "clip_norm is 1.0 in the checkpoint, 3.0 now" in err
    assert "--allow-changes inner_lr,clip_norm" in err


def test_resume_may_run_longer_and_evaluate_differently(tmp_path):
    path = tmp_path / "run.pt"
    _train(["--meta-steps", "2", *_base(path)])
    _train(["--meta-steps", "3", "--resume", *_base(path), "--eval-every", "3"])
    state = torch.load(path, weights_only=True)
    assert state["meta_step"] == 3
    assert (state["config"]["meta_steps"], state["config"]["eval_every"]) == (3, 3)


def test_an_allowed_change_runs_and_is_recorded(tmp_path):
    path = tmp_path / "run.pt"
    _train(["--meta-steps", "2", "--meta-lr", "0.001", *_base(path)])
    text = _train(
        [
            *["--meta-steps", "3", "--meta-lr", "0.01", "--resume"],
            *["--allow-changes", "meta_lr", *_base(path)],
        ]
    )
    assert "meta_lr: 0.001 -> 0.01" in text
    state = torch.load(path, weights_only=True)
    assert state["meta_step"] == 3
    assert state["config"]["meta_lr"] == 0.01
    assert [g["lr"] for g in state["meta_optimizer"]["param_groups"]] == [0.01]
    assert state["metadata"]["config_changes"] == [
        {"meta_step": 2, "setting": "meta_steps", "from": 2, "to": 3},
        {"meta_step": 2, "setting": "meta_lr", "from": 0.001, "to": 0.01},
    ]


def test_an_allowed_change_of_the_inner_lr_is_kept_on_the_next_resume(tmp_path, capsys):
    path = tmp_path / "run.pt"
    _train(["--meta-steps", "1", *_base(path)])
    changed = ["--inner-lr", "0.05", "--resume", *_base(path)]
    _train(["--meta-steps", "2", "--allow-changes", "inner_lr", *changed])
    # the checkpoint now records 0.05: resuming with it needs no permission, the old lr does
    _train(["--meta-steps", "3", *changed])
    assert cli.main(["train", "--meta-steps", "4", "--resume", *_base(path)]) == 2
    assert "inner_lr is 0.05 in the checkpoint, 0.1 now" in capsys.readouterr().err
    state = torch.load(path, weights_only=True)
    assert [(c["meta_step"], c["setting"]) for c in state["metadata"]["config_changes"]] == [
        (1, "meta_steps"),
        (1, "inner_lr"),
        (2, "meta_steps"),
    ]


def test_es_resume_refuses_a_changed_setting_before_any_work(tmp_path, capsys):
    path = tmp_path / "es.pt"
    base = [
        *["--estimator", "pes", "--transform", "coordinate-mlp"],
        *["--transform-kwargs", '{"hidden_sizes": [4]}', "--unroll", "2", "--horizon", "4"],
        *["--min-horizon", "2", "--pairs", "1", "--tasks-per-step", "1", "--eval-every", "0"],
        *["--eval-tasks", "1", "--eval-steps", "2", "--no-progress", "--output", str(path)],
    ]
    _train(["--meta-steps", "1", *base])
    saved = path.read_bytes()
    assert cli.main(["train", "--meta-steps", "2", "--sigma", "0.5", "--resume", *base]) == 2
    err = capsys.readouterr().err
    assert "--resume: sigma is 0.01 in the checkpoint, 0.5 now" in err
    assert "(pass --allow-changes sigma to change them deliberately)" in err
    assert path.read_bytes() == saved
    allowed = ["--sigma", "0.5", "--allow-changes", "sigma", "--resume", *base]
    _train(["--meta-steps", "2", *allowed])  # every estimator resumes with a change asked for
    state = torch.load(path, weights_only=True)
    assert (state["meta_step"], state["config"]["sigma"]) == (2, 0.5)
    assert [(c["meta_step"], c["setting"]) for c in state["metadata"]["config_changes"]] == [
        (1, "meta_steps"),
        (1, "sigma"),
    ]
    kwargs = ["--transform-kwargs", '{"hidden_sizes": [8]}']
    assert cli.main(["train", "--meta-steps", "2", "--resume", *base, *kwargs]) == 2
    assert "transform_kwargs is" in capsys.readouterr().err


# -- --export: an existing artifact is replaced only with --overwrite ------------------------------


def test_export_refuses_an_existing_artifact_unless_overwrite(tmp_path, capsys):
    artifact = tmp_path / "artifact"
    base = ["--transform", "learned-step-size", *SMALL, "--export-backends", "onnx"]
    _train([*base, "--output", str(tmp_path / "a.pt"), "--export", str(artifact)])
    manifest = (artifact / "manifest.json").read_bytes()
    argv = ["train", *base, "--output", str(tmp_path / "b.pt"), "--export", str(artifact)]
    line = one_line(cli.main(argv), capsys.readouterr().err, "train")
    assert f"--export {artifact}: exists (pass --overwrite to replace it)" in line
    assert not (tmp_path / "b.pt").exists()  # refused before any work
    assert (artifact / "manifest.json").read_bytes() == manifest
    _train([*argv[1:], "--overwrite"])
    assert (tmp_path / "b.pt").exists() and (artifact / "manifest.json").exists()


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tmp_path, capsys):
    path = tmp_path / "run.pt"
    base = ["--transform", "learned-step-size", *SMALL, "--output", str(path)]
    _train(base)
    saved = path.read_bytes()
    line = one_line(cli.main(["train", *base, "--seed", "1"]), capsys.readouterr().err, "train")
    assert f"--output {path}: exists (pass --resume to continue it, or --overwrite" in line
    assert path.read_bytes() == saved
    _train([*base, "--seed", "1", "--overwrite"])
    assert torch.load(path, weights_only=True)["family"]["seed"] == 1


def test_overwrite_is_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--overwrite" in capsys.readouterr().out


# -- the application the command calls --------------------------------------------------------


def test_meta_train_trains_what_the_command_trains(tmp_path):
    from compiledopt.apps.train import TrainSettings, meta_train

    _train(["--transform", "learned-step-size", "--output", str(tmp_path / "cli.pt"), *SMALL])
    numbers = dict(meta_steps=2, unroll=2, horizon=4, tasks_per_step=2, eval_every=2)
    result = meta_train(
        TrainSettings(
            transform="learned-step-size",
            **numbers,
            eval_tasks=1,
            eval_steps=3,
            output=str(tmp_path / "app.pt"),
            progress=False,
        )
    )
    cli_state = torch.load(tmp_path / "cli.pt", weights_only=True)
    app_state = torch.load(tmp_path / "app.pt", weights_only=True)
    assert torch.equal(cli_state["transform"]["log_lr"], app_state["transform"]["log_lr"])
    assert [r["loss"] for r in cli_state["history"]] == result.history
    assert [step for step, _ in result.evaluations] == [0, 2]  # before training and after
    assert dict(result.summary())["checkpoint"] == str(tmp_path / "app.pt")


def test_meta_train_refuses_a_setting_the_estimator_ignores(tmp_path):
    from compiledopt.apps.train import TrainSettings, meta_train

    settings = TrainSettings(pairs=4, output=str(tmp_path / "run.pt"))  # given: not default
    with pytest.raises(ValueError, match="--pairs 4: only --estimator pes or es uses it"):
        meta_train(settings)
    assert not (tmp_path / "run.pt").exists()


def test_the_loop_reads_the_one_table_of_resumable_settings():
    from compiledopt.meta import loop
    from compiledopt.meta.resume import RESUMABLE_CHANGES

    assert RESUMABLE_CHANGES == ("meta_steps", "eval_every", "checkpoint_every")
    assert loop.RESUMABLE_CHANGES is RESUMABLE_CHANGES
