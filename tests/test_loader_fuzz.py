"""Fuzzing the artifact loader: whatever an artifact folder holds (files of any kind and size, a
manifest of any shape, ONNX graphs pointing at other files), loading it either succeeds or raises
ArtifactError / ValueError; it never reads outside the folder, never holds more memory than its
caps allow, and never hangs.

Each example edits a fresh copy of a packaged artifact inside a folder that also holds canary
files (beside the artifact and in the working directory). Python-level opens are recorded with an
audit hook: none may reach a canary, ``/dev/zero`` or anything else outside the artifact. The
load runs under an alarm (a blocking open is interrupted) and an address-space cap."""

import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loader_hardening import GRAPH, _bounded, _copy_packaged, _external, _rehash

from compiledopt.export import ArtifactError, load_artifact
from compiledopt.export import artifact as artifact_module

CANARY = "canary-7f3a9c: the loader must never read this"
LISTED = [
    "manifest.json",
    "weights.safetensors",
    "rule.pt",
    "rule_rank0.onnx",
    "rule_rank1.onnx",
    "rule_rank2.onnx",
]
FUZZ = settings(
    max_examples=25,
    deadline=None,  # each example is bounded by its own alarm (_bounded)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # CI runs the same examples every time
)

_opened = []  # paths opened while a load is recorded (the audit hook is permanent)
_recording = [False]


def _audit(event, args):
    if _recording[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A copy of the packaged artifact, and one load of it (imports, lazy modules) done."""
    path = _copy_packaged(tmp_path_factory.mktemp("pristine") / "artifact")
    _load(path)
    return path


def _load(path: Path) -> None:
    loaded = load_artifact(path)
    transform = loaded.transforms()[0]
    param = torch.randn(5)
    runner = loaded.runner("onnx")
    runner(torch.randn(5), param, transform.init_state(param), torch.tensor(0))


class _Case:
    """A fresh folder: ``root/artifact`` (a copy of the pristine artifact), canary files in
    ``root`` and ``root/cwd`` (the working directory while the case runs)."""

    def __init__(self, pristine: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="loader-fuzz-"))
        self.artifact = self.root / "artifact"
        shutil.copytree(pristine, self.artifact)
        self.cwd = self.root / "cwd"
        self.cwd.mkdir()
        self.canaries = [self.root / "canary.txt", self.cwd / "canary.txt"]
        for canary in self.canaries:
            canary.write_text(CANARY)

    def run(self):
        """Load the artifact; return the exception it raised (None if it loaded), after checking
        the invariants."""
        previous = os.getcwd()
        os.chdir(self.cwd)
        _opened.clear()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcome = None
        try:
            with _bounded(seconds=15, extra_memory=3 << 30):
                _recording[0] = True
                try:
                    _load(self.artifact)
                except (ArtifactError, ValueError) as error:
                    outcome = error
                finally:
                    _recording[0] = False
        finally:
            os.chdir(previous)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss  # kB on Linux
        assert grown < 512 * 1024, f"the load grew the peak RSS by {grown} kB"
        inside = os.path.realpath(self.artifact) + os.sep
        for path in _opened:
            real = os.path.realpath(path)
            outside = real.startswith(os.path.realpath(self.root) + os.sep) and not (
                real.startswith(inside)
            )
            assert not outside and real != "/dev/zero", f"opened {path} ({real})"
        assert outcome is None or CANARY not in str(outcome)
        return outcome

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- file kinds and sizes -----------------------------------------------------------------------

KINDS = ["symlink_outside", "symlink_dev_zero", "fifo", "directory", "empty", "truncated", "huge"]
NOT_REGULAR = {
    "symlink_outside": "is a symbolic link",
    "symlink_dev_zero": "is a symbolic link",
    "fifo": "is a FIFO",
    "directory": "is a directory",
}


@FUZZ
@given(
    name=st.sampled_from(LISTED),
    kind=st.sampled_from(KINDS),
    keep=st.floats(0.0, 1.0),
    rehash=st.booleans(),
)
def test_any_file_kind_or_size_is_loaded_or_refused(pristine, name, kind, keep, rehash):
    case = _Case(pristine)
    try:
        file = case.artifact / name
        data = file.read_bytes()
        file.unlink()
        if kind == "symlink_outside":
            file.symlink_to(case.canaries[0])
        elif kind == "symlink_dev_zero":
            file.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(file)
        elif kind == "directory":
            file.mkdir()
        elif kind == "empty":
            file.write_bytes(b"")
        elif kind == "truncated":
            file.write_bytes(data[: int(len(data) * keep)])
        else:  # one byte over the cap: a sparse file, so nothing is written
            cap = artifact_module.MAX_MANIFEST_BYTES
            if name != "manifest.json":
                cap = artifact_module.MAX_FILE_BYTES
            with open(file, "wb") as handle:
                handle.truncate(cap + 1)
        if rehash and name != "manifest.json" and kind != "huge":
            _rehash(case.artifact)  # the symlinked canary's checksum too: only its kind refuses it
        outcome = case.run()
        if kind in NOT_REGULAR:
            assert isinstance(outcome, ArtifactError), outcome
            assert f"{name} {NOT_REGULAR[kind]}" in str(outcome)
        elif kind == "huge":
            assert isinstance(outcome, ArtifactError) and "over the limit" in str(outcome)
        elif file.stat().st_size < len(data):  # empty, or truncated
            # A truncated graph the first step does not load may pass once re-hashed.
            if not rehash or name in ("manifest.json", "weights.safetensors", GRAPH):
                assert isinstance(outcome, ArtifactError), outcome
    finally:
        case.close()


# -- manifests of any shape ---------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
).map(lambda value: json.dumps(value))  # NaN and Infinity included: the loader refuses them
_VALUES = st.one_of(
    _JSON,
    st.integers(0, 300_000).map(lambda n: "[" + ",".join(["2"] * n) + "]"),  # huge lists
    st.integers(1, 200_000).map(lambda d: "[" * d + "]" * d),  # deep nesting
    st.integers(1, 100_000).map(lambda d: '{"a":' * d + "1" + "}" * d),
    st.sampled_from(["1e400", "-1e400", "9" * 5000, "1" + "0" * 400, "1e-400", "-0", "true"]),
)
_PATHS = [
    (),  # the whole manifest
    ("format_version",),
    ("kind",),
    ("lr",),
    ("dtype",),
    ("ranks",),
    ("state_names",),
    ("backends",),
    ("backends", "onnx"),
    ("files",),
    ("files", "weights.safetensors"),
    ("transform",),
    ("transform", "name"),
    ("transform", "kwargs"),
    ("transform", "kwargs", "hidden_sizes"),
    ("transform", "kwargs", "timescales"),
    ("transform", "kwargs", "unknown_parameter"),
    ("training",),
    ("an_unknown_field",),
]


@FUZZ
@given(path=st.sampled_from(_PATHS), value=_VALUES)
def test_any_manifest_is_loaded_or_refused(pristine, path, value):
    case = _Case(pristine)
    try:
        manifest = json.loads((case.artifact / "manifest.json").read_text())
        placeholder = "@@fuzzed-value@@"
        if path:
            container = manifest
            for key in path[:-1]:
                container = container[key]
            container[path[-1]] = placeholder
            text = json.dumps(manifest).replace(json.dumps(placeholder), value)
        else:
            text = value
        (case.artifact / "manifest.json").write_text(text)
        outcome = case.run()
        if len(text.encode()) > artifact_module.MAX_MANIFEST_BYTES:
            assert isinstance(outcome, ArtifactError) and "over the limit" in str(outcome)
    finally:
        case.close()


# -- ONNX graphs that point at other files ------------------------------------------------------

_LOCATIONS = ["canary.txt", "../canary.txt", "./cwd/../canary.txt", "/dev/zero", "/etc/hostname"]
_PLACES = ["initializer", "sparse_initializer", "constant", "if_branch", "loop_body", "function"]


def _plant(model, place: str, location: str, index: int) -> str:
    """Add (or turn) a tensor at ``place`` in ``model`` into one whose data is in ``location``;
    the name of that tensor."""
    import onnx
    from onnx import helper

    def tensor(name):
        made = helper.make_tensor(name, onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
        _external(made, location)
        return made

    graph = model.graph
    if place == "initializer":
        chosen = graph.initializer[index % len(graph.initializer)]
        _external(chosen, location)
        return chosen.name
    if place == "sparse_initializer":
        indices = helper.make_tensor("fz_idx", onnx.TensorProto.INT64, [2], [0, 1])
        graph.sparse_initializer.append(helper.make_sparse_tensor(tensor("fz_s"), indices, [4]))
        return "fz_s"
    constant = helper.make_node("Constant", [], ["fz_out"], value=tensor("fz_c"))
    output = helper.make_tensor_value_info("fz_out", onnx.TensorProto.FLOAT, [2])
    if place == "constant":
        graph.node.append(constant)
    elif place == "if_branch":
        branch = helper.make_graph([constant], "branch", [], [output])
        then_else = {"then_branch": branch, "else_branch": branch}
        cond = helper.make_tensor("fz_cond", onnx.TensorProto.BOOL, [], [True])
        graph.initializer.append(cond)
        graph.node.append(helper.make_node("If", ["fz_cond"], ["fz_if"], **then_else))
    elif place == "loop_body":
        inputs = [
            helper.make_tensor_value_info("fz_i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("fz_k", onnx.TensorProto.BOOL, []),
        ]
        keep = helper.make_node("Identity", ["fz_k"], ["fz_k_out"])
        outputs = [helper.make_tensor_value_info("fz_k_out", onnx.TensorProto.BOOL, []), output]
        body = helper.make_graph([constant, keep], "body", inputs, outputs)
        graph.node.append(helper.make_node("Loop", ["", ""], ["fz_loop"], body=body))
    else:
        function = helper.make_function("fz.domain", "Fz", [], ["fz_out"], [constant], [])
        model.functions.append(function)
        model.opset_import.append(helper.make_opsetid("fz.domain", 1))
    return "fz_c"


@FUZZ
@given(
    place=st.sampled_from(_PLACES),
    location=st.sampled_from(_LOCATIONS),
    index=st.integers(0, 1000),
)
def test_a_graph_with_external_data_is_always_refused(pristine, place, location, index):
    import onnx

    case = _Case(pristine)
    try:
        graph = case.artifact / GRAPH
        model = onnx.load_model_from_string(graph.read_bytes())
        name = _plant(model, place, location, index)
        graph.write_bytes(model.SerializeToString())
        _rehash(case.artifact)
        outcome = case.run()
        assert isinstance(outcome, ArtifactError), outcome
        assert repr(location) in str(outcome) and repr(name) in str(outcome)
        assert GRAPH in str(outcome)
    finally:
        case.close()
