"""The artifact loader against malformed input found by hand: paths the operating system cannot
look up, manifests whose fields disagree with what the artifact's transform is, and listed files
that do not hold what their name says. Each case must raise ``ArtifactError`` (a ``ValueError``)
whose message names the offending value or path, never a raw ``OSError``, ``KeyError`` or
``TypeError`` from deep inside, and never be accepted.

Each artifact test edits a copy of a packaged artifact and re-computes the manifest's
checksums, as an attacker would (checksums prove integrity, not origin)."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_loader_hardening import _copy_packaged, _rehash

import compiledopt as co
from compiledopt import FrozenOptimizer, pretrained
from compiledopt.export import ArtifactError, export_bound, export_shape_agnostic, load_artifact
from compiledopt.export.layout import WEIGHTS
from compiledopt.learned.catalog import build_transform

OPENERS = {
    "load_artifact": load_artifact,
    "resolve": pretrained.resolve,
    "open_artifact": pretrained.open_artifact,
    "FrozenOptimizer": lambda p: FrozenOptimizer(torch.nn.Linear(2, 2).parameters(), p),
}


@pytest.fixture()
def artifact(tmp_path):
    """A copy of the packaged artifact."""
    return _copy_packaged(tmp_path / "artifact")


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    _rehash(path)


# -- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize("tail", ["a" * 300, "a" * 300 + "/artifact"], ids=["last", "inner"])
def test_a_path_with_a_name_too_long_for_the_os_is_refused_naming_it(tmp_path, opener, tail):
    path = f"{tmp_path}/{tail}"
    with pytest.raises(ArtifactError) as caught:
        opener(path)
    assert (
        str(caught.value) == f"artifact not found: {path} cannot be looked up (File name too long)"
    )


# -- state_names --------------------------------------------------------------------------------

MLP_STATE = [
    "momentum_0.5",
    "momentum_0.9",
    "momentum_0.99",
    "second_moment",
    "factored_row",
    "factored_col",
]


@pytest.mark.parametrize(
    "names",
    [[], MLP_STATE[:5], [*MLP_STATE, "extra"], MLP_STATE[::-1], ["m", *MLP_STATE[1:]]],
    ids=["none", "one-short", "one-extra", "reordered", "renamed"],
)
def test_state_names_that_are_not_the_transforms_state_are_refused(artifact, names):
    _edit_manifest(artifact, lambda m: m.update(state_names=names))
    loaded = load_artifact(artifact)  # the schema holds: a list of distinct non-empty strings
    with pytest.raises(ArtifactError) as caught:
        loaded.transforms()
    assert str(caught.value) == (
        f"{artifact}: invalid state_names: {names!r} (the 'coordinate-mlp' transform keeps 6 "
        f"state tensors: {MLP_STATE})"
    )
    with pytest.raises(ArtifactError, match="invalid state_names"):
        FrozenOptimizer(torch.nn.Linear(2, 2).parameters(), artifact)


def test_the_packaged_state_names_are_their_transforms(artifact):
    assert load_artifact(artifact).manifest["state_names"] == MLP_STATE
    assert load_artifact(artifact).transforms()[0].state_names() == MLP_STATE


# -- bindings[i].state --------------------------------------------------------------------------


def _bound_parts():
    """The spec, transforms and named parameters of a bound Kronecker artifact of two
    parameters (shapes (3,) and (4, 3)), each with a state tensor ``hidden`` (of shapes (3, 1)
    and (4, 3))."""
    spec = {"kind": "kronecker", "layer": "KroneckerRNN", "bias": True, "psd": True}
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 3))]
    transforms = co.export.build_bound(spec, [p.shape for p in params])
    return spec, transforms, [("layer0.weight", params[0]), ("layer1.weight", params[1])]


@pytest.fixture()
def bound(tmp_path):
    """A bound Kronecker artifact (see :func:`_bound_parts`), with no graphs."""
    return export_bound(tmp_path / "bound", *_bound_parts(), backends=())


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        ([], "[]"),
        ([{"name": "cell", "shape": [4, 3]}], "[{'name': 'cell', 'shape': [4, 3]}]"),
        ([{"name": "hidden", "shape": [10**12]}], "[{'name': 'hidden', 'shape': [1000000000000]}]"),
        (
            [{"name": "hidden", "shape": [4, 3]}] * 2,
            "[{'name': 'hidden', 'shape': [4, 3]}, {'name': 'hidden', 'shape': [4, 3]}]",
        ),
    ],
    ids=["none", "renamed", "huge", "twice"],
)
def test_a_binding_state_that_is_not_the_transforms_state_is_refused(bound, state, shown):
    assert json.loads((bound / "manifest.json").read_text())["bindings"][1]["state"] == [
        {"name": "hidden", "shape": [4, 3]}
    ]
    _edit_manifest(bound, lambda m: m["bindings"][1].update(state=state))
    loaded = load_artifact(bound)  # the schema holds: a list of {name, shape} objects
    with pytest.raises(ArtifactError) as caught:
        loaded.transforms()
    assert str(caught.value) == (
        f"{bound}: invalid bindings[1].state: {shown} (the transform keeps "
        "[{'name': 'hidden', 'shape': [4, 3]}] for 'layer1.weight' of shape (4, 3))"
    )


# -- the weights' dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float64, "F64"), (torch.float16, "F16"), (torch.int32, "I32"), (torch.bool, "BOOL")],
)
def test_weights_of_another_dtype_than_the_spec_are_refused(artifact, dtype, name):
    """load_state_dict would cast them silently (a float32 optimizer of float16-rounded weights,
    or of weights that were integers)."""
    weights = safetensors.torch.load((artifact / WEIGHTS).read_bytes())
    first = sorted(weights)[0]
    weights[first] = weights[first].to(dtype)
    (artifact / WEIGHTS).write_bytes(safetensors.torch.save(weights))
    _rehash(artifact)
    loaded = load_artifact(artifact)
    with pytest.raises(ArtifactError) as caught:
        loaded.transforms()
    assert str(caught.value) == (
        f"{artifact}: weights do not fit the transform spec: {first!r} is {name} in "
        f"{artifact / WEIGHTS}, the spec makes it F32 (torch.float32)"
    )


def _with_header(path: Path, edit) -> None:
    """Replace the weights' safetensors header by ``edit(header text)``, keeping the data."""
    data = (path / WEIGHTS).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = edit(data[8 : 8 + length].decode()).encode()
    (path / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length :])
    _rehash(path)


def test_a_weights_header_naming_a_tensor_twice_is_refused(artifact):
    """Which of the two entries a reader keeps is its choice: the loader's check and
    safetensors' load could read different tensors."""
    header = json.loads(_header_text(artifact))
    name = sorted(k for k in header if k != "__metadata__")[0]
    entry = json.dumps({name: header[name]})[1:-1]
    _with_header(artifact, lambda text: text.rstrip()[:-1] + ", " + entry + "}")
    with pytest.raises(ArtifactError) as caught:
        load_artifact(artifact).transforms()
    assert str(caught.value) == (
        f"{artifact / WEIGHTS}: its safetensors header is not JSON (duplicate key {name!r} in "
        "an object)"
    )


def _header_text(path: Path) -> str:
    data = (path / WEIGHTS).read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")].decode()


# -- the manifest's JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("escaped", "shown"),
    [
        ("\\ud800", "'\\ud800'"),
        ("a\\uDFFFb", "'a\\udfffb'"),
        ("\\ude00\\ud83d", "'\\ude00\\ud83d'"),
    ],
    ids=["high", "low", "reversed"],
)
def test_a_manifest_string_with_an_unpaired_surrogate_is_refused(artifact, escaped, shown):
    """JSON's \\u escapes can write half of a UTF-16 pair, which is no text: the manifest
    loaded, and printing it (compiledopt inspect) failed with a UnicodeEncodeError."""
    text = (artifact / "manifest.json").read_text()
    version = json.loads(text)["producer"]["python"]
    (artifact / "manifest.json").write_text(
        text.replace(f'"python": "{version}"', f'"python": "{escaped}"')
    )
    with pytest.raises(ArtifactError) as caught:
        load_artifact(artifact)
    assert str(caught.value) == (
        f"{artifact}: manifest.json is not valid JSON: the string {shown} holds an unpaired "
        "surrogate (not Unicode text)"
    )


def test_a_surrogate_pair_is_text(artifact):
    text = (artifact / "manifest.json").read_text()
    version = json.loads(text)["producer"]["python"]
    (artifact / "manifest.json").write_text(
        text.replace(f'"python": "{version}"', '"python": "\\ud83d\\ude00"')
    )
    assert load_artifact(artifact).manifest["producer"]["python"] == "\U0001f600"


# -- the training block -------------------------------------------------------------------------


def test_a_training_number_too_large_for_a_float_is_refused(artifact):
    """JSON holds ints of any size; compiledopt inspect divided this one by 3600 and failed
    with an OverflowError."""
    _edit_manifest(artifact, lambda m: m["training"].update(cpu_time_s=10**400))
    with pytest.raises(ArtifactError) as caught:
        load_artifact(artifact)
    assert str(caught.value) == (
        f"{artifact}: 'training' must hold only JSON values: training['cpu_time_s'] is an int "
        "of 1329 bits, not a finite number"
    )


@pytest.mark.parametrize(
    ("training", "hours"),
    [
        ({"cpu_time_s": 10**400}, "CPU time not recorded"),
        ({"wall_time_s": 10**300, "cpu_count": 10**300}, "inf CPU-hours"),
        ({"wall_time_s": 7200, "cpu_count": 3}, "6 CPU-hours"),
    ],
    ids=["huge", "product-of-ints", "ints"],
)
def test_the_summary_of_huge_numbers_does_not_overflow(training, hours):
    assert pretrained.summary(training, 1.0) == (
        f"meta-trained on ?, ? steps, {hours}; recommended lr 1, schedule ?"
    )


# -- graphs -------------------------------------------------------------------------------------


def test_a_graph_saved_under_another_ranks_name_is_refused_naming_its_file(artifact):
    (artifact / "rule_rank2.onnx").write_bytes((artifact / "rule_rank1.onnx").read_bytes())
    _rehash(artifact)
    runner = load_artifact(artifact).runner("onnx")
    transform = load_artifact(artifact).transforms()[0]
    param = torch.randn(3, 4)
    with pytest.raises(ArtifactError) as caught:
        runner(torch.randn(3, 4), param, transform.init_state(param), torch.tensor(0))
    assert str(caught.value) == (
        f"{artifact / 'rule_rank2.onnx'}: the graph takes rank-1 tensors, not the rank-2 tensors "
        "its name says"
    )
    weight = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = FrozenOptimizer([weight], artifact, backend="onnx")
    weight.grad = torch.randn(3, 4)
    with pytest.raises(ArtifactError, match=r"rule_rank2\.onnx: the graph takes rank-1 tensors"):
        optimizer.step()


# -- signature.json -----------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "shown"), [(1.0, "1.0"), (True, "True"), ("1", "'1'")])
def test_a_signature_version_that_is_not_the_int_1_is_refused(artifact, tmp_path, version, shown):
    pytest.importorskip("cryptography")
    from compiledopt.export.signing import generate_keypair, sign_artifact

    generate_keypair(tmp_path / "private.pem", tmp_path / "public.pem")
    sign_artifact(artifact, tmp_path / "private.pem")
    record = json.loads((artifact / "signature.json").read_text())
    (artifact / "signature.json").write_text(json.dumps({**record, "version": version}))
    with pytest.raises(ArtifactError) as caught:
        load_artifact(artifact, trusted_keys=[tmp_path / "public.pem"])
    assert str(caught.value) == (
        f"{artifact}: signature.json is malformed (format 'compiledopt-signature' version {shown})"
    )


def test_a_key_path_with_a_name_too_long_for_the_os_is_refused_naming_it(artifact, tmp_path):
    pytest.importorskip("cryptography")
    key = tmp_path / ("k" * 300 + ".pem")
    with pytest.raises(ValueError) as caught:
        load_artifact(artifact, trusted_keys=[key])
    assert str(caught.value) == f"{key} cannot be read as a key file (File name too long)"


@pytest.fixture()
def bound_onnx(tmp_path):
    """A bound ONNX artifact of Adam (a shape-agnostic spec: weights shared, none stored) over
    two parameters of shapes (3,) and (4, 3)."""
    spec = {"kind": "shape_agnostic", "name": "adam", "kwargs": {}}
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 3))]
    transforms = co.export.build_bound(spec, [p.shape for p in params])
    named = [("layer0.weight", params[0]), ("layer1.weight", params[1])]
    return export_bound(tmp_path / "bound", spec, transforms, named, backends=["onnx"])


def _add_binding(manifest) -> None:
    manifest["bindings"].append({**manifest["bindings"][1], "name": "layer2.weight"})


def _resize_binding(manifest) -> None:
    manifest["bindings"][0]["shape"] = [5]
    for entry in manifest["bindings"][0]["state"]:
        entry["shape"] = [5]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_add_binding, "the graph takes 2 parameters, the manifest binds 3"),
        (
            _resize_binding,
            "the graph takes parameter 0 of shape [3], the manifest binds 'layer0.weight' of "
            "shape [5]",
        ),
    ],
    ids=["one-more-binding", "another-shape"],
)
def test_bindings_that_the_bound_graph_does_not_take_are_refused_naming_it(
    bound_onnx, edit, problem
):
    """The weights are shared (a shape-agnostic spec), so they fit any bindings: only the graph
    tells, and it failed at the first step ('this graph takes 2 grads, got 3')."""
    _edit_manifest(bound_onnx, edit)
    loaded = load_artifact(bound_onnx)
    loaded.transforms()  # the eager reference fits any bindings
    with pytest.raises(ArtifactError) as caught:
        loaded.runner("onnx")
    assert str(caught.value) == f"{bound_onnx / 'rule.onnx'}: {problem}"


def _refusal_of_graph(bound: Path, graph: Path) -> str:
    """The message loading ``bound``'s ONNX rule is refused with once its ``rule.onnx`` is
    ``graph``'s bytes (the checksums made to match)."""
    (bound / "rule.onnx").write_bytes(graph.read_bytes())
    _rehash(bound)
    with pytest.raises(ArtifactError) as caught:
        load_artifact(bound).runner("onnx")
    return str(caught.value)


def test_a_per_tensor_graph_in_a_bound_artifact_is_refused_naming_it(bound_onnx, artifact):
    assert _refusal_of_graph(bound_onnx, artifact / "rule_rank1.onnx") == (
        f"{bound_onnx / 'rule.onnx'}: the graph is a per-tensor rule, not a bound rule over the "
        "bound parameters"
    )


def test_a_torchscript_rule_of_another_kind_is_refused_naming_it(artifact, bound):
    """The packaged (shape-agnostic) program in a bound artifact and the reverse: TorchScript
    failed at the first step with its interpreter's 'Expected a value of type List[Tensor]'."""
    torchscript = export_bound(bound.parent / "scripted", *_bound_parts(), backends=["torchscript"])
    packaged = (artifact / "rule.pt").read_bytes()
    (artifact / "rule.pt").write_bytes((torchscript / "rule.pt").read_bytes())
    (torchscript / "rule.pt").write_bytes(packaged)
    _rehash(artifact)
    _rehash(torchscript)
    with pytest.raises(ArtifactError) as caught:
        load_artifact(artifact, trust_code=True).runner("torchscript")
    assert str(caught.value) == (
        f"{artifact / 'rule.pt'}: the program scripts 'ModelRule', not a TensorRule"
    )
    with pytest.raises(ArtifactError) as caught:
        load_artifact(torchscript, trust_code=True).runner("torchscript")
    assert str(caught.value) == (
        f"{torchscript / 'rule.pt'}: the program scripts 'TensorRule', not a ModelRule"
    )


def test_a_torchscript_rule_of_other_state_counts_is_refused_naming_it(tmp_path):
    """Adam's bound program (two state tensors a parameter) in a Kronecker artifact's place
    (one): TorchScript failed at the first step inside the interpreter."""
    kronecker = export_bound(tmp_path / "kronecker", *_bound_parts(), backends=["torchscript"])
    spec = {"kind": "shape_agnostic", "name": "adam", "kwargs": {}}
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 3))]
    transforms = co.export.build_bound(spec, [p.shape for p in params])
    named = [("layer0.weight", params[0]), ("layer1.weight", params[1])]
    adam = export_bound(tmp_path / "adam", spec, transforms, named, backends=["torchscript"])
    (kronecker / "rule.pt").write_bytes((adam / "rule.pt").read_bytes())
    _rehash(kronecker)
    with pytest.raises(ArtifactError) as caught:
        load_artifact(kronecker, trust_code=True).runner("torchscript")
    assert str(caught.value) == (
        f"{kronecker / 'rule.pt'}: the program's state counts are [2, 2], the bindings' [1, 1]"
    )


def test_a_graph_of_another_state_count_is_refused_naming_it(artifact, tmp_path):
    """Adam's rank-1 graph (two state tensors) in the packaged coordinate-mlp artifact's place
    (six): it failed at the first step with 'this graph takes 2 state tensors, got 6'."""
    spec = {"kind": "shape_agnostic", "name": "adam", "kwargs": {}}
    transform = build_transform("adam", {})
    adam = export_shape_agnostic(tmp_path / "adam", spec, transform, ["onnx"], ranks=(1,))
    (artifact / "rule_rank1.onnx").write_bytes((adam / "rule_rank1.onnx").read_bytes())
    _rehash(artifact)
    runner = load_artifact(artifact).runner("onnx")
    param = torch.randn(5)
    with pytest.raises(ArtifactError) as caught:
        runner(torch.randn(5), param, [torch.zeros(5)] * 6, torch.tensor(0))
    assert str(caught.value) == (
        f"{artifact / 'rule_rank1.onnx'}: the graph takes 2 state tensors, state_names lists 6"
    )


def test_a_bound_graph_of_another_state_count_is_refused_naming_it(bound_onnx, tmp_path):
    """The Kronecker graph (a state tensor a parameter) in Adam's place (two), over the same
    parameter shapes."""
    kronecker = export_bound(tmp_path / "kronecker", *_bound_parts(), backends=["onnx"])
    assert _refusal_of_graph(bound_onnx, kronecker / "rule.onnx") == (
        f"{bound_onnx / 'rule.onnx'}: the graph takes 2 state tensors, the bindings list 4"
    )


# -- transform kwargs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "shown"),
    [(10**400, "<an int of 1329 bits>"), (2**63, "9223372036854775808")],
    ids=["huge", "int64-max-plus-one"],
)
def test_an_int_kwarg_outside_the_int64_range_is_refused_naming_it(artifact, size, shown):
    """JSON holds ints of any size; building the transform failed with torch's 'Overflow when
    unpacking long long' and a C++ frame, naming no field."""
    _edit_manifest(artifact, lambda m: m["transform"]["kwargs"].update(hidden_sizes=[size]))
    with pytest.raises(ArtifactError) as caught:
        load_artifact(artifact)
    assert str(caught.value) == (
        f"{artifact}: invalid transform.kwargs['hidden_sizes'][0]: {shown} (expected a 64-bit int)"
    )


@pytest.mark.parametrize(
    ("place", "shown"),
    [("shape", "bindings[1].shape[0]"), ("state", "bindings[1].state[0].shape[0]")],
)
def test_a_binding_size_outside_the_int64_range_is_refused_naming_it(bound, place, shown):
    """The binding's shape failed to build with torch's 'Overflow when unpacking long long'."""

    def edit(manifest):
        binding = manifest["bindings"][1]
        target = binding if place == "shape" else binding["state"][0]
        target["shape"] = [2**70, 3]

    _edit_manifest(bound, edit)
    with pytest.raises(ArtifactError) as caught:
        load_artifact(bound)
    assert str(caught.value) == (
        f"{bound}: invalid {shown}: 1180591620717411303424 (expected an int from 0 to 2**63 - 1)"
    )
