"""``compiledopt train``: meta-trains, checkpoints, resumes, and refuses bad arguments."""

import io
import json

import pytest
import torch

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
        (["--meta-steps", "0"], "positive integer"),
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
