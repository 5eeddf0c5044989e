"""The manifest schema: what the exporter writes passes, every targeted corruption is refused with
an ArtifactError naming the field, and no JSON value makes check_manifest raise anything else."""

import copy
import inspect
import json
import math
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiledopt
from compiledopt.export import export_bound, export_shape_agnostic
from compiledopt.export.manifest import (
    ARTIFACT_KINDS,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS,
    ArtifactError,
    check_manifest,
    check_training,
)
from compiledopt.learned.catalog import CATALOG, build_transform, kinds, spec_fields
from compiledopt.nn import KroneckerRNN
from compiledopt.transforms.kronecker import KroneckerTransform

SHIPPED = sorted((Path(compiledopt.__file__).parent / "pretrained").glob("*/manifest.json"))
KRONECKER = {"kind": "kronecker", "layer": "KroneckerRNN", "bias": True, "psd": True}
ADAM = {"kind": "shape_agnostic", "name": "adam", "kwargs": {"betas": [0.8, 0.99]}}
SHAPES = [(3,), (4, 3), (2, 3, 2, 2)]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> Dict[str, Dict[str, Any]]:
    """Valid manifests as the exporter writes them: ``bound`` (a Kronecker rule with state),
    ``sa`` (shape-agnostic: Adam, TorchScript, ranks 1 and 2, a training block) and ``shipped`` (the
    packaged coordinate-mlp artifact, whose ONNX graphs are one per rank)."""
    root = tmp_path_factory.mktemp("manifests")
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    factory = KroneckerTransform(KroneckerRNN, bias=True, psd=True)
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    bound = export_bound(
        root / "bound", KRONECKER, [factory(p) for p in params], named, ["torchscript"]
    )
    agnostic = export_shape_agnostic(
        root / "agnostic",
        ADAM,
        build_transform("adam", ADAM["kwargs"]),
        ["torchscript"],
        ranks=(1, 2),
        training={"seed": 3, "wall_time_s": None, "schedule": {"decay": "cosine"}},
    )
    shipped = next(p for p in SHIPPED if p.parent.name == "coordinate-mlp")
    return {
        "bound": json.loads((bound / "manifest.json").read_text()),
        "sa": json.loads((agnostic / "manifest.json").read_text()),
        "shipped": json.loads(shipped.read_text()),
    }


def test_what_the_exporter_writes_passes(manifests):
    assert FORMAT == "compiledopt-artifact" and FORMAT_VERSION == 1
    for name, manifest in manifests.items():
        assert check_manifest(manifest, name) is manifest
    assert manifests["bound"]["bindings"][2]["state"], "the bound base should carry state"
    assert manifests["shipped"]["backends"]["onnx"], "the shipped base should have per-rank graphs"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_the_shipped_manifests_pass(path):
    assert len(SHIPPED) >= 2
    check_manifest(json.loads(path.read_text()), str(path))


def _variant(base: Dict[str, Any], **changes: Any) -> Dict[str, Any]:
    manifest = copy.deepcopy(base)
    manifest.update(changes)
    return manifest


def test_valid_variations_pass(manifests):
    agnostic, shipped = manifests["sa"], manifests["shipped"]
    del_training = _variant(agnostic)
    del del_training["training"]
    weights_only = _variant(agnostic, backends={}, files={WEIGHTS: agnostic["files"][WEIGHTS]})
    two_ranks = _variant(
        shipped,
        ranks=[0, 5],
        backends={"onnx": ["rule_rank5.onnx", "rule_rank0.onnx"]},
        files={
            n: d
            for n, d in shipped["files"].items()
            if n in (WEIGHTS, "rule_rank0.onnx", "rule_rank5.onnx")
        },
    )
    step_size = {
        "kind": "shape_agnostic",
        "name": "learned-step-size",
        "kwargs": {"step_size": 2, "shape": None, "dtype": None},
    }
    for manifest in [
        del_training,
        weights_only,
        two_ranks,
        _variant(agnostic, lr=1, dtype="float64", state_names=[]),
        _variant(agnostic, transform=step_size, producer={}),
        _variant(manifests["bound"], transform={"kind": "kronecker", "layer": "KroneckerRNN"}),
    ]:
        check_manifest(manifest, "variant")


def test_every_catalog_transform_with_its_defaults_written_out_passes(manifests):
    """Each keyword of each catalog constructor, at its default (tuples as JSON lists)."""
    for name, entry in CATALOG.items():
        kwargs = {
            p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in inspect.signature(entry.build).parameters.values()
        }
        spec = {"kind": "shape_agnostic", "name": name, "kwargs": kwargs}
        check_manifest(_variant(manifests["sa"], transform=spec), name)


def test_every_spec_kind_has_its_fields():
    # The bound kinds' fields are the catalog's; the exporter writes each of them.
    assert kinds() == (
        "shape_agnostic",
        "kronecker",
        "metacurvature",
        "per_element_step_size",
        "module",
    )
    assert spec_fields("kronecker") == ("kind", "layer", "bias", "psd")
    assert spec_fields("shape_agnostic") == ("kind", "name", "kwargs")


# -- targeted corruptions -----------------------------------------------------------------------

Change = Callable[[Dict[str, Any]], None]


def put(*path: Any) -> Change:
    """Set the value at ``path[:-1]`` to ``path[-1]`` (not copied: values are never changed)."""
    *keys, value = path

    def change(manifest: Dict[str, Any]) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def drop(*keys: Any) -> Change:
    def change(manifest: Dict[str, Any]) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


def rank_files(*ranks: int) -> Change:
    """The shipped manifest's ONNX graphs (and their checksums) cut down to ``ranks``."""

    def change(manifest: Dict[str, Any]) -> None:
        manifest["backends"]["onnx"] = [f"rule_rank{r}.onnx" for r in ranks]
        for r in range(6):
            if r not in ranks:
                del manifest["files"][f"rule_rank{r}.onnx"]

    return change


def both(*changes: Change) -> Change:
    def change(manifest: Dict[str, Any]) -> None:
        for each in changes:
            each(manifest)

    return change


def mlp(**kwargs: Any) -> Dict[str, Any]:
    return {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": kwargs}


HEX = "0123456789abcdef" * 4
TS = ("backends", "torchscript")
LSS = {"kind": "shape_agnostic", "name": "learned-step-size", "kwargs": {"dtype": "float32"}}
# (id, base manifest, change, a part of the message it must raise)
CORRUPTIONS: List[Tuple[str, str, Change, str]] = [
    ("format-missing", "sa", drop("format"), "not a compiledopt artifact (format None)"),
    ("format-other", "sa", put("format", "x"), "not a compiledopt artifact (format 'x')"),
    ("version-true", "sa", put("format_version", True), "format version True in format_version"),
    ("version-str", "sa", put("format_version", "1"), "format version '1' in format_version"),
    ("version-2", "sa", put("format_version", 2), "unknown format version 2 "),
    ("version-float", "sa", put("format_version", 1.0), "format version 1.0 in format_version"),
    ("version-missing", "sa", drop("format_version"), "lacks 'format_version'"),
    ("kind-x", "sa", put("kind", "x"), "invalid kind: 'x'"),
    ("kind-list", "sa", put("kind", ["bound"]), "invalid kind: ['bound']"),
    ("kind-missing", "sa", drop("kind"), "lacks 'kind'"),
    ("kind-swapped", "sa", put("kind", "bound"), "'ranks' is not a field of a bound"),
    ("dtype-16", "sa", put("dtype", "float16"), "invalid dtype: 'float16'"),
    ("dtype-missing", "sa", drop("dtype"), "lacks 'dtype'"),
    ("lr-str", "sa", put("lr", "0.001"), "invalid lr: '0.001'"),
    ("lr-negative", "sa", put("lr", -1), "invalid lr: -1 "),
    ("lr-zero", "sa", put("lr", 0.0), "invalid lr: 0.0 "),
    ("lr-nan", "sa", put("lr", math.nan), "invalid lr: nan"),
    ("lr-inf", "sa", put("lr", math.inf), "invalid lr: inf"),
    ("lr-bool", "sa", put("lr", True), "invalid lr: True"),
    ("lr-huge", "sa", put("lr", 10**400), "invalid lr: <an int of 1329 bits>"),
    ("lr-null", "sa", put("lr", None), "invalid lr: None"),
    ("backends-list", "sa", put("backends", ["torchscript"]), "invalid backends: ["),
    ("backend-unknown", "sa", put("backends", "tf", ["rule.tf"]), "unknown backend 'tf'"),
    ("backend-empty", "sa", put(*TS, []), "backends['torchscript']: []"),
    ("backend-str", "sa", put(*TS, "rule.pt"), "backends['torchscript']: 'rule.pt'"),
    ("backend-ext", "sa", put(*TS, ["rule.onnx"]), "backends['torchscript'][0]: 'rule.onnx'"),
    ("backend-dotdot", "sa", put(*TS, ["../x"]), "backends['torchscript'][0]: '../x'"),
    ("backend-ranked", "sa", put(*TS, ["rule_rank1.pt"]), "['torchscript'][0]: 'rule_rank1.pt'"),
    ("backend-twice", "sa", put(*TS, ["rule.pt", "rule.pt"]), "['torchscript'][1]: 'rule.pt'"),
    (
        "backend-ranked-bound",
        "bound",
        put("backends", "onnx", ["rule_rank1.onnx"]),
        "backends['onnx'][0]: 'rule_rank1.onnx'",
    ),
    ("rank-not-listed", "shipped", put("ranks", [0, 1, 2, 3, 4]), "['onnx'][5]: 'rule_rank5.onnx'"),
    ("rank-graph-missing", "shipped", rank_files(0, 1, 2, 4, 5), "['onnx'] lacks rule_rank3.onnx"),
    (
        "rank-unranked-name",
        "shipped",
        both(rank_files(0, 1, 2, 3, 4, 5), put("backends", "onnx", 0, "rule.onnx")),
        "backends['onnx'][0]: 'rule.onnx'",
    ),
    ("files-list", "sa", put("files", [WEIGHTS]), "invalid files: ["),
    ("files-nonhex", "sa", put("files", WEIGHTS, "g" * 64), "files['weights.safetensors']: 'ggg"),
    ("files-upper", "sa", put("files", WEIGHTS, HEX.upper()), "['weights.safetensors']: '0123"),
    ("files-short", "sa", put("files", "rule.pt", HEX[:63]), "files['rule.pt']: '0123"),
    ("files-int", "sa", put("files", "rule.pt", 12), "files['rule.pt']: 12 "),
    (
        "files-no-weights",
        "sa",
        drop("files", WEIGHTS),
        "lacks the checksum of 'weights.safetensors'",
    ),
    ("files-no-graph", "shipped", drop("files", "rule_rank2.onnx"), "of 'rule_rank2.onnx'"),
    ("files-extra", "sa", put("files", "notes.txt", HEX), "files['notes.txt']: not a file of"),
    ("files-dotdot", "sa", put("files", "../" + WEIGHTS, HEX), "files['../weights.safetensors']"),
    ("files-dot", "sa", put("files", ".", HEX), "files['.']: not a file"),
    ("files-manifest", "sa", put("files", "manifest.json", HEX), "files['manifest.json']"),
    ("shape-negative", "bound", put("bindings", 1, "shape", [-1, 3]), "bindings[1].shape[0]: -1 "),
    ("shape-bool", "bound", put("bindings", 1, "shape", [4, True]), "bindings[1].shape[1]: True"),
    ("shape-str", "bound", put("bindings", 1, "shape", "3"), "bindings[1].shape: '3'"),
    ("shape-nested", "bound", put("bindings", 2, "shape", [2, [3]]), "bindings[2].shape[1]: [3]"),
    ("shape-float", "bound", put("bindings", 2, "shape", 1, 3.0), "bindings[2].shape[1]: 3.0"),
    ("bindings-empty", "bound", put("bindings", []), "invalid bindings: []"),
    ("bindings-dict", "bound", put("bindings", {}), "invalid bindings: {}"),
    ("binding-not-object", "bound", put("bindings", 0, "w"), "invalid bindings[0]: 'w'"),
    (
        "binding-name-twice",
        "bound",
        put("bindings", 1, "name", "layer0.weight"),
        "bindings[1].name: 'layer0.weight'",
    ),
    ("binding-name-int", "bound", put("bindings", 1, "name", 1), "bindings[1].name: 1 "),
    ("binding-dtype", "bound", put("bindings", 0, "dtype", "float64"), "[0].dtype: 'float64'"),
    (
        "binding-extra",
        "bound",
        put("bindings", 0, "grad", 1),
        "unknown field 'grad' in bindings[0]",
    ),
    ("binding-no-state", "bound", drop("bindings", 0, "state"), "bindings[0] lacks 'state'"),
    (
        "state-shape",
        "bound",
        put("bindings", 2, "state", 0, "shape", [-2]),
        "bindings[2].state[0].shape[0]: -2",
    ),
    (
        "state-name",
        "bound",
        put("bindings", 2, "state", 0, "name", None),
        "bindings[2].state[0].name: None",
    ),
    ("state-not-list", "bound", put("bindings", 2, "state", {}), "bindings[2].state: {}"),
    ("bound-ranks", "bound", put("ranks", [1]), "'ranks' is not a field of a bound artifact"),
    ("bound-no-bindings", "bound", drop("bindings"), "lacks 'bindings'"),
    ("sa-bindings", "sa", put("bindings", []), "'bindings' is not a field of a shape_agnostic"),
    ("ranks-6", "sa", put("ranks", [6]), "ranks[0]: 6 "),
    ("ranks-repeated", "sa", put("ranks", [1, 1]), "ranks[1]: 1 "),
    ("ranks-unsorted", "sa", put("ranks", [2, 1]), "ranks[1]: 1 "),
    ("ranks-empty", "sa", put("ranks", []), "invalid ranks: []"),
    ("ranks-bool", "sa", put("ranks", [True]), "ranks[0]: True"),
    ("ranks-negative", "sa", put("ranks", [-1, 1]), "ranks[0]: -1 "),
    ("ranks-missing", "sa", drop("ranks"), "lacks 'ranks'"),
    ("state-names-int", "sa", put("state_names", [1]), "state_names[0]: 1 "),
    ("state-names-twice", "sa", put("state_names", ["m", "m"]), "state_names[1]: 'm'"),
    ("state-names-empty-str", "sa", put("state_names", [""]), "state_names[0]: ''"),
    ("state-names-str", "sa", put("state_names", "m"), "invalid state_names: 'm'"),
    ("producer-missing", "sa", drop("producer"), "lacks 'producer'"),
    ("producer-str", "sa", put("producer", "me"), "invalid producer: 'me'"),
    ("producer-value", "sa", put("producer", "torch", 2), "producer['torch']: 2 "),
    ("unknown-field", "sa", put("signature", "x"), "unknown field 'signature' in the manifest"),
    ("training-list", "sa", put("training", [1, 2]), "'training' must be a JSON object, got list"),
    ("training-nan", "sa", put("training", "loss", math.nan), "must hold only JSON values"),
    ("transform-str", "sa", put("transform", "adam"), "invalid transform: 'adam'"),
    ("transform-missing", "sa", drop("transform"), "lacks 'transform'"),
    ("transform-no-kind", "sa", drop("transform", "kind"), "transform lacks 'kind'"),
    ("transform-kind-int", "sa", put("transform", "kind", 5), "unknown transform spec kind 5"),
    ("transform-kind-bound", "sa", put("transform", KRONECKER), "transform.kind: 'kronecker'"),
    ("transform-name", "sa", put("transform", "name", "evil"), "shape-agnostic transform 'evil'"),
    ("transform-name-list", "sa", put("transform", "name", ["adam"]), "transform.name: ['adam']"),
    ("transform-extra", "sa", put("transform", "seed", 1), "unknown field 'seed' in transform"),
    ("kwargs-list", "sa", put("transform", "kwargs", [1]), "transform.kwargs: [1]"),
    (
        "kwargs-unknown",
        "sa",
        put("transform", "kwargs", "beta", 1),
        "transform.kwargs['beta']: not a parameter of 'adam'",
    ),
    ("kwargs-betas", "sa", put("transform", "kwargs", "betas", [0.9]), "kwargs['betas']: [0.9]"),
    (
        "kwargs-betas-str",
        "sa",
        put("transform", "kwargs", "betas", [0.9, "a"]),
        "transform.kwargs['betas'][1]: 'a'",
    ),
    ("kwargs-eps-nan", "sa", put("transform", "kwargs", "eps", math.nan), "kwargs['eps']: nan"),
    ("kwargs-flag", "sa", put("transform", "kwargs", "amsgrad", 1), "kwargs['amsgrad']: 1 "),
    ("hidden-str", "sa", put("transform", mlp(hidden_sizes="32")), "kwargs['hidden_sizes']: '32'"),
    ("hidden-int", "sa", put("transform", mlp(hidden_sizes=32)), "kwargs['hidden_sizes']: 32 "),
    ("hidden-item", "sa", put("transform", mlp(hidden_sizes=[8, "8"])), "['hidden_sizes'][1]: '8'"),
    ("hidden-float", "sa", put("transform", mlp(hidden_sizes=[8.0])), "['hidden_sizes'][0]: 8.0"),
    ("hidden-nested", "sa", put("transform", mlp(hidden_sizes=[[8]])), "['hidden_sizes'][0]: [8]"),
    ("kwargs-dtype", "sa", put("transform", LSS), "transform.kwargs['dtype']: 'float32'"),
    (
        "kronecker-layer",
        "bound",
        put("transform", "layer", "Evil"),
        "unknown Kronecker layer 'Evil'",
    ),
    ("kronecker-bias", "bound", put("transform", "bias", "yes"), "transform.bias: 'yes'"),
    ("kronecker-extra", "bound", put("transform", "lr", 1.0), "unknown field 'lr' in transform"),
    (
        "metacurvature-lr",
        "bound",
        put("transform", {"kind": "metacurvature", "lr": "1"}),
        "transform.lr: '1'",
    ),
    (
        "step-size",
        "bound",
        put("transform", {"kind": "per_element_step_size", "step_size": 0}),
        "transform.step_size: 0 ",
    ),
    (
        "module",
        "bound",
        put("transform", {"kind": "module", "module": "Conv2d"}),
        "module 'Conv2d'",
    ),
]


@pytest.mark.parametrize(
    ("base", "change", "match"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
def test_a_corrupted_manifest_is_refused_naming_the_field(manifests, base, change, match):
    manifest = copy.deepcopy(manifests[base])
    change(manifest)
    with pytest.raises(ArtifactError, match=re.escape(match)) as caught:
        check_manifest(manifest, "/some/artifact")
    assert str(caught.value).startswith("/some/artifact: ")


@pytest.mark.parametrize("value", [None, [], [1], "manifest", 1, True, 1.5])
def test_a_manifest_that_is_not_an_object_is_refused(value):
    with pytest.raises(ArtifactError, match="not a compiledopt artifact"):
        check_manifest(value, "here")


def _nested(depth: int) -> List[Any]:
    value: List[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "change",
    [
        put("lr", _nested(100_000)),
        put("training", "deep", _nested(100_000)),
        put("producer", "torch", _nested(100_000)),
        put("transform", "kwargs", "betas", _nested(100_000)),
        put("files", WEIGHTS, _nested(100_000)),
        put("format_version", 10**5000),
        put("lr", 10**5000),
        put("lr", "x" * 1_000_000),
    ],
    ids=[
        "lr-deep",
        "training-deep",
        "producer-deep",
        "kwargs-deep",
        "files-deep",
        "version-huge",
        "lr-huge",
        "lr-long",
    ],
)
def test_deep_huge_and_long_values_are_refused_briefly(manifests, change):
    manifest = copy.deepcopy(manifests["sa"])
    change(manifest)
    with pytest.raises(ArtifactError) as caught:
        check_manifest(manifest, "here")
    assert len(str(caught.value)) < 400


def test_sizes_are_only_type_checked_so_nothing_is_allocated(manifests):
    """A hidden size of 10**9 is a well-typed manifest: checking it builds nothing (the weights'
    header bounds the sizes, where the artifact is loaded)."""
    manifest = _variant(manifests["sa"], transform=mlp(hidden_sizes=[10**9, 10**9]))
    tracemalloc.start()
    begin = time.perf_counter()
    try:
        check_manifest(manifest, "here")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - begin < 1.0
    assert peak < 1 << 20


def test_check_training_copies_json_and_refuses_the_rest():
    training = {"seed": 1, "betas": (0.9, 0.99), "note": None}
    copied = check_training(training)
    assert copied == {"seed": 1, "betas": [0.9, 0.99], "note": None}
    assert copied is not training
    for bad, match in [
        ([1], "must be a JSON object, got list"),
        ({"lr": math.inf}, "must hold only JSON values"),
        ({"t": torch.zeros(1)}, "must hold only JSON values"),
        ({"deep": _nested(100_000)}, "must hold only JSON values"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_training(bad)


# -- any JSON value -----------------------------------------------------------------------------

FIELD_NAMES = [
    "format", "format_version", "kind", "transform", "dtype", "lr", "backends", "files",
    "producer", "training", "bindings", "ranks", "state_names", "name", "shape", "state",
    "kwargs", "layer", "bias", "psd", "step_size", "module", "hidden_sizes", "betas",
    "torchscript", "onnx", "aoti", WEIGHTS, "rule.pt", "rule_rank1.onnx",
]  # fmt: skip
NEAR_VALID = [
    0, 1, 2, 5, 6, -1, 2**63, 10**400, 1e308, -0.0, "", "a" * 64, HEX, "../x", ".",
    "compiledopt-artifact", "bound", "shape_agnostic", "float32", "float64", "float16",
    "kronecker", "KroneckerRNN", "coordinate-mlp", "adam", "learned-step-size", "rule.pt",
    "rule.onnx", "rule_rank0.onnx", "rule_rank5.onnx", "rule_rank1.pt2", WEIGHTS,
]  # fmt: skip
KEYS = st.text(max_size=6) | st.sampled_from(FIELD_NAMES)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(NEAR_VALID),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


def _containers(value: Any) -> List[Any]:
    """Every dict and list inside ``value`` (itself included), depth first."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list)):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


def _mutate(manifest: Dict[str, Any], data: st.DataObject) -> Any:
    """A few random edits: a key or item deleted, a value replaced by random JSON, a key or item
    inserted; or, rarely, the whole manifest replaced."""
    if data.draw(st.integers(0, 30)) == 0:
        return data.draw(JSON)
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(_containers(manifest)))
        action = data.draw(st.sampled_from(["delete", "replace", "insert"]))
        if isinstance(target, dict):
            keys = list(target)
            if action == "insert" or not keys:
                target[data.draw(KEYS)] = data.draw(JSON)
            elif action == "delete":
                del target[data.draw(st.sampled_from(keys))]
            else:
                target[data.draw(st.sampled_from(keys))] = data.draw(JSON)
        else:
            if action == "insert" or not target:
                target.insert(data.draw(st.integers(0, len(target))), data.draw(JSON))
            elif action == "delete":
                del target[data.draw(st.integers(0, len(target) - 1))]
            else:
                target[data.draw(st.integers(0, len(target) - 1))] = data.draw(JSON)
    return manifest


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_json_value_passes_or_raises_artifact_error(manifests, data):
    base = data.draw(st.sampled_from(sorted(manifests)))
    manifest = _mutate(copy.deepcopy(manifests[base]), data)
    try:
        checked = check_manifest(manifest, "fuzzed")
    except ArtifactError as error:
        assert str(error).startswith("fuzzed: ")
        return
    # What passes is usable: the fields the loader reads have their documented shape.
    assert checked["kind"] in ARTIFACT_KINDS
    graphs = [f for files in checked["backends"].values() for f in files]
    assert sorted(checked["files"]) == sorted([WEIGHTS, *graphs])
    if checked["kind"] == "bound":
        assert all(isinstance(s, int) for b in checked["bindings"] for s in b["shape"])
