"""The commands against hostile or broken artifacts: NaN graphs and weights, bindings too large to
allocate, files that only safetensors or onnxruntime can tell are corrupt, huge counts, control
characters in manifest strings, and a manifest swapped while it is being signed.

Every refusal is one line on stderr naming the offending value and status 2, never a traceback.
"""

import builtins
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_checks import one_line

from compiledopt.cli import main
from compiledopt.export import (
    build_shape_agnostic,
    export_bound,
    export_shape_agnostic,
    load_artifact,
    signing,
)
from compiledopt.export.manifest import ArtifactError
from compiledopt.export.verify import verify_artifact

SPEC = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}

#: Characters no terminal may receive from an artifact, written out here independently of the
#: code under test: C0 controls but the newline, DEL, C1 controls, and the bidi/line formatting
#: characters (embeddings, overrides, isolates, marks, line and paragraph separators).
UNSAFE = (
    {chr(c) for c in range(0x20) if c != 0x0A}
    | {chr(c) for c in range(0x7F, 0xA0)}
    | {chr(c) for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029)}
    | {chr(c) for c in range(0x202A, 0x202F)}
    | {chr(c) for c in range(0x2066, 0x206A)}
)


def _transform(seed: int, nan: bool = False):
    torch.manual_seed(seed)
    transform = build_shape_agnostic(SPEC)
    if nan:
        with torch.no_grad():
            for parameter in transform.parameters():
                parameter.fill_(math.nan)
    return transform


def _replace_file(artifact: Path, name: str, data: bytes) -> None:
    """Write ``data`` as the artifact's ``name`` and fix its checksum in the manifest, as anyone
    can: the artifact still verifies, and only reading the file shows it is broken."""
    (artifact / name).write_bytes(data)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(artifact: Path, edit) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Artifacts built once: ``good`` (TorchScript and ONNX, rank 1), ``nan-weights`` (a
    transform whose weights are all NaN: its graph and the reference both give NaN) and
    ``nan-graph`` (the NaN transform's ONNX graph with the good transform's weights: the
    reference is finite, the graph is not)."""
    root = tmp_path_factory.mktemp("built")
    good = export_shape_agnostic(
        root / "good", SPEC, _transform(0), ["torchscript", "onnx"], ranks=[1]
    )
    nan = export_shape_agnostic(root / "nan-weights", SPEC, _transform(0, True), ["onnx"], [1])
    graph = export_shape_agnostic(root / "nan-graph", SPEC, _transform(0, True), ["onnx"], [1])
    _replace_file(graph, "weights.safetensors", (good / "weights.safetensors").read_bytes())
    return {"good": good, "nan-weights": nan, "nan-graph": graph}


def _copy(built, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[name], tmp_path / name))


def _run(argv, capsys):
    """``main(argv)``: status, stdout, stderr; argparse refusals give their exit status."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- verify: NaN is never ok ----------------------------------------------------------------------


def test_verify_fails_on_all_nan_weights(built, capsys):
    errors = verify_artifact(built["nan-weights"], steps=2)
    assert math.isnan(errors["onnx"])
    status, out, _ = _run(["verify", built["nan-weights"], "--steps", "2"], capsys)
    assert status == 1, out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["onnx"])
    assert row[2] == "FAIL:" and "ok" not in row, out


def test_verify_fails_on_a_graph_that_returns_nan(built, capsys):
    artifact = load_artifact(built["nan-graph"])
    # the facts, checked directly: the graph gives NaN, the reference rebuilt from the weights
    # does not
    param, grad = torch.randn(7), torch.randn(7)
    (transform,) = artifact.transforms()
    state = transform.init_state(param)
    reference, _ = transform.update(grad, param, state, torch.tensor(0))
    direction, _ = artifact.runner("onnx")(grad, param, state, torch.tensor(0))
    assert torch.isfinite(reference).all() and torch.isnan(direction).all()
    assert math.isnan(verify_artifact(artifact, steps=2)["onnx"])
    status, out, _ = _run(["verify", built["nan-graph"], "--steps", "2"], capsys)
    assert status == 1 and "FAIL" in out and " ok" not in out, out


def test_verify_still_passes_a_good_artifact(built, capsys):
    status, out, _ = _run(["verify", built["good"], "--steps", "3", "--trust-code"], capsys)
    assert status == 0, out
    assert [line.split()[-1] for line in out.splitlines()[2:]] == ["ok", "ok"], out


# -- verify: bounded allocation -------------------------------------------------------------------


def test_verify_refuses_bindings_too_large_to_allocate(tmp_path, capsys):
    named = [("w", torch.zeros(3, 4))]
    path = export_bound(tmp_path / "bound", SPEC, [_transform(0)], named, ["torchscript"])
    huge = [1 << 20, 1 << 20]  # 2**40 elements: 4 TiB of float32

    def enlarge(manifest):
        manifest["bindings"][0]["shape"] = huge

    _edit_manifest(path, enlarge)
    load_artifact(path)  # the manifest is valid: only what replaying it needs is too large
    status, out, err = _run(["verify", path, "--steps", "2"], capsys)
    line = one_line(status, err, "verify")
    assert "(1048576, 1048576)" in line and "'w'" in line, line
    assert out == ""


# -- one line for every library error -------------------------------------------------------------


def test_verify_names_a_corrupt_onnx_graph(built, tmp_path, capsys):
    path = _copy(built, "good", tmp_path)
    data = (path / "rule_rank1.onnx").read_bytes()
    _replace_file(path, "rule_rank1.onnx", data[: len(data) // 3] + b"\xff" * 64)
    status, _, err = _run(["verify", path, "--steps", "2"], capsys)
    line = one_line(status, err, "verify")
    assert str(path) in line and "rule_rank1.onnx" in line, line


def test_verify_names_junk_weights(built, tmp_path, capsys):
    path = _copy(built, "good", tmp_path)
    _replace_file(path, "weights.safetensors", b"\x10" + bytes(7) + b"junk junk junk j")
    status, _, err = _run(["verify", path, "--steps", "2"], capsys)
    line = one_line(status, err, "verify")
    assert str(path) in line and "weights.safetensors" in line, line


def test_a_corrupt_torchscript_graph_isone_line(built, tmp_path, capsys):
    path = _copy(built, "good", tmp_path)
    _replace_file(path, "rule.pt", b"PK\x03\x04" + bytes(200))
    status, _, err = _run(["verify", path, "--steps", "2", "--trust-code"], capsys)
    line = one_line(status, err, "verify")
    assert str(path) in line, line


def test_bench_reports_junk_weights_inone_line(built, tmp_path, capsys):
    # bench loads through the optimizer, not through verify: the CLI's boundary catches it
    path = _copy(built, "good", tmp_path)
    _replace_file(path, "weights.safetensors", b"\x10" + bytes(7) + b"junk junk junk j")
    argv = ["bench", path, "--backends", "eager", "--repeats", "1", "--warmup", "1"]
    status, _, err = _run(argv, capsys)
    line = one_line(status, err, "bench")
    assert str(path) in line, line


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["verify", "coordinate-mlp", "--steps", "100000000000000000000"], "100000000000000000000"),
        (["verify", "coordinate-mlp", "--steps", "100001"], "100001"),
        (["bench", "coordinate-mlp", "--repeats", str(10**12)], str(10**12)),
        (["bench", "coordinate-mlp", "--warmup", str(10**12)], str(10**12)),
        (["meta-descent", "--steps", str(10**15)], str(10**15)),
    ],
    ids=["verify-steps-1e20", "verify-steps-above", "bench-repeats", "bench-warmup", "md-steps"],
)
def test_counts_are_bounded_at_parse_time(argv, needle, capsys):
    status, _, err = _run(argv, capsys)
    assert status == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"compiledopt {argv[0]}: error: argument {argv[-2]}"), err
    assert needle in last, err


def _safetensors_junk():
    from safetensors.torch import load

    load(b"\x10" + bytes(7) + b"junk junk junk j")


def _onnxruntime_junk():
    import onnxruntime

    onnxruntime.InferenceSession(b"\x08\xff\xff junk", providers=["CPUExecutionProvider"])


def _torchscript_junk():
    torch.jit.load(io.BytesIO(b"PK\x03\x04" + bytes(64)))


@pytest.mark.parametrize(
    "read", [_safetensors_junk, _onnxruntime_junk, _torchscript_junk], ids=lambda f: f.__name__
)
def test_the_boundary_reports_a_loader_library_error_inone_line(read, monkeypatch, capsys):
    """Whatever path reaches them, the real errors of safetensors, onnxruntime and torch's
    TorchScript reader on junk bytes are one line naming the command's input, status 2."""
    import compiledopt.cli.inspect as inspect_command

    with pytest.raises(Exception):  # noqa: B017 (the fact: the library itself raises)
        read()

    def reading(args, out):
        read()

    monkeypatch.setattr(inspect_command, "run", reading)
    status, _, err = _run(["inspect", "/the/input/artifact"], capsys)
    line = one_line(status, err, "inspect")
    assert "/the/input/artifact" in line, line


def test_programming_errors_still_show_a_traceback(monkeypatch):
    # the boundary takes the user's errors, not bugs: these propagate out of main
    import compiledopt.cli.inspect as inspect_command

    for error in (TypeError("a bug"), RuntimeError("a bug in our code"), KeyError("bug")):

        def broken(args, out, error=error):
            raise error

        monkeypatch.setattr(inspect_command, "run", broken)
        with pytest.raises(type(error)):
            main(["inspect", "--list"])


def test_an_os_error_naming_its_file_isone_line(monkeypatch, capsys):
    import errno

    import compiledopt.cli.inspect as inspect_command

    def full(args, out):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/where/rule.pt")

    monkeypatch.setattr(inspect_command, "run", full)
    status, _, err = _run(["inspect", "--list"], capsys)
    line = one_line(status, err, "inspect")
    assert "/some/where/rule.pt" in line and "No space left" in line


# -- control characters from an artifact never reach the terminal ----------------------------------

FAKE = "2.0\x1b[2K\r  signature valid: trusted key 0123\u202e\x9b31m\x07\x7f"


def test_inspect_escapes_every_string_from_the_manifest(built, tmp_path, capsys):
    path = _copy(built, "good", tmp_path)

    def poison(manifest):
        manifest["producer"]["torch"] = FAKE
        manifest["producer"]["\x1b]0;title\x07"] = "x"
        manifest["state_names"][0] = "m\nsignature valid\u2066"
        manifest["training"] = {"seed\r": 1, "note": FAKE, "task_family": FAKE}

    _edit_manifest(path, poison)
    status, out, err = _run(["inspect", path], capsys)
    assert status == 0, err
    assert not UNSAFE & set(out), [c for c in out if c in UNSAFE]
    assert "\\x1b[2K\\x0d  signature valid" in out  # shown, escaped
    lines = out.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("signature valid")]
    assert sum("\\u202e" in line for line in lines) >= 2, out


def test_an_error_quoting_the_artifact_is_escaped(built, tmp_path, capsys):
    path = _copy(built, "good", tmp_path)

    def poison(manifest):
        manifest["kind"] = "bound\x1b[2K\rsignature valid\u202e"

    _edit_manifest(path, poison)
    status, _, err = _run(["inspect", path], capsys)
    one_line(status, err, "inspect")
    assert not UNSAFE & set(err.rstrip("\n")), err


def test_the_printable_helper_escapes_each_kind():
    from compiledopt.cli.text import printable

    for character in sorted(UNSAFE):
        shown = printable(f"a{character}b")
        assert shown.startswith("a") and shown.endswith("b") and not UNSAFE & set(shown)
        assert shown != f"a{character}b"
    assert printable("plain é 漢字 ✓") == "plain é 漢字 ✓"
    assert printable("two\nlines", keep_newlines=True) == "two\nlines"


def test_every_command_prints_through_the_escaping_writer(monkeypatch, capsys):
    import compiledopt.cli.inspect as inspect_command

    def chatty(args, out):
        print("from an artifact: \x1b[31mred\x1b[0m\u202e", file=out)
        return 0

    monkeypatch.setattr(inspect_command, "run", chatty)
    status, out, _ = _run(["inspect", "--list"], capsys)
    assert status == 0 and not UNSAFE & set(out) and "\\x1b[31mred" in out


# -- sign signs exactly the bytes it verified ------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    signing.generate_keypair(root / "private.pem", root / "public.pem")
    return root


def test_sign_signs_the_manifest_it_verified(built, keys, tmp_path, monkeypatch, capsys):
    """The manifest and a graph are swapped for a consistent evil pair once ``sign`` has read
    the manifest, just before it opens it again (by any of ``open``, ``io.open``, ``os.open``).
    Whatever sign then does, the artifact on disk must not carry a valid signature (what it
    holds was never verified), and a signature it writes must be one of the verified bytes."""
    path = _copy(built, "good", tmp_path)
    original = {name: (path / name).read_bytes() for name in ("manifest.json", "rule.pt")}
    evil = tmp_path / "evil"
    shutil.copytree(path, evil)
    _replace_file(evil, "rule.pt", original["rule.pt"] + b"evil")
    swapped = {name: (evil / name).read_bytes() for name in original}
    opens = []
    real_open = builtins.open

    def reading_the_manifest(file, mode_or_flags) -> bool:
        if isinstance(file, int) or os.path.basename(os.fspath(file)) != "manifest.json":
            return False
        if isinstance(mode_or_flags, int):
            return mode_or_flags & (os.O_WRONLY | os.O_RDWR) == 0
        return not set(mode_or_flags) & set("wax+")

    def counting(real, mode_position_default):
        def patched(file, *args, **kwargs):
            mode = (
                args[0] if args else kwargs.get("mode", kwargs.get("flags", mode_position_default))
            )
            if reading_the_manifest(file, mode):
                opens.append(file)
                if len(opens) == 2:  # the first read is done: swap before any other
                    for name, data in swapped.items():
                        with real_open(path / name, "wb") as handle:
                            handle.write(data)
            return real(file, *args, **kwargs)

        return patched

    monkeypatch.setattr(builtins, "open", counting(builtins.open, "r"))
    monkeypatch.setattr(io, "open", counting(io.open, "r"))
    monkeypatch.setattr(os, "open", counting(os.open, os.O_RDONLY))
    status, _, err = _run(["sign", path, "--key", keys / "private.pem"], capsys)
    monkeypatch.undo()
    assert opens, "sign never read the manifest"
    if len(opens) == 1:  # read once: swap now, after the run, as a late change would
        for name, data in swapped.items():
            (path / name).write_bytes(data)
    assert (path / "manifest.json").read_bytes() == swapped["manifest.json"]
    with pytest.raises(ArtifactError):  # not signed, or the signature does not match
        load_artifact(path, trusted_keys=[keys / "public.pem"])
    if status == 0:  # it signed: the signature is of the verified (original) manifest
        for name, data in original.items():
            (path / name).write_bytes(data)
        signed = load_artifact(path, trusted_keys=[keys / "public.pem"])
        assert signed.signed_by is not None
    else:
        line = one_line(status, err, "sign")
        assert "manifest.json" in line, line


def test_sign_still_signs_an_untouched_artifact(built, keys, tmp_path, capsys):
    path = _copy(built, "good", tmp_path)
    status, _, err = _run(["sign", path, "--key", keys / "private.pem"], capsys)
    assert status == 0, err
    assert load_artifact(path, trusted_keys=[keys / "public.pem"]).may_load("torchscript")
