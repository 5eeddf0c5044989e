"""Edge cases a demanding user hits on the command line and when opening an artifact: each is
refused with one message naming the offending value (on the command line: one line on stderr,
exit status 2), before any long work and without changing a file."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_checks import one_line

import compiledopt.apps.finetune
import compiledopt.bench
import compiledopt.meta.launch
from compiledopt import FrozenOptimizer, pretrained
from compiledopt.cli import main
from compiledopt.export import ArtifactError, load_artifact
from compiledopt.export.replace import replaceable
from compiledopt.meta import MetaLoop


@pytest.fixture
def artifact(tmp_path) -> Path:
    """A copy of the packaged default optimizer (TorchScript and ONNX graphs)."""
    return Path(shutil.copytree(pretrained.path(pretrained.DEFAULT), tmp_path / "artifact"))


@pytest.fixture
def no_long_work(monkeypatch, tmp_path):
    """Meta-training, fine-tuning and timing fail the test: a refusal must come before them."""

    def refuse(*args, **kwargs):
        raise AssertionError("long work started before the bad input was refused")

    monkeypatch.setenv("COMPILEDOPT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(MetaLoop, "train", refuse)
    monkeypatch.setattr(compiledopt.meta.launch, "run_meta", refuse)
    monkeypatch.setattr(compiledopt.apps.finetune, "pretrain", refuse)
    monkeypatch.setattr(compiledopt.bench, "benchmark", refuse)


def _run(argv, capsys):
    """``main(argv)``: status and stderr (argparse refusals give their exit status)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err


def _argparse_line(status, err, command: str) -> str:
    assert status == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"compiledopt {command}: error: "), err
    return last


def _files(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- manifest.json must be strict JSON --------------------------------------------------------


def _with_lr_twice(artifact: Path) -> bytes:
    """The artifact's manifest with ``"lr": 0.5`` before its own ``lr`` (json.loads keeps the
    last; a reader that keeps the first sees another artifact)."""
    data = (artifact / "manifest.json").read_bytes()
    assert data.startswith(b"{")
    return b'{"lr": 0.5, ' + data[1:]


def test_manifest_with_a_key_twice_is_refused(artifact):
    (artifact / "manifest.json").write_bytes(_with_lr_twice(artifact))
    with pytest.raises(
        ArtifactError, match=r"manifest\.json is not valid JSON: duplicate key 'lr'"
    ):
        load_artifact(artifact)


def test_inspect_refuses_a_manifest_with_a_key_twice(artifact, capsys):
    (artifact / "manifest.json").write_bytes(_with_lr_twice(artifact))
    line = one_line(*_run(["inspect", artifact], capsys), "inspect")
    assert "duplicate key 'lr'" in line and str(artifact) in line


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-16"),
        lambda text: text.encode("utf-32"),
        lambda text: b"\xef\xbb\xbf" + text.encode(),
    ],
    ids=["utf-16", "utf-32", "utf-8-bom"],
)
def test_manifest_that_is_not_plain_utf8_is_refused(artifact, encode):
    text = (artifact / "manifest.json").read_text()
    (artifact / "manifest.json").write_bytes(encode(text))
    with pytest.raises(
        ArtifactError, match=r"manifest\.json is not valid JSON: .*(utf-8|byte-order)"
    ):
        load_artifact(artifact)


def test_signature_with_a_field_twice_is_refused(artifact, tmp_path):
    pytest.importorskip("cryptography")
    from compiledopt.export import signing

    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    signing.sign_artifact(artifact, tmp_path / "k.pem")
    record = (artifact / "signature.json").read_bytes()
    (artifact / "signature.json").write_bytes(b'{"algorithm": "rsa", ' + record.lstrip()[1:])
    with pytest.raises(
        ArtifactError, match=r"signature\.json is malformed.*duplicate key 'algorithm'"
    ):
        load_artifact(artifact, trusted_keys=[tmp_path / "k.pub.pem"])


def test_sign_refuses_a_manifest_with_a_key_twice(artifact, tmp_path, capsys):
    pytest.importorskip("cryptography")
    assert (
        _run(["keygen", "--private", tmp_path / "k.pem", "--public", tmp_path / "p"], capsys)[0]
        == 0
    )
    (artifact / "manifest.json").write_bytes(_with_lr_twice(artifact))
    before = _files(artifact)
    line = one_line(*_run(["sign", artifact, "--key", tmp_path / "k.pem"], capsys), "sign")
    assert "duplicate key 'lr'" in line
    assert _files(artifact) == before


def test_overwrite_treats_a_manifest_with_a_key_twice_as_not_an_artifact(artifact):
    (artifact / "manifest.json").write_bytes(_with_lr_twice(artifact))
    assert replaceable(artifact) is not None


# -- JSON given on the command line or in --config --------------------------------------------


def test_train_config_with_a_key_twice_is_refused(tmp_path, no_long_work, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"meta_steps": 1, "unroll": 2, "meta_steps": 1000}')
    argv = ["train", "--config", config, "--output", tmp_path / "out.pt"]
    line = one_line(*_run(argv, capsys), "train")
    assert f"--config {config}" in line and "duplicate key 'meta_steps'" in line
    assert not (tmp_path / "out.pt").exists()


def test_train_kwargs_with_a_key_twice_are_refused(tmp_path, no_long_work, capsys):
    kwargs = '{"init": 0.1, "init": 0.2}'
    argv = ["train", "--transform", "learned-step-size", "--transform-kwargs", kwargs]
    line = _argparse_line(*_run([*argv, "--output", tmp_path / "out.pt"], capsys), "train")
    assert "duplicate key 'init'" in line


# -- trust_code is a bool ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["no", "False", 0.0, 1, None])
def test_load_artifact_refuses_a_trust_code_that_is_not_a_bool(artifact, value):
    with pytest.raises(ValueError, match=f"Invalid trust_code: {value!r} \\(expected a bool\\)"):
        load_artifact(artifact, trust_code=value)


def test_trusting_refuses_a_code_that_is_not_a_bool(artifact):
    with pytest.raises(ValueError, match="Invalid trust_code: 'no'"):
        load_artifact(artifact).trusting("no")
    assert load_artifact(artifact).trusting(False).code_trusted is False


# -- an empty path is not the working directory -----------------------------------------------


def test_an_empty_path_does_not_open_the_working_directory(artifact, monkeypatch):
    monkeypatch.chdir(artifact)  # an artifact that "" would silently open
    for open_it in (
        load_artifact,
        pretrained.resolve,
        pretrained.open_artifact,
        lambda p: FrozenOptimizer(torch.nn.Linear(2, 2).parameters(), p),
    ):
        with pytest.raises(ArtifactError, match=r"artifact not found: the path is empty \(''\)"):
            open_it("")


@pytest.mark.parametrize("command", ["inspect", "verify", "finetune", "bench"])
def test_commands_refuse_an_empty_artifact_path(
    command, artifact, monkeypatch, no_long_work, capsys
):
    monkeypatch.chdir(artifact)
    line = one_line(*_run([command, ""], capsys), command)
    assert line.endswith("artifact not found: the path is empty ('')")


# -- a backend or a thread count named twice --------------------------------------------------


@pytest.mark.parametrize("command", ["finetune", "demo"])
def test_backends_named_twice_are_refused(command, artifact, tmp_path, no_long_work, capsys):
    argv = [command, artifact] if command == "finetune" else [command, "--workdir", tmp_path / "w"]
    line = one_line(*_run([*argv, "--backends", "onnx,eager,onnx"], capsys), command)
    assert line.endswith("--backends 'onnx,eager,onnx': backend 'onnx' repeated")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--backends", "onnx, onnx", "backend 'onnx' repeated in 'onnx, onnx'"),
        ("--threads", "1,01", "thread count 1 repeated in '1,01'"),
    ],
)
def test_bench_refuses_a_repeated_item(option, value, message, artifact, no_long_work, capsys):
    line = _argparse_line(*_run(["bench", artifact, option, value], capsys), "bench")
    assert line.endswith(f"argument {option}: {message}")


def test_strict_json_still_reads_what_json_reads(artifact):
    # The strict parser refuses only what the checks above name: a real manifest, nested
    # objects with the same key at different levels, and unicode all load as before.
    loaded = load_artifact(artifact)
    assert loaded.manifest == json.loads((artifact / "manifest.json").read_text())
    from compiledopt._validation import strict_json

    assert strict_json('{"a": {"a": 1}, "b": ["é", {"a": 2}]}') == {
        "a": {"a": 1},
        "b": ["é", {"a": 2}],
    }


# -- bench's output files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "plot, message",
    [
        ("{json}", "the same file as --json {json}"),
        ("result.out", "ends in .out; name the image format by its extension (one of "),
        ("result", "has no extension; name the image format by its extension (one of "),
    ],
    ids=["same-as-json", "unknown-format", "no-extension"],
)
def test_bench_refuses_a_plot_it_cannot_write_before_timing(
    plot, message, artifact, tmp_path, no_long_work, monkeypatch, capsys
):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    json_path = str(tmp_path / "result.png")
    plot = plot.format(json=json_path)
    argv = ["bench", artifact, "--json", json_path, "--plot", plot]
    line = one_line(*_run(argv, capsys), "bench")
    assert f"--plot {plot}: {message.format(json=json_path)}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


# -- an output file named with a trailing separator -------------------------------------------


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--transform", "learned-step-size", "--output", "{dir}/run.pt/"], "--output"),
        (["bench", "{artifact}", "--json", "{dir}/result.json/"], "--json"),
        (["keygen", "--private", "{dir}/key.pem/", "--public", "{dir}/key.pub"], "--private"),
        (["keygen", "--private", "{dir}/key.pem", "--public", "{dir}/key.pub/"], "--public"),
    ],
    ids=["train-output", "bench-json", "keygen-private", "keygen-public"],
)
def test_an_output_file_ending_in_a_separator_is_refused_before_any_work(
    argv, option, artifact, tmp_path, no_long_work, capsys
):
    folder = tmp_path / "out"
    argv = [a.format(dir=folder, artifact=artifact) for a in argv]
    path = argv[argv.index(option) + 1]
    line = one_line(*_run(argv, capsys), argv[0])
    assert line.endswith(f"{option} {path}: ends in '/', a folder's name, not a file")
    assert not folder.exists()


# -- a training block that JSON cannot hold names the value -----------------------------------


@pytest.mark.parametrize(
    "training, where",
    [
        (
            {"deep": {"x": [1, float("inf")]}},
            "training['deep']['x'][1] is inf, not a finite number",
        ),
        ({"a": float("nan")}, "training['a'] is nan, not a finite number"),
        ({"a": [torch.zeros(1)]}, "training['a'][0] is a Tensor, not a JSON value"),
    ],
    ids=["inf", "nan", "tensor"],
)
def test_check_training_names_the_value_json_cannot_hold(training, where):
    from compiledopt.export.manifest import check_training

    with pytest.raises(ValueError) as raised:
        check_training(training)
    assert str(raised.value) == f"'training' must hold only JSON values: {where}"


# -- sign leaves nothing behind when it cannot write signature.json ---------------------------


def test_sign_refuses_a_signature_path_that_is_a_directory(artifact, tmp_path, capsys):
    pytest.importorskip("cryptography")
    from compiledopt.export import signing

    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    (artifact / "signature.json").mkdir()
    before = sorted(p.name for p in artifact.iterdir())
    line = one_line(*_run(["sign", artifact, "--key", tmp_path / "k.pem"], capsys), "sign")
    assert line.endswith(f"{artifact}: signature.json is a directory, not a signature file")
    assert sorted(p.name for p in artifact.iterdir()) == before


def test_sign_interrupted_while_writing_leaves_no_temporary_file(artifact, tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from compiledopt.export import signing

    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    before = _files(artifact)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(signing.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        signing.sign_artifact(artifact, tmp_path / "k.pem")
    assert _files(artifact) == before


def test_generate_keypair_refuses_one_path_for_both_keys(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from compiledopt.export import signing

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^k\.pem: the same path as the private key k\.pem$"):
        signing.generate_keypair("k.pem", "./k.pem")
    assert list(tmp_path.iterdir()) == []


def test_generate_keypair_leaves_no_private_key_without_its_public_key(tmp_path):
    pytest.importorskip("cryptography")
    from compiledopt.export import signing

    with pytest.raises(FileNotFoundError):
        signing.generate_keypair(tmp_path / "k.pem", tmp_path / "missing" / "k.pub.pem")
    assert list(tmp_path.iterdir()) == []


# -- train --processes beyond the task slots --------------------------------------------------


def test_train_refuses_more_processes_than_task_slots_before_spawning(
    tmp_path, no_long_work, capsys
):
    argv = ["train", "--transform", "learned-step-size", "--meta-steps", "1", "--no-progress"]
    argv += ["--tasks-per-step", "2", "--processes", "9999", "--output", tmp_path / "run.pt"]
    line = one_line(*_run(argv, capsys), "train")
    assert line.endswith(
        "--processes 9999: more than the 2 task slots (--tasks-per-step) to spread over them; a "
        "rank without a slot would be an idle process"
    )
    assert not (tmp_path / "run.pt").exists()
