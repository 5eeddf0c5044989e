"""The ``compiledopt`` command table, optional-dependency checks and one-line user errors."""

import argparse
import ast
import os
import sys
from pathlib import Path

import pytest
import torch

from compiledopt import cli
from compiledopt.apps.requirements import MissingDependencyError, require, require_task_family
from compiledopt.cli import COMMANDS, build_parser, command_module, main

CLI_DIR = Path(cli.__file__).parent
APPS_DIR = CLI_DIR.parent / "apps"
# What a command module may import at its top level: light standard modules, its siblings and
# the applications (compiledopt.apps), which import the same light things at their top level.
LIGHT = {
    "__future__",
    "argparse",
    "contextlib",
    "dataclasses",
    "importlib",
    "json",
    "math",
    "os",
    "pathlib",
    "statistics",
    "sys",
    "time",
    "types",
    "typing",
    "compiledopt._validation",
}


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_parser_knows_exactly_the_commands_of_the_table():
    assert list(_subcommands(build_parser())) == list(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_module_adds_its_parser_and_runs(command):
    module = command_module(command)
    assert module.__name__ == f"compiledopt.cli.{command.replace('-', '_')}"
    assert callable(module.add_parser) and callable(module.run)
    commands = argparse.ArgumentParser(prog="compiledopt").add_subparsers()
    parser = module.add_parser(commands)
    assert isinstance(parser, argparse.ArgumentParser)
    assert list(commands.choices) == [command] and commands.choices[command] is parser


@pytest.mark.parametrize(
    "path",
    [*sorted(CLI_DIR.glob("*.py")), *sorted(APPS_DIR.glob("*.py"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_modules_import_light_things_and_no_private_sibling_names(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:  # the top level only: run() and friends import the heavy modules
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        for name in names:
            own = name.startswith(("compiledopt.cli.", "compiledopt.apps."))
            if path.parent == APPS_DIR:  # an application never imports a command
                own = name.startswith("compiledopt.apps.")
            assert name in LIGHT or own, (path.name, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compiledopt."):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, (path.name, node.module, private)


# -- optional dependencies ---------------------------------------------------------------------


@pytest.fixture
def no_sklearn(monkeypatch):
    """Make ``import sklearn`` fail, as where the ``tasks`` extra is not installed."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)


def _fails_for_sklearn(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"compiledopt {argv[0]}: needs scikit-learn")
    assert "pip install 'compiledopt[tasks]'" in lines[0]
    assert captured.out == ""


def test_demo_without_sklearn_stops_before_writing(no_sklearn, tmp_path, capsys):
    workdir = tmp_path / "demo"
    _fails_for_sklearn(["demo", "--workdir", str(workdir), "--no-progress"], capsys)
    assert not workdir.exists()


def test_finetune_without_sklearn_stops_first(no_sklearn, tmp_path, capsys):
    # the check comes before the artifact is even loaded
    _fails_for_sklearn(["finetune", str(tmp_path / "no-artifact")], capsys)


@pytest.mark.parametrize("family", ["digits", "mixed"])
def test_train_on_a_family_that_needs_sklearn(no_sklearn, family, tmp_path, capsys):
    output = tmp_path / "run" / "learned.pt"
    _fails_for_sklearn(["train", "--family", family, "--output", str(output)], capsys)
    assert not output.parent.exists()


def test_require(no_sklearn):
    require("json", "tasks")
    require_task_family("regression")
    with pytest.raises(MissingDependencyError, match=r"scikit-learn.*compiledopt\[tasks\]"):
        require_task_family("digits")
    with pytest.raises(ImportError, match=r"needs not_a_package_at_all, which is not installed"):
        require("not_a_package_at_all", "bench")


# -- user errors: one line and status 2 ---------------------------------------------------------


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"compiledopt {argv[0]}: ")
    return err


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    err = _one_line_error(["export", str(missing), "--output", str(tmp_path / "a")], capsys)
    assert str(missing) in err and "No such file" in err


def test_checkpoint_without_a_transform_spec(tmp_path, capsys):
    checkpoint = tmp_path / "bare.pt"
    torch.save({"metadata": {}}, checkpoint)
    err = _one_line_error(["export", str(checkpoint), "--output", str(tmp_path / "a")], capsys)
    assert "has no transform spec" in err
    assert not (tmp_path / "a").exists()


def test_missing_artifact(tmp_path, capsys):
    _one_line_error(["finetune", str(tmp_path / "missing")], capsys)
    _one_line_error(["verify", str(tmp_path / "missing")], capsys)


def test_unknown_backend_stops_the_demo_before_any_work(tmp_path, capsys):
    workdir = tmp_path / "demo"
    err = _one_line_error(["demo", "--workdir", str(workdir), "--backends", "onnx,tflite"], capsys)
    assert "Unknown backend: 'tflite'" in err
    assert not workdir.exists()


def test_bad_ranks_are_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "x.pt", "--output", str(tmp_path / "a"), "--ranks", "1,two"])
    assert exit_info.value.code == 2
    assert "must be comma-separated integers" in capsys.readouterr().err


def test_bench_parses_its_options_through_the_table(monkeypatch):
    seen = []
    monkeypatch.setattr(command_module("bench"), "run", lambda args, out: seen.append(args) or 0)
    assert main(["bench", "art", "--model", "convnet", "--threads", "1,2", "--repeats", "3"]) == 0
    assert [(a.command, a.artifact, a.model, a.threads, a.repeats) for a in seen] == [
        ("bench", "art", "convnet", [1, 2], 3)
    ]


def test_meta_descent_names_itself(capsys):
    assert main(["meta-descent", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith("compiledopt meta-descent: ")


# -- the output root: where default outputs go ------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No COMPILEDOPT_HOME nor XDG_DATA_HOME, HOME in tmp_path, and an empty current folder."""
    monkeypatch.delenv("COMPILEDOPT_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({}, "user/.local/share/compiledopt"),
        ({"COMPILEDOPT_HOME": "{tmp}/mine"}, "mine"),
        ({"COMPILEDOPT_HOME": "{tmp}/mine", "XDG_DATA_HOME": "{tmp}/data"}, "mine"),
        ({"COMPILEDOPT_HOME": "~/mine"}, "user/mine"),
        ({"COMPILEDOPT_HOME": "relative"}, "cwd/relative"),
        ({"COMPILEDOPT_HOME": "", "XDG_DATA_HOME": "{tmp}/data"}, "data/compiledopt"),
        ({"XDG_DATA_HOME": "data"}, "user/.local/share/compiledopt"),  # relative: ignored
        ({"XDG_DATA_HOME": ""}, "user/.local/share/compiledopt"),
    ],
    ids=["default", "home", "home-over-xdg", "tilde", "relative", "empty-home", "xdg-rel", "empty"],
)
def test_output_root_follows_the_documented_order(
    environment, expected, clean_environment, monkeypatch
):
    from compiledopt.apps.paths import output_root

    tmp = clean_environment
    for name, value in environment.items():
        monkeypatch.setenv(name, value.replace("{tmp}", str(tmp)))
    root = output_root()
    assert root == tmp / expected and root.is_absolute()
    assert not root.exists() and os.listdir(tmp / "cwd") == []  # resolving creates nothing


def test_default_output_refuses_a_name_that_is_not_one_folder(clean_environment):
    from compiledopt.apps.paths import default_output

    for name in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError, match="plain folder name"):
            default_output(name)


class _StoppedError(Exception):
    """Raised in place of meta-training: the test has seen what it needs."""


@pytest.fixture
def stop_at_meta_training(monkeypatch):
    from compiledopt.meta import MetaLoop

    def stop(*args, **kwargs):
        raise _StoppedError

    monkeypatch.setattr(MetaLoop, "train", stop)


def test_demo_writes_under_compiledopt_home_never_in_the_cwd(
    clean_environment, stop_at_meta_training, monkeypatch, capsys
):
    home = clean_environment / "home"
    monkeypatch.setenv("COMPILEDOPT_HOME", str(home))
    with pytest.raises(_StoppedError):
        main(["demo", "--no-progress", "--backends", "torchscript"])
    assert f"outputs (checkpoint, artifact) go to {home / 'demo'}\n" in capsys.readouterr().out
    assert (home / "demo").is_dir()
    assert os.listdir(clean_environment / "cwd") == []
    assert not (clean_environment / "user").exists()


def test_demo_defaults_to_the_xdg_data_folder(clean_environment, stop_at_meta_training, capsys):
    with pytest.raises(_StoppedError):
        main(["demo", "--no-progress", "--backends", "torchscript"])
    expected = clean_environment / "user" / ".local" / "share" / "compiledopt" / "demo"
    assert f"go to {expected}\n" in capsys.readouterr().out
    assert expected.is_dir() and os.listdir(clean_environment / "cwd") == []


def test_run_pipeline_defaults_to_the_output_root(
    clean_environment, stop_at_meta_training, monkeypatch
):
    import io

    from compiledopt.apps.pipeline import run_pipeline

    monkeypatch.setenv("COMPILEDOPT_HOME", str(clean_environment / "home"))
    out = io.StringIO()
    with pytest.raises(_StoppedError):
        run_pipeline(backends=("torchscript",), out=out, progress=False)
    assert f"go to {clean_environment / 'home' / 'demo'}\n" in out.getvalue()
    assert os.listdir(clean_environment / "cwd") == []


def test_an_explicit_workdir_is_used_as_given(
    clean_environment, stop_at_meta_training, monkeypatch
):
    monkeypatch.setenv("COMPILEDOPT_HOME", str(clean_environment / "home"))
    with pytest.raises(_StoppedError):
        main(["demo", "--workdir", "mine", "--no-progress", "--backends", "torchscript"])
    assert os.listdir(clean_environment / "cwd") == ["mine"]  # relative to the cwd, as asked
    assert not (clean_environment / "home").exists()


def test_train_checkpoints_under_the_output_root_never_in_the_cwd(clean_environment, monkeypatch):
    import io

    from compiledopt.cli import train

    home = clean_environment / "home"
    monkeypatch.setenv("COMPILEDOPT_HOME", str(home))
    small = ["--meta-steps", "1", "--unroll", "2", "--horizon", "2", "--tasks-per-step", "1"]
    small += ["--eval-every", "1", "--eval-tasks", "1", "--eval-steps", "2", "--no-progress"]
    args = build_parser().parse_args(["train", *small])
    out = io.StringIO()
    assert train.run(args, out) == 0
    checkpoint = home / "train" / "learned.pt"
    assert checkpoint.is_file() and f"{checkpoint}\n" in out.getvalue()
    assert os.listdir(clean_environment / "cwd") == []


def test_train_help_documents_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "<output root>/train/learned.pt" in help_text and "$COMPILEDOPT_HOME" in help_text


def test_demo_help_documents_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "<output root>/demo" in help_text and "$COMPILEDOPT_HOME" in help_text
    assert "~/.local/share/compiledopt" in help_text


def test_the_finetune_table_explains_a_first_step_that_compiled():
    import io

    from compiledopt.apps.finetune import _print_table

    row = {"train_loss": 0.1, "heldout_loss": 0.2, "accuracy": 0.9, "step_ms": 1.0}
    results = {
        "frozen/eager": {**row, "first_step_ms": 4.0},
        "frozen/compiled": {**row, "first_step_ms": 45_000.0},
        "AdamW (best lr)": {**row, "first_step_ms": 2_000.0},
    }
    out = io.StringIO()
    _print_table(results, 300, "normalized-mlp artifact, lr 0.003", 0.03, out)
    note = out.getvalue().splitlines()[-1]
    assert "frozen/compiled: the first step built the compiled rule" in note
    assert "eager" not in note and "AdamW" not in note
    results["frozen/compiled"]["first_step_ms"] = 900.0
    out = io.StringIO()
    _print_table(results, 300, "normalized-mlp artifact, lr 0.003", 0.03, out)
    assert "first step built" not in out.getvalue()
