"""The artifact loader against hostile folders: ONNX graphs that point at files outside the
artifact, listed files that are not regular files or are too large, manifests whose spec implies
far more than the weights hold, bytes that no loader can parse, and construction that must not
touch the global random number generators.

Each test edits a copy of a packaged artifact and re-computes the manifest's checksums, as an
attacker would (checksums prove integrity, not origin)."""

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import compiledopt as co
from compiledopt import pretrained
from compiledopt.export import ArtifactError, export_bound, load_artifact
from compiledopt.export import artifact as artifact_module
from compiledopt.export import onnx as onnx_backend

PACKAGED = "coordinate-mlp"
GRAPH = "rule_rank1.onnx"
#: The largest manifest the packaged optimizers ship (measured: 2,308 bytes); the manifest cap
#: must leave an ample margin over it.
SHIPPED_MANIFEST_BYTES = max(
    (pretrained.path(name) / "manifest.json").stat().st_size for name in pretrained.names()
)


# -- helpers (shared with tests/test_loader_fuzz.py) --------------------------------------------


def _copy_packaged(target: Path, name: str = PACKAGED) -> Path:
    shutil.copytree(pretrained.path(name), target)
    return target


def _rehash(path: Path) -> None:
    """Recompute every listed file's checksum, as whoever edited a file would (files that are
    not regular files are left as they are: hashing them is what the loader must not do)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        file = path / name
        if file.is_file() and not file.is_symlink():
            manifest["files"][name] = hashlib.sha256(file.read_bytes()).hexdigest()
        elif file.is_symlink() and Path(os.path.realpath(file)).is_file():
            manifest["files"][name] = hashlib.sha256(file.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def _vm_size() -> int:
    """This process's virtual memory size in bytes (Linux), or 0 where unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def _bounded(seconds: float = 20.0, extra_memory: int = 3 << 30):
    """Fail (TimeoutError, MemoryError) rather than hang or exhaust the machine: an alarm after
    ``seconds`` (it interrupts a blocking open or read) and an address-space cap ``extra_memory``
    above what the process already maps (the soft limit, restored afterwards)."""
    previous_handler = signal.getsignal(signal.SIGALRM)

    def expire(signum, frame):
        raise TimeoutError(f"the load did not finish within {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _vm_size()
    capped = current + extra_memory if current else resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        capped = min(capped, hard)
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    resource.setrlimit(resource.RLIMIT_AS, (capped, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _load_everything(path: Path) -> None:
    """Everything a user's first step does with an artifact: open it, rebuild the transform from
    its weights, and load and run its ONNX graph for a rank-1 parameter."""
    loaded = load_artifact(path)
    transform = loaded.transforms()[0]
    param = torch.randn(5)
    runner = loaded.runner("onnx")
    runner(torch.randn(5), param, transform.init_state(param), torch.tensor(0))


def _external(tensor, location: str) -> None:
    """Make ``tensor`` (an onnx.TensorProto) keep its data in the file ``location``."""
    import onnx

    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")


# -- 1. ONNX external data -------------------------------------------------------------------


@pytest.fixture()
def artifact(tmp_path, monkeypatch):
    """A copy of the packaged artifact, with the working directory set to a folder beside it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return _copy_packaged(tmp_path / "artifact")


def _edit_graph(path: Path, edit) -> None:
    import onnx

    model = onnx.load_model_from_string((path / GRAPH).read_bytes())
    edit(model)
    (path / GRAPH).write_bytes(model.SerializeToString())
    _rehash(path)


def test_an_initializer_in_a_file_of_the_working_directory_is_refused(artifact):
    """onnxruntime resolves a relative external-data location against the working directory
    when a model is loaded from memory: any file there (``.env``, a key) would be read into the
    update direction."""
    secret = Path.cwd() / "secret.bin"
    secret.write_bytes(torch.tensor([1.0e6, -1.0e6]).numpy().tobytes())

    def edit(model):
        bias = next(t for t in model.graph.initializer if t.name == "transform.head.bias")
        _external(bias, "secret.bin")

    _edit_graph(artifact, edit)
    loaded = load_artifact(artifact)  # data only: opening it reads no graph
    with pytest.raises(ArtifactError, match=r"secret\.bin") as caught:
        loaded.runner("onnx")
    assert "transform.head.bias" in str(caught.value) and GRAPH in str(caught.value)


@pytest.mark.parametrize("place", ["sparse_initializer", "constant", "subgraph", "function"])
def test_external_data_anywhere_in_the_graph_is_refused(artifact, place):
    import onnx
    from onnx import helper

    def tensor(name):
        made = helper.make_tensor(name, onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
        _external(made, f"../{place}.bin")
        return made

    def edit(model):
        graph = model.graph
        if place == "sparse_initializer":
            indices = helper.make_tensor("hidden_idx", onnx.TensorProto.INT64, [2], [0, 1])
            sparse = helper.make_sparse_tensor(tensor("hidden_sparse"), indices, [4])
            graph.sparse_initializer.append(sparse)
        elif place == "constant":
            graph.node.append(helper.make_node("Constant", [], ["hidden_c"], value=tensor("hc")))
        elif place == "subgraph":
            inner = helper.make_graph(
                [helper.make_node("Constant", [], ["hidden_o"], value=tensor("hs"))],
                "then",
                [],
                [helper.make_tensor_value_info("hidden_o", onnx.TensorProto.FLOAT, [2])],
            )
            other = helper.make_graph(
                [], "else", [], [helper.make_tensor_value_info("hc2", onnx.TensorProto.FLOAT, [2])]
            )
            other.initializer.append(helper.make_tensor("hc2", onnx.TensorProto.FLOAT, [2], [0, 0]))
            cond = helper.make_tensor("hidden_cond", onnx.TensorProto.BOOL, [], [True])
            graph.initializer.append(cond)
            node = helper.make_node(
                "If", ["hidden_cond"], ["hidden_if"], then_branch=inner, else_branch=other
            )
            graph.node.append(node)
        else:
            body = helper.make_node("Constant", [], ["out"], value=tensor("hf"))
            function = helper.make_function("hidden.domain", "Hidden", [], ["out"], [body], [])
            model.functions.append(function)
            model.opset_import.append(helper.make_opsetid("hidden.domain", 1))

    _edit_graph(artifact, edit)
    with pytest.raises(ArtifactError, match=rf"\.\./{place}\.bin") as caught:
        load_artifact(artifact).runner("onnx")
    assert GRAPH in str(caught.value)


def test_a_graph_file_with_external_data_is_refused_when_loaded_by_path(tmp_path):
    """The backend's own loader refuses it too (it loads the bytes it checked, never the path)."""
    import onnx

    model = onnx.load_model_from_string((pretrained.path(PACKAGED) / GRAPH).read_bytes())
    _external(model.graph.initializer[0], "weights.bin")
    graph = tmp_path / "rule.onnx"
    graph.write_bytes(model.SerializeToString())
    (tmp_path / "weights.bin").write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match=r"weights\.bin"):
        onnx_backend.load(str(graph))


# -- 2. files that are not regular files, and sizes -------------------------------------------


def test_a_symlink_to_a_file_outside_the_artifact_is_refused(artifact):
    outside = artifact.parent / "outside.safetensors"
    shutil.copy(artifact / "weights.safetensors", outside)
    (artifact / "weights.safetensors").unlink()
    (artifact / "weights.safetensors").symlink_to(outside)
    _rehash(artifact)
    with pytest.raises(ArtifactError, match=r"weights\.safetensors is a symbolic link"):
        load_artifact(artifact)


def test_a_symlink_to_dev_zero_is_refused_without_reading(artifact):
    (artifact / "weights.safetensors").unlink()
    (artifact / "weights.safetensors").symlink_to("/dev/zero")
    start = time.perf_counter()
    with _bounded(seconds=20, extra_memory=2 << 30):
        with pytest.raises(ArtifactError, match=r"weights\.safetensors is a symbolic link"):
            load_artifact(artifact)
    assert time.perf_counter() - start < 10  # the unguarded loads took 15-57 s


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_refused_without_blocking(artifact):
    (artifact / GRAPH).unlink()
    os.mkfifo(artifact / GRAPH)
    with _bounded(seconds=10):
        with pytest.raises(ArtifactError, match=rf"{GRAPH} is a FIFO"):
            load_artifact(artifact)


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(artifact, monkeypatch):
    """The race: the file is a regular file when checked and a FIFO when opened. The open does
    not block (O_NONBLOCK) and the opened descriptor is checked again."""
    real_lstat = os.lstat

    def lstat_then_swap(path, *args, **kwargs):
        result = real_lstat(path, *args, **kwargs)
        if Path(path).name == GRAPH and Path(path).is_file():
            Path(path).unlink()
            os.mkfifo(path)
        return result

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    with _bounded(seconds=10):
        with pytest.raises(ArtifactError, match=rf"{GRAPH} is a FIFO"):
            load_artifact(artifact)


def test_a_directory_in_place_of_a_file_is_refused(artifact):
    (artifact / GRAPH).unlink()
    (artifact / GRAPH).mkdir()
    with pytest.raises(ArtifactError, match=rf"{GRAPH} is a directory"):
        load_artifact(artifact)


def test_a_file_over_the_cap_is_refused_before_it_is_read(artifact):
    """A sparse file one byte over the cap: refused from its size alone (reading it would hold
    the cap's worth of memory)."""
    cap = artifact_module.MAX_FILE_BYTES
    assert cap >= 1 << 30  # real graphs and weights fit with a wide margin (largest: 125 kB)
    with open(artifact / GRAPH, "r+b") as handle:
        handle.truncate(cap + 1)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with _bounded(seconds=20, extra_memory=1 << 30):
            with pytest.raises(ArtifactError, match=rf"{GRAPH} is {cap + 1} bytes"):
                load_artifact(artifact)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10  # the unguarded loads took 15-57 s
    assert peak < 16 << 20, peak


def test_a_file_that_grows_past_the_cap_while_read_is_refused(artifact, monkeypatch):
    """The size checked first is not trusted: the read stops one byte past the cap."""
    size = (artifact / GRAPH).stat().st_size
    monkeypatch.setattr(artifact_module, "MAX_FILE_BYTES", size + 100)
    real_fstat = os.fstat

    def fstat_then_grow(descriptor):
        result = real_fstat(descriptor)
        target = artifact / GRAPH
        if os.path.samestat(result, os.stat(target)) and result.st_size == size:
            with open(target, "ab") as handle:
                handle.write(b"\0" * 1000)
        return result

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(ArtifactError, match=rf"{GRAPH} is larger than {size + 100} bytes"):
        load_artifact(artifact)


def test_the_manifest_cap_is_small_with_margin_over_real_manifests(artifact):
    cap = artifact_module.MAX_MANIFEST_BYTES
    assert 100 * SHIPPED_MANIFEST_BYTES <= cap <= 4 << 20
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["producer"]["padding"] = "x" * cap
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    refused = rf"manifest\.json is \d+ bytes, over the limit of {cap}"
    with pytest.raises(ArtifactError, match=refused):
        load_artifact(artifact)


def test_a_bound_manifest_of_many_parameters_fits_the_cap(tmp_path):
    """A bound artifact of 2,000 parameters (each with a state tensor) loads: its manifest is
    under the cap."""
    params = [torch.nn.Parameter(torch.zeros(3, 3)) for _ in range(2000)]
    spec = {"kind": "per_element_step_size", "step_size": 1.0}
    transforms = co.export.build_bound(spec, [p.shape for p in params])
    named = [(f"model.layers.{i}.attention.weight", p) for i, p in enumerate(params)]
    path = export_bound(tmp_path / "bound", spec, transforms, named, backends=())
    size = (path / "manifest.json").stat().st_size
    assert size < artifact_module.MAX_MANIFEST_BYTES, size
    assert len(load_artifact(path).transforms()) == 2000


# -- 3. a spec that implies more than the weights hold ----------------------------------------


def _bomb(path: Path, layers: int) -> int:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["transform"]["kwargs"]["hidden_sizes"] = [2] * layers
    text = json.dumps(manifest)
    (path / "manifest.json").write_text(text)
    return len(text)


def test_a_spec_implying_more_tensors_than_the_weights_hold_is_refused_fast(artifact):
    """50,000 hidden layers: a 150 kB manifest, under the cap and valid for the schema, whose
    transform would be 100,000 tensors (building even its meta-device modules took ~15 s and
    hundreds of MB). The weights hold 4: refused before anything is built."""
    size = _bomb(artifact, 50_000)
    assert size < artifact_module.MAX_MANIFEST_BYTES
    loaded = load_artifact(artifact)
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match="weights do not fit the transform spec") as caught:
        loaded.transforms()
    assert time.perf_counter() - start < 10  # the unguarded loads took 15-57 s
    tracemalloc.start()  # measured apart: tracing slows every allocation
    try:
        with pytest.raises(ArtifactError, match="weights do not fit the transform spec"):
            loaded.transforms()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert "weights.safetensors" in str(caught.value) and "4 tensors" in str(caught.value)
    assert len(str(caught.value)) < 1000


def test_a_bound_manifest_with_more_bindings_than_weights_is_refused_before_building(tmp_path):
    spec = {"kind": "module", "module": "Linear"}
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(2)]
    transforms = co.export.build_bound(spec, [p.shape for p in params])
    path = export_bound(tmp_path / "b", spec, transforms, [("a", params[0]), ("b", params[1])], ())
    manifest = json.loads((path / "manifest.json").read_text())
    binding = manifest["bindings"][0]
    manifest["bindings"] = [{**binding, "name": f"p{i}"} for i in range(14_000)]
    text = json.dumps(manifest, separators=(",", ":"))
    assert len(text) < artifact_module.MAX_MANIFEST_BYTES
    (path / "manifest.json").write_text(text)
    loaded = load_artifact(path)
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match="14000 bindings"):
        loaded.transforms()
    assert time.perf_counter() - start < 10  # the unguarded loads took 15-57 s


def test_a_spec_implying_larger_tensors_is_refused_before_allocating(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["transform"]["kwargs"]["hidden_sizes"] = [10**9]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="weights do not fit the transform spec"):
        load_artifact(artifact).transforms()


# -- 4. every failure to parse is an ArtifactError, chained --------------------------------------


def test_junk_weights_are_an_artifact_error(artifact):
    for junk in (b"", b"\x00" * 7, b"\xff" * 64, (8).to_bytes(8, "little") + b"{not json", None):
        if junk is None:  # a valid header whose offsets run past the data
            header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
            junk = len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16
        (artifact / "weights.safetensors").write_bytes(junk)
        _rehash(artifact)
        with pytest.raises(ArtifactError, match=r"weights\.safetensors") as caught:
            load_artifact(artifact).transforms()
        assert type(caught.value) is ArtifactError


def test_weights_that_safetensors_refuses_chain_its_error(artifact):
    """A header the loader's own check accepts but safetensors refuses (overlapping data)."""
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    text = json.dumps(header).encode()
    data = len(text).to_bytes(8, "little") + text + b"\0" * 8
    (artifact / "weights.safetensors").write_bytes(data)
    _rehash(artifact)
    with pytest.raises(ArtifactError, match=r"weights\.safetensors") as caught:
        load_artifact(artifact).transforms()
    assert caught.value.__cause__ is not None or "do not fit" in str(caught.value)


@pytest.mark.parametrize(
    "junk", [b"", b"\x08\x01\x12", b"garbage" * 100, b"\x0a\xff\xff\xff\xff\x0f"], ids=str
)
def test_corrupt_onnx_bytes_are_an_artifact_error(artifact, junk):
    (artifact / GRAPH).write_bytes(junk)
    _rehash(artifact)
    with pytest.raises(ArtifactError, match=GRAPH) as caught:
        _load_everything(artifact)
    assert type(caught.value) is ArtifactError


def test_an_onnx_graph_that_onnxruntime_refuses_chains_its_error(artifact):
    def edit(model):
        model.graph.node[0].op_type = "NoSuchOperator"

    _edit_graph(artifact, edit)
    with pytest.raises(ArtifactError, match=GRAPH) as caught:
        _load_everything(artifact)  # a rank's graph loads at its first use
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value.__cause__, ArtifactError)


def test_a_corrupt_torchscript_archive_is_an_artifact_error(artifact):
    (artifact / "rule.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    _rehash(artifact)
    with pytest.raises(ArtifactError, match=r"rule\.pt") as caught:
        load_artifact(artifact, trust_code=True).runner("torchscript")
    assert caught.value.__cause__ is not None


# -- 5. construction leaves the global random number generators alone --------------------------


def _rng_states():
    """The CPU generator's state and, where there is a GPU, every CUDA device's (CUDA is
    initialised first, so that the loader's CUDA branch is the one under test there)."""
    if torch.cuda.is_available():
        torch.cuda.init()
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.extend(torch.cuda.get_rng_state_all())
    return states


def _assert_same(before, after):
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert torch.equal(old, new)


@pytest.mark.parametrize("name", pretrained.names())
def test_a_packaged_optimizer_leaves_the_global_rng_untouched(name):
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(1234)
    before = _rng_states()
    optimizer = co.FrozenOptimizer(model.parameters(), name, backend="eager")
    _assert_same(before, _rng_states())
    expected = torch.rand(3)  # what a seeded run draws next, with or without the optimizer
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), expected)
    assert optimizer.backend == "eager"
    _assert_same(_rng_states(), _rng_states())
    before = _rng_states()
    pretrained.load(name).transforms()
    _assert_same(before, _rng_states())


def test_a_bound_artifact_leaves_the_global_rng_untouched(tmp_path):
    spec = {"kind": "module", "module": "Linear"}  # nn.Linear draws its initial weights
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    transforms = co.export.build_bound(spec, [p.shape for p in params])
    named = [("w", params[0]), ("b", params[1])]
    path = export_bound(tmp_path / "bound", spec, transforms, named, backends=())
    before = _rng_states()
    rebuilt = load_artifact(path).transforms()
    _assert_same(before, _rng_states())
    for original, loaded in zip(transforms, rebuilt):
        for (key, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), key
    optimizer = co.FrozenOptimizer(params, path, backend="eager")
    _assert_same(before, _rng_states())
    assert optimizer.backend == "eager"
