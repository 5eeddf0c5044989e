"""Every bad ``compiledopt`` invocation: status 2, one line naming the bad value, no traceback,
nothing written, and no long work (meta-training, export, fine-tuning, timing) before it stops.

Each case of :data:`CASES` runs ``compiledopt.cli.main`` in-process with the heavy entry points
replaced by functions that fail the test, so a refusal that comes after any real work fails.
Argument errors exit through argparse (``SystemExit(2)``, usage, then ``error:`` naming the
option); the others return 2 after one line ``compiledopt <command>: <message>``.
"""

import json
import os
import random
import shutil
import time

import pytest
import torch
from cli_checks import one_line

from compiledopt import cli
from compiledopt.cli import main
from compiledopt.export import load_artifact, signing
from compiledopt.meta.resume import load_checkpoint

TINY = [
    "--transform",
    "learned-step-size",
    "--meta-steps",
    "1",
    "--unroll",
    "2",
    "--horizon",
    "4",
    "--tasks-per-step",
    "1",
    "--eval-every",
    "0",
    "--eval-tasks",
    "1",
    "--eval-steps",
    "2",
    "--no-progress",
]
#: A file name longer than any file system allows (255 bytes on most).
LONG = "n" * 300
#: A count no run could reach, nor allocate memory for.
HUGE = str(10**30)
PES = [
    "--estimator",
    "pes",
    "--transform",
    "learned-step-size",
    "--meta-steps",
    "1",
    "--unroll",
    "2",
    "--horizon",
    "4",
    "--min-horizon",
    "2",
    "--pairs",
    "1",
    "--tasks-per-step",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the cases: a real checkpoint, and files that are not what they claim to be."""
    root = tmp_path_factory.mktemp("inputs")
    checkpoint = root / "run.pt"
    assert main(["train", *TINY, "--output", str(checkpoint)]) == 0
    (root / "random.bin").write_bytes(random.Random(0).randbytes(2000))
    (root / "object.json").write_text('{"a": 1}')
    (root / "empty.pt").write_bytes(b"")
    (root / "list.json").write_text("[1, 2]")
    (root / "bad.json").write_text("{not json")
    (root / "unknown.json").write_text('{"bogus_key": 1}')
    (root / "zero-steps.json").write_text('{"meta_steps": 0}')
    (root / "text-seed.json").write_text('{"seed": "x"}')
    (root / "list-kwargs.json").write_text('{"transform_kwargs": [1]}')
    (root / "nan-lr.json").write_text('{"inner_lr": NaN}')
    (root / "huge-eval-steps.json").write_text(json.dumps({"eval_steps": int(HUGE)}))
    torch.save([1, 2], root / "list.pt")
    torch.save({"metadata": {"transform_spec": {"name": "learned-step-size"}}}, root / "bare.pt")
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("not an artifact")
    signing.generate_keypair(root / "private.pem", root / "public.pem")
    signing.generate_keypair(root / "other-private.pem", root / "other-public.pem")
    export = ["export", str(checkpoint), "--backends", "torchscript,onnx", "--ranks", "1"]
    assert main([*export, "--output", str(root / "artifact")]) == 0
    signed = ["--output", str(root / "signed"), "--sign-key", str(root / "private.pem")]
    assert main([*export, *signed]) == 0
    (root / "webapp").mkdir()  # a folder that merely holds a manifest.json: not an artifact
    (root / "webapp" / "manifest.json").write_text('{"name": "My App", "start_url": "/"}')
    (root / "webapp" / "index.html").write_text("<html></html>")
    shutil.copytree(root / "artifact", root / "annotated")  # an artifact a user added to
    (root / "earlier-demo" / "artifact").mkdir(parents=True)  # not a demo's artifact
    (root / "earlier-demo" / "artifact" / "keep.txt").write_text("mine")
    (root / "earlier-demo" / "checkpoint.pt").write_bytes(b"an earlier run's")
    (root / "annotated" / "notes.txt").write_text("mine")
    return root


def _kept(files):
    """The files of the folders that are not (only) artifacts, which nothing may delete."""
    folders = ("folder", "webapp", "annotated", "earlier-demo", "earlier-demo/artifact")
    return {
        str(p.relative_to(files)): p.read_bytes()
        for folder in folders
        for p in sorted((files / folder).iterdir())
        if p.is_file()
    }


@pytest.fixture
def unwritable(tmp_path):
    """A directory in which no file can be created."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
    elif os.path.isdir("/proc/self"):  # root writes anywhere, except in /proc
        yield "/proc"
    else:
        pytest.skip("no unwritable directory here")


@pytest.fixture
def no_long_work(monkeypatch, tmp_path):
    """Fail the test if a case reaches meta-training, export, fine-tuning or timing; run it in
    an empty folder, with the output root (where default outputs go) in ``tmp_path/home``."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("COMPILEDOPT_HOME", str(tmp_path / "home"))
    import compiledopt.apps.finetune
    import compiledopt.bench
    import compiledopt.cli.meta_descent
    import compiledopt.export
    import compiledopt.export.verify
    import compiledopt.meta.launch
    from compiledopt.meta import MetaLoop

    def refuse(*args, **kwargs):
        pytest.fail("a bad invocation started its long work before refusing")

    monkeypatch.setattr(MetaLoop, "train", refuse)
    monkeypatch.setattr(compiledopt.meta.launch, "run_meta", refuse)
    monkeypatch.setattr(compiledopt.export, "export_shape_agnostic", refuse)
    monkeypatch.setattr(compiledopt.export.verify, "verify_artifact", refuse)
    monkeypatch.setattr(compiledopt.apps.finetune, "pretrain", refuse)
    monkeypatch.setattr(compiledopt.bench, "benchmark", refuse)
    monkeypatch.setattr(compiledopt.cli.meta_descent, "run_demo", refuse)


# (id, argv with {in} = the inputs folder, {out} = a folder that must not appear, {ro} = an
#  unwritable folder; argparse: whether argparse refuses it; what the message must contain)
CASES = [
    # -- convert: a file that is not a state_dict -------------------------------------------------
    (
        "convert-not-weights",
        ["convert", "{in}/random.bin", "--output", "{out}/a"],
        False,
        "random.bin",
    ),
    # -- train: numbers, conflicts, files ------------------------------------------------------
    ("train-horizon-not-multiple", ["train", *TINY, "--horizon", "5"], False, "--horizon: 5"),
    ("train-horizon-below-unroll", ["train", *TINY, "--unroll", "8"], False, "--unroll"),
    ("train-min-horizon-above", ["train", *PES, "--min-horizon", "8"], False, "--min-horizon"),
    ("train-unroll-above-horizon-es", ["train", *PES, "--unroll", "8"], False, "--unroll=8"),
    ("train-zero-steps", ["train", *TINY, "--meta-steps", "0"], True, "--meta-steps"),
    ("train-text-steps", ["train", *TINY, "--meta-steps", "two"], True, "'two'"),
    ("train-nan-lr", ["train", *TINY, "--inner-lr", "nan"], True, "--inner-lr"),
    ("train-inf-meta-lr", ["train", *TINY, "--meta-lr", "inf"], True, "--meta-lr"),
    ("train-negative-clip", ["train", *TINY, "--clip-norm", "-1"], True, "--clip-norm"),
    ("train-warmup-fraction", ["train", *PES, "--warmup-fraction", "2"], True, "--warmup"),
    ("train-huge-steps", ["train", *TINY, "--meta-steps", HUGE], True, "[1, 10,000,000]"),
    ("train-huge-eval-steps", ["train", *TINY, "--eval-steps", HUGE], True, "[1, 1,000,000]"),
    ("train-huge-horizon", ["train", *TINY, "--horizon", HUGE], True, "--horizon"),
    ("train-huge-tasks", ["train", *TINY, "--tasks-per-step", HUGE], True, "[1, 10,000]"),
    ("train-huge-eval-tasks", ["train", *TINY, "--eval-tasks", HUGE], True, "--eval-tasks"),
    ("train-negative-seed", ["train", *TINY, "--seed", "-1"], True, "--seed"),
    ("train-huge-seed", ["train", *TINY, "--seed", str(2**40)], True, str(2**40)),
    ("train-unknown-device", ["train", *TINY, "--device", "nope"], False, "--device 'nope'"),
    ("train-absent-device", ["train", *TINY, "--device", "cuda:99"], False, "--device cuda:99"),
    ("train-es-option-tbptt", ["train", *TINY, "--pairs", "2"], False, "--pairs 2"),
    ("train-zero-processes", ["train", *TINY, "--processes", "0"], True, "--processes"),
    ("train-bad-transform-kwargs", ["train", *TINY, "--transform-kwargs", '{"x": 1}'], False, "x"),
    ("train-kwargs-not-object", ["train", *TINY, "--family-kwargs", "[1]"], True, "[1]"),
    ("train-kwargs-not-json", ["train", *TINY, "--transform-kwargs", "{no"], True, "{no"),
    ("train-missing-config", ["train", *TINY, "--config", "{in}/none.json"], False, "none.json"),
    ("train-config-not-json", ["train", *TINY, "--config", "{in}/bad.json"], False, "bad.json"),
    ("train-config-binary", ["train", *TINY, "--config", "{in}/random.bin"], False, "random.bin"),
    ("train-config-a-list", ["train", *TINY, "--config", "{in}/list.json"], False, "list.json"),
    ("train-config-folder", ["train", *TINY, "--config", "{in}/folder"], False, "folder"),
    (
        "train-config-long-name",
        ["train", *TINY, "--config", "{in}/" + LONG],
        False,
        "--config {in}/" + LONG + ": File name too long",
    ),
    ("train-config-unknown-key", ["train", "--config", "{in}/unknown.json"], False, "bogus_key"),
    ("train-config-zero", ["train", "--config", "{in}/zero-steps.json"], False, "meta_steps"),
    ("train-config-text-seed", ["train", "--config", "{in}/text-seed.json"], False, '"x"'),
    ("train-config-kwargs", ["train", "--config", "{in}/list-kwargs.json"], False, "[1]"),
    (
        "train-config-huge",
        ["train", "--config", "{in}/huge-eval-steps.json"],
        False,
        f"eval_steps must be an integer in [1, 1,000,000], got {HUGE}",
    ),
    ("train-config-nan", ["train", "--config", "{in}/nan-lr.json"], False, "inner_lr"),
    ("train-output-folder", ["train", *TINY, "--output", "{in}/folder"], False, "is a directory"),
    (
        "train-output-under-file",
        ["train", *TINY, "--output", "{in}/object.json/x.pt"],
        False,
        "object.json",
    ),
    ("train-output-empty", ["train", *TINY, "--output", ""], False, "--output"),
    (
        "train-output-exists",
        ["train", *TINY, "--output", "{in}/object.json"],
        False,
        "--output {in}/object.json: exists (pass --resume to continue it, or --overwrite to "
        "replace it)",
    ),
    (
        "train-output-unwritable",
        ["train", *TINY, "--output", "{ro}/x/learned.pt"],
        False,
        "cannot write",
    ),
    ("train-resume-missing", ["train", *TINY, "--output", "{out}/x.pt", "--resume"], False, "x.pt"),
    (
        "train-resume-random",
        ["train", *TINY, "--output", "{in}/random.bin", "--resume"],
        False,
        "random.bin",
    ),
    (
        "train-resume-json",
        ["train", *TINY, "--output", "{in}/object.json", "--resume"],
        False,
        "object.json",
    ),
    (
        "train-resume-empty",
        ["train", *TINY, "--output", "{in}/empty.pt", "--resume"],
        False,
        "empty.pt",
    ),
    (
        "train-resume-other-estimator",
        ["train", *PES, "--output", "{in}/run.pt", "--resume"],
        False,
        "--estimator",
    ),
    (
        "train-resume-other-kwargs",
        [
            "train",
            *TINY,
            "--output",
            "{in}/run.pt",
            "--resume",
            "--transform-kwargs",
            '{"step_size": 0.5}',
        ],
        False,
        "transform_kwargs",
    ),
    (
        "train-allow-without-resume",
        ["train", *TINY, "--allow-changes", "meta_lr"],
        False,
        "--allow-changes",
    ),
    (
        "train-allow-unknown",
        ["train", *TINY, "--output", "{in}/run.pt", "--resume", "--allow-changes", "bogus"],
        False,
        "'bogus'",
    ),
    (
        "train-allow-fixed",
        ["train", *TINY, "--output", "{in}/run.pt", "--resume", "--allow-changes", "seed"],
        False,
        "seed",
    ),
    ("train-allow-empty", ["train", *TINY, "--allow-changes", ","], True, "needs at least one"),
    (
        "train-allow-twice",
        ["train", *TINY, "--output", "{in}/run.pt", "--resume", "--allow-changes", "seed,seed"],
        True,
        "--allow-changes: setting 'seed' repeated in 'seed,seed'",
    ),
    ("train-allow-es", ["train", *PES, "--allow-changes", "sigma"], False, "--allow-changes"),
    ("train-export-lr-alone", ["train", *TINY, "--export-lr", "0.1"], False, "--export-lr"),
    (
        "train-export-backend",
        ["train", *TINY, "--export", "{out}/a", "--export-backends", "nope"],
        False,
        "nope",
    ),
    (
        "train-export-no-backend",
        ["train", *TINY, "--export", "{out}/a", "--export-backends", ","],
        False,
        "--export-backends",
    ),
    (
        "train-export-holds-output",
        ["train", *TINY, "--output", "{out}/run/learned.pt", "--export", "{out}/run"],
        False,
        "--export {out}/run: holds the --output checkpoint {out}/run/learned.pt",
    ),
    ("train-export-to-file", ["train", *TINY, "--export", "{in}/object.json"], False, "--export"),
    (
        "train-export-to-folder",
        ["train", *TINY, "--export", "{in}/folder", "--overwrite"],
        False,
        "not an artifact",
    ),
    (
        "train-export-exists",
        ["train", *TINY, "--export", "{in}/artifact"],
        False,
        "--export {in}/artifact: exists (pass --overwrite to replace it)",
    ),
    # -- export --------------------------------------------------------------------------------
    (
        "export-ranks-text",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--ranks", "a,b"],
        True,
        "'a,b'",
    ),
    (
        "export-ranks-empty",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--ranks", ","],
        True,
        "--ranks",
    ),
    (
        "export-ranks-negative",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--ranks", "-1"],
        True,
        "-1",
    ),
    (
        "export-ranks-large",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--ranks", "9"],
        True,
        "9",
    ),
    (
        "export-ranks-twice",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--ranks", "1,1"],
        True,
        "1,1",
    ),
    (
        "export-no-backend",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--backends", ","],
        True,
        "--backends",
    ),
    (
        "export-unknown-backend",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--backends", "tflite"],
        True,
        "tflite",
    ),
    (
        "export-nan-lr",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--lr", "nan"],
        True,
        "--lr",
    ),
    (
        "export-training-list",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--training", "[1]"],
        True,
        "--training",
    ),
    (
        "export-training-lr",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--training", '{"lr": "abc"}'],
        False,
        "'abc'",
    ),
    ("export-missing", ["export", "{in}/none.pt", "--output", "{out}/a"], False, "none.pt"),
    (
        "export-random-bytes",
        ["export", "{in}/random.bin", "--output", "{out}/a"],
        False,
        "random.bin",
    ),
    (
        "export-json-file",
        ["export", "{in}/object.json", "--output", "{out}/a"],
        False,
        "object.json",
    ),
    ("export-empty-file", ["export", "{in}/empty.pt", "--output", "{out}/a"], False, "empty.pt"),
    ("export-not-a-dict", ["export", "{in}/list.pt", "--output", "{out}/a"], False, "list.pt"),
    ("export-no-weights", ["export", "{in}/bare.pt", "--output", "{out}/a"], False, "transform"),
    ("export-folder", ["export", "{in}/folder", "--output", "{out}/a"], False, "folder"),
    (
        "export-to-file",
        ["export", "{in}/run.pt", "--output", "{in}/object.json"],
        False,
        "object.json",
    ),
    ("export-exists", ["export", "{in}/run.pt", "--output", "{in}/folder"], False, "--overwrite"),
    (
        "export-overwrite-other",
        ["export", "{in}/run.pt", "--output", "{in}/folder", "--overwrite"],
        False,
        "not an artifact",
    ),
    (
        "export-overwrite-web-app",
        ["export", "{in}/run.pt", "--output", "{in}/webapp", "--overwrite"],
        False,
        "not an artifact",
    ),
    (
        "export-overwrite-annotated-artifact",
        ["export", "{in}/run.pt", "--output", "{in}/annotated", "--overwrite"],
        False,
        "notes.txt",
    ),
    ("export-unwritable", ["export", "{in}/run.pt", "--output", "{ro}/a"], False, "cannot write"),
    # -- inspect, verify -----------------------------------------------------------------------
    ("inspect-missing", ["inspect", "{out}/art"], False, "art"),
    ("inspect-file", ["inspect", "{in}/object.json"], False, "object.json"),
    ("inspect-no-manifest", ["inspect", "{in}/folder"], False, "manifest"),
    ("inspect-list-and-artifact", ["inspect", "--list", "coordinate-mlp"], False, "--list"),
    ("inspect-nothing", ["inspect"], False, "--list"),
    ("verify-missing", ["verify", "{out}/art"], False, "art"),
    ("verify-zero-steps", ["verify", "coordinate-mlp", "--steps", "0"], True, "--steps"),
    ("verify-nan-tolerance", ["verify", "coordinate-mlp", "--tolerance", "nan"], True, "nan"),
    ("verify-negative-seed", ["verify", "coordinate-mlp", "--seed", "-3"], True, "--seed"),
    # -- finetune, bench -----------------------------------------------------------------------
    ("finetune-missing", ["finetune", "{out}/art"], False, "art"),
    ("finetune-no-backend", ["finetune", "coordinate-mlp", "--backends", ","], False, "--backends"),
    (
        "finetune-unknown-backend",
        ["finetune", "coordinate-mlp", "--backends", "eager,nope"],
        False,
        "'nope'",
    ),
    ("finetune-huge-steps", ["finetune", "coordinate-mlp", "--steps", HUGE], True, "100,000"),
    ("finetune-inf-lr", ["finetune", "coordinate-mlp", "--lr", "inf"], True, "--lr"),
    ("finetune-negative-steps", ["finetune", "coordinate-mlp", "--steps", "-3"], True, "-3"),
    ("bench-missing", ["bench", "{out}/art"], False, "art"),
    ("bench-no-thread-count", ["bench", "coordinate-mlp", "--threads", ","], True, "--threads"),
    ("bench-too-many-threads", ["bench", "coordinate-mlp", "--threads", "100000"], True, "100000"),
    ("bench-no-backend", ["bench", "coordinate-mlp", "--backends", ","], True, "--backends"),
    ("bench-json-folder", ["bench", "coordinate-mlp", "--json", "{in}/folder"], False, "--json"),
    (
        "bench-json-unwritable",
        ["bench", "coordinate-mlp", "--json", "{ro}/r.json"],
        False,
        "--json",
    ),
    (
        "bench-json-exists",
        ["bench", "coordinate-mlp", "--json", "{in}/object.json"],
        False,
        "--json {in}/object.json: exists (pass --overwrite to replace it)",
    ),
    ("bench-unknown-model", ["bench", "coordinate-mlp", "--model", "resnet"], True, "resnet"),
    # -- demo, meta-descent, the command itself ------------------------------------------------
    (
        "demo-unknown-backend",
        ["demo", "--workdir", "{out}/d", "--backends", "nope"],
        False,
        "'nope'",
    ),
    ("demo-no-backend", ["demo", "--workdir", "{out}/d", "--backends", ","], False, "--backends"),
    ("demo-workdir-file", ["demo", "--workdir", "{in}/object.json"], False, "--workdir"),
    ("demo-workdir-unwritable", ["demo", "--workdir", "{ro}/d"], False, "--workdir"),
    (
        "demo-zero-steps",
        ["demo", "--workdir", "{out}/d", "--meta-steps", "0"],
        True,
        "--meta-steps",
    ),
    ("demo-huge-steps", ["demo", "--meta-steps", HUGE], True, "[1, 10,000,000]"),
    ("demo-huge-finetune", ["demo", "--finetune-steps", HUGE], True, "[1, 100,000]"),
    (
        "demo-earlier-run",
        ["demo", "--workdir", "{in}/earlier-demo"],
        False,
        "--workdir {in}/earlier-demo/checkpoint.pt: exists (pass --overwrite to replace it)",
    ),
    (
        "demo-overwrite-not-an-artifact",
        ["demo", "--workdir", "{in}/earlier-demo", "--overwrite"],
        False,
        "--workdir {in}/earlier-demo/artifact: exists and is not an artifact directory",
    ),
    ("demo-text-seed", ["demo", "--workdir", "{out}/d", "--seed", "x"], True, "--seed"),
    ("meta-descent-zero-steps", ["meta-descent", "--steps", "0"], True, "--steps"),
    ("meta-descent-negative-seed", ["meta-descent", "--seed", "-5"], True, "-5"),
    ("meta-descent-transform", ["meta-descent", "--transform", "adam"], True, "adam"),
    ("unknown-command", ["fly"], True, "fly"),
    # -- a name longer than the file system allows: refused before any work ---------------------
    *[
        (f"{argv[0]}-{argv[-2][2:]}-long-name", argv, False, "a name 300 bytes long, above the")
        for argv in (
            ["train", *TINY, "--output", "{out}/" + LONG],
            ["train", *TINY, "--export", "{out}/" + LONG],
            ["export", "{in}/run.pt", "--output", "{out}/" + LONG],
            ["convert", "{in}/random.bin", "--output", "{out}/" + LONG],
            ["bench", "coordinate-mlp", "--json", "{out}/" + LONG],
            ["keygen", "--private", "{out}/k.pem", "--public", "{out}/" + LONG],
            ["demo", "--workdir", "{out}/" + LONG + "/d"],
        )
    ],
    # -- trust: keys, signatures, code graphs --------------------------------------------------
    (
        "keygen-exists",
        ["keygen", "--private", "{in}/object.json", "--public", "{out}/p.pem"],
        False,
        "--private",
    ),
    (
        "keygen-same-file",
        ["keygen", "--private", "{out}/k.pem", "--public", "{out}/k.pem"],
        False,
        "--public",
    ),
    (
        "keygen-unwritable",
        ["keygen", "--private", "{ro}/k.pem", "--public", "{out}/p.pem"],
        False,
        "--private",
    ),
    ("keygen-no-public", ["keygen", "--private", "{out}/k.pem"], True, "--public"),
    ("sign-missing", ["sign", "{out}/art", "--key", "{in}/private.pem"], False, "art"),
    (
        "sign-packaged-name",
        ["sign", "coordinate-mlp", "--key", "{in}/private.pem"],
        False,
        "coordinate-mlp",
    ),
    (
        "sign-not-an-artifact",
        ["sign", "{in}/folder", "--key", "{in}/private.pem"],
        False,
        "manifest",
    ),
    ("sign-key-missing", ["sign", "{in}/artifact", "--key", "{in}/none.pem"], False, "--key"),
    ("sign-key-random", ["sign", "{in}/artifact", "--key", "{in}/random.bin"], False, "--key"),
    ("sign-key-public", ["sign", "{in}/artifact", "--key", "{in}/public.pem"], False, "--key"),
    ("sign-no-key", ["sign", "{in}/artifact"], True, "--key"),
    (
        "sign-signed-already",
        ["sign", "{in}/signed", "--key", "{in}/other-private.pem"],
        False,
        "{in}/signed: signed already (signature.json exists; pass --overwrite to replace it)",
    ),
    (
        "export-sign-key-missing",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--sign-key", "{in}/none.pem"],
        False,
        "--sign-key",
    ),
    (
        "export-sign-key-long-name",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--sign-key", "{in}/" + LONG],
        False,
        "--sign-key {in}/" + LONG + ": a name 300 bytes long, above the",
    ),
    (
        "export-sign-key-random",
        ["export", "{in}/run.pt", "--output", "{out}/a", "--sign-key", "{in}/random.bin"],
        False,
        "--sign-key",
    ),
    (
        "verify-key-missing",
        ["verify", "{in}/signed", "--trusted-key", "{in}/none.pem"],
        False,
        "--trusted-key",
    ),
    (
        "verify-key-random",
        ["verify", "{in}/signed", "--trusted-key", "{in}/random.bin"],
        False,
        "--trusted-key",
    ),
    (
        "verify-key-private",
        ["verify", "{in}/signed", "--trusted-key", "{in}/private.pem"],
        False,
        "--trusted-key",
    ),
    (
        "verify-unsigned",
        ["verify", "{in}/artifact", "--trusted-key", "{in}/public.pem"],
        False,
        "not signed",
    ),
    (
        "verify-other-key",
        ["verify", "{in}/signed", "--trusted-key", "{in}/other-public.pem"],
        False,
        "not among the trusted keys",
    ),
    (
        "finetune-untrusted-code",
        ["finetune", "{in}/artifact", "--backends", "torchscript"],
        False,
        "--trust-code",
    ),
    (
        "bench-untrusted-code",
        ["bench", "{in}/artifact", "--backends", "eager,torchscript"],
        False,
        "--trust-code",
    ),
    (
        "bench-untrusted-signed",
        ["bench", "{in}/signed", "--backends", "torchscript"],
        False,
        "--trusted-key",
    ),
]


def _fill(arg, places):
    for name, value in places.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def _invoke(argv, capsys):
    """``main(argv)``: (status, whether argparse refused it, stderr)."""
    try:
        status, parsed = main(argv), True
    except SystemExit as exit_info:
        status, parsed = exit_info.code, False
    return status, not parsed, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, by_argparse, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_invocation(argv, by_argparse, needle, files, no_long_work, tmp_path, request, capsys):
    out = tmp_path / "out"
    places = {"in": str(files), "out": str(out)}
    if any("{ro}" in a for a in argv):
        places["ro"] = request.getfixturevalue("unwritable")
    argv, needle = [_fill(a, places) for a in argv], _fill(needle, places)
    before, kept = sorted(os.listdir(files)), _kept(files)
    status, by_parser, err = _invoke(argv, capsys)
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert by_parser == by_argparse, err
    if by_argparse:
        assert lines[-1].startswith(f"compiledopt {argv[0]}: error: ") or argv[0] == "fly", err
        assert needle in lines[-1], err
    else:
        assert len(lines) == 1, err
        assert lines[0].startswith(f"compiledopt {argv[0]}: "), err
        assert needle in lines[0], err
    assert not out.exists(), "a refused invocation wrote its output"
    assert os.listdir(tmp_path / "cwd") == [], "a refused invocation wrote in the cwd"
    assert not (tmp_path / "home").exists(), "a refused invocation wrote a default output"
    assert sorted(os.listdir(files)) == before, "a refused invocation wrote next to its inputs"
    assert (files / "folder" / "keep.txt").read_text() == "not an artifact"
    assert _kept(files) == kept, "a refused invocation changed a folder that is not an artifact"


def test_the_table_covers_every_command():
    assert {case[1][0] for case in CASES} >= set(cli.COMMANDS)
    assert len(CASES) >= 35


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--backends", "nope", "--no-progress"],
        ["train", *TINY, "--output", "{ro}/learned.pt"],
    ],
    ids=["demo-unknown-backend", "train-unwritable-output"],
)
def test_refused_within_seconds(argv, unwritable, no_long_work, tmp_path, capsys):
    argv = [_fill(a, {"ro": unwritable}) for a in argv]
    start = time.perf_counter()
    status, _, err = _invoke(argv, capsys)
    assert status == 2 and "Traceback" not in err
    assert time.perf_counter() - start < 5
    assert os.listdir(tmp_path / "cwd") == []
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("bad", ["file", "under-a-file", "unwritable"])
def test_a_bad_output_root_is_refused_in_one_line(
    bad, no_long_work, tmp_path, request, monkeypatch, capsys
):
    # COMPILEDOPT_HOME must name a folder that can be written: refused before any work
    (tmp_path / "a-file").write_text("not a folder")
    home = {
        "file": lambda: str(tmp_path / "a-file"),
        "under-a-file": lambda: str(tmp_path / "a-file" / "deeper"),
        "unwritable": lambda: request.getfixturevalue("unwritable"),
    }[bad]()
    monkeypatch.setenv("COMPILEDOPT_HOME", home)
    start = time.perf_counter()
    status, by_parser, err = _invoke(["demo", "--no-progress"], capsys)
    assert (status, by_parser) == (2, False)
    assert time.perf_counter() - start < 5
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("compiledopt demo: "), err
    assert f"COMPILEDOPT_HOME={home}" in lines[0] and "--workdir" in lines[0], err
    expected = "is a file, not a directory" if bad != "unwritable" else "cannot write to"
    assert expected in lines[0], err
    assert (tmp_path / "a-file").read_text() == "not a folder"
    assert os.listdir(tmp_path / "cwd") == []


def test_a_config_file_is_checked_like_the_command_line(no_long_work, tmp_path, capsys):
    config = tmp_path / "config-seed.json"
    config.write_text(json.dumps({"seed": 2**40}))
    status, by_parser, err = _invoke(["train", "--config", str(config)], capsys)
    assert (status, by_parser) == (2, False)
    assert f"seed must be an integer in [0, 2**31), got {2**40}" in err


# -- trust flags: what they let load --------------------------------------------------------------


def test_keygen_writes_a_key_pair(tmp_path, capsys):
    private, public = tmp_path / "keys" / "id.pem", tmp_path / "keys" / "id.pub.pem"
    assert main(["keygen", "--private", str(private), "--public", str(public)]) == 0
    fingerprint = signing.fingerprint(signing.load_public_key(public))
    assert f"key fingerprint {fingerprint}" in capsys.readouterr().out
    assert private.stat().st_mode & 0o777 == 0o600
    assert main(["keygen", "--private", str(private), "--public", str(tmp_path / "b")]) == 2
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def _verify(argv, capsys):
    """``compiledopt verify``: its status and each backend's result (``ok`` or ``not run``)."""
    status = main(["verify", *argv, "--steps", "2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    return status, {row[0]: "not run" if row[1] == "-" else row[2] for row in rows}


def test_code_graphs_run_only_from_a_trusted_artifact(files, capsys):
    artifact, signed, key = files / "artifact", files / "signed", files / "public.pem"
    ran = {"torchscript": "ok", "onnx": "ok"}
    assert _verify([str(artifact)], capsys) == (0, {"torchscript": "not run", "onnx": "ok"})
    assert _verify([str(artifact), "--trust-code"], capsys) == (0, ran)
    assert _verify([str(signed)], capsys) == (0, {"torchscript": "not run", "onnx": "ok"})
    assert _verify([str(signed), "--trusted-key", str(key)], capsys) == (0, ran)


def test_export_sign_key_signs_the_artifact(files):
    key = signing.fingerprint(signing.load_public_key(files / "public.pem"))
    artifact = load_artifact(files / "signed", trusted_keys=[files / "public.pem"])
    assert artifact.signed_by == key and artifact.may_load("torchscript")
    assert not (files / "artifact" / "signature.json").exists()


def test_sign_signs_an_artifact_and_refuses_a_modified_one(files, tmp_path, capsys):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(files / "artifact", copy)
    assert main(["sign", str(copy), "--key", str(files / "other-private.pem")]) == 0
    trusted = load_artifact(copy, trusted_keys=[files / "other-public.pem"])
    assert trusted.may_load("torchscript")
    signature = (copy / "signature.json").read_bytes()
    line = one_line(
        main(["sign", str(copy), "--key", str(files / "private.pem")]),
        capsys.readouterr().err,
        "sign",
    )
    assert line.endswith("signed already (signature.json exists; pass --overwrite to replace it)")
    assert (copy / "signature.json").read_bytes() == signature
    assert main(["sign", str(copy), "--key", str(files / "private.pem"), "--overwrite"]) == 0
    assert load_artifact(copy, trusted_keys=[files / "public.pem"]).may_load("torchscript")
    capsys.readouterr()
    tampered = tmp_path / "tampered"
    shutil.copytree(files / "artifact", tampered)
    (tampered / "rule.pt").write_bytes((tampered / "rule.pt").read_bytes() + b"x")
    assert main(["sign", str(tampered), "--key", str(files / "private.pem")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "rule.pt" in err
    assert not (tampered / "signature.json").exists()


@pytest.mark.parametrize("command", ["finetune", "bench"])
def test_finetune_and_bench_load_with_the_trust_given(command, files, monkeypatch):
    import compiledopt.bench
    import compiledopt.cli.finetune

    seen = []
    if command == "finetune":
        target, name = compiledopt.cli.finetune, "run_finetune"
    else:
        target, name = compiledopt.bench, "benchmark"
    monkeypatch.setattr(target, name, lambda artifact, *a, **k: seen.append(artifact))
    argv = [command, str(files / "signed"), "--backends", "torchscript"]
    assert main([*argv, "--trusted-key", str(files / "public.pem")]) == 0
    assert main([command, str(files / "artifact"), "--trust-code"]) == 0
    signed, vouched = seen
    assert signed.signed_by is not None and signed.may_load("torchscript")
    assert vouched.code_trusted and vouched.signed_by is None


def test_bench_replaces_its_json_only_with_overwrite(files, tmp_path, monkeypatch, capsys):
    import compiledopt.bench

    class Result:
        def to_dict(self):
            return {"rows": []}

    monkeypatch.setattr(compiledopt.bench, "benchmark", lambda *args, **kwargs: Result())
    path = tmp_path / "result.json"
    path.write_text("mine")
    argv = ["bench", str(files / "artifact"), "--backends", "onnx", "--json", str(path)]
    line = one_line(main(argv), capsys.readouterr().err, "bench")
    assert line.endswith(f"--json {path}: exists (pass --overwrite to replace it)")
    assert path.read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(path.read_text()) == {"rows": []}


class ReachedMetaTrainingError(Exception):
    """Raised in place of the demo's meta-training: its checks all passed."""


def _earlier_demo_run(files, workdir, monkeypatch):
    """``workdir`` holding an earlier demo run's checkpoint and artifact, and the demo stopped
    with :class:`ReachedMetaTrainingError` where its work would begin."""
    from compiledopt.meta import MetaLoop

    def reached(*args, **kwargs):
        raise ReachedMetaTrainingError

    monkeypatch.setattr(MetaLoop, "train", reached)
    workdir.mkdir(parents=True)
    (workdir / "checkpoint.pt").write_bytes(b"an earlier run's")
    shutil.copytree(files / "artifact", workdir / "artifact")


def test_demo_overwrite_replaces_an_earlier_run(files, tmp_path, monkeypatch):
    _earlier_demo_run(files, tmp_path / "demo", monkeypatch)
    with pytest.raises(ReachedMetaTrainingError):  # checked, then meta-training started
        main(["demo", "--workdir", str(tmp_path / "demo"), "--overwrite", "--no-progress"])


def test_demo_replaces_an_earlier_run_in_its_default_folder(files, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEDOPT_HOME", str(tmp_path / "home"))
    # The default --workdir under that root.
    _earlier_demo_run(files, tmp_path / "home" / "demo", monkeypatch)
    with pytest.raises(ReachedMetaTrainingError):  # the README's command runs again as it is
        main(["demo", "--no-progress"])


def test_bench_writes_its_json_in_a_folder_it_creates_and_whole(files, tmp_path, monkeypatch):
    import compiledopt.apps.bench
    import compiledopt.bench

    class Result:
        def to_dict(self):
            return {"rows": []}

    monkeypatch.setattr(compiledopt.bench, "benchmark", lambda *args, **kwargs: Result())
    path = tmp_path / "new" / "deeper" / "result.json"  # accepted by the check: can be created
    argv = ["bench", str(files / "artifact"), "--backends", "onnx", "--json", str(path)]
    assert main(argv) == 0  # it was written after the timing into a folder never created
    assert json.loads(path.read_text()) == {"rows": []}

    pytest.importorskip("matplotlib")  # --plot needs it

    def fail(result, model, target):
        target.write_bytes(b"half a pic")
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(compiledopt.apps.bench, "plot", fail)
    plot = tmp_path / "new" / "plot.png"
    plot.write_bytes(b"an earlier plot")
    assert main([*argv, "--overwrite", "--plot", str(plot)]) == 2
    assert plot.read_bytes() == b"an earlier plot"
    assert sorted(p.name for p in plot.parent.iterdir()) == ["deeper", "plot.png"]


def test_finetune_runs_by_default_the_backends_the_artifact_may_load(files):
    from compiledopt.apps.backends import default_backends

    untrusted = load_artifact(files / "artifact")
    assert default_backends(untrusted) == ["eager", "compiled", "onnx"]
    assert default_backends(untrusted.trusting()) == ["eager", "compiled", "torchscript", "onnx"]


@pytest.mark.parametrize("prefix", [b"", b"\x80\x02", b"PK\x03\x04"], ids=["raw", "pickle", "zip"])
def test_any_bytes_are_refused_as_a_checkpoint_with_one_error(tmp_path, prefix):
    """Whatever a file holds, loading it as a checkpoint gives the one ValueError the CLI turns
    into a line and exit 2: torch's weights-only unpickler raises assorted errors on garbage."""
    generator = random.Random(1)
    path = tmp_path / "junk.pt"
    for _ in range(150):
        path.write_bytes(prefix + generator.randbytes(generator.randrange(1, 400)))
        with pytest.raises(ValueError, match="not a checkpoint written by `compiledopt train`"):
            load_checkpoint(str(path), "--resume")
