"""Exported graphs carry the rule and its signature, not the exporting machine: no file path,
stack trace or source record of the machine that wrote them, and they still compute the rule."""

import io
import zipfile

import pytest
import torch

import compiledopt
from compiledopt.export import torchscript
from compiledopt.export.rule import TensorRule
from compiledopt.transforms.baselines import Adam

PACKAGE_FOLDER = str(compiledopt.__file__).rsplit("/", 2)[0]


def _example(transform):
    param = torch.randn(7, generator=torch.Generator().manual_seed(0))
    return param, param, transform.init_state(param), torch.tensor(0)


def test_a_torchscript_rule_names_no_file_of_the_exporting_machine(tmp_path):
    transform = Adam()
    path = tmp_path / "rule.pt"
    torchscript.save(TensorRule(transform), _example(transform), str(path), True)
    data = path.read_bytes()
    assert PACKAGE_FOLDER.encode() not in data
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names and not [n for n in names if n.endswith(".debug_pkl")]
    direction, state = torchscript.load(str(path))(*_example(transform))
    want, want_state = transform.update(*_example(transform))
    assert torch.equal(direction, want)
    assert all(torch.equal(a, b) for a, b in zip(state, want_state))


def test_the_packaged_graphs_name_no_file():
    from compiledopt import pretrained

    folder = pretrained.path("normalized-mlp")
    graphs = [folder / "rule.pt", *sorted(folder.glob("*.onnx"))]
    assert len(graphs) == 7
    for graph in graphs:
        data = graph.read_bytes()
        assert b"debug_pkl" not in data and b"stack_trace" not in data, graph.name
        assert PACKAGE_FOLDER.encode() not in data and b"/home/" not in data, graph.name


def test_an_onnx_graph_names_no_file_of_the_exporting_machine(tmp_path):
    """The exporter's per-node metadata (stack traces with the exporting machine's file paths,
    FX node names) is dropped; the model's signature stays."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compiledopt.export import onnx as onnx_backend
    from compiledopt.export.signature import SIGNATURE_KEY

    transform = Adam()
    param = torch.randn(7)
    path = tmp_path / "rule.onnx"
    onnx_backend.save(
        TensorRule(transform),
        (param, param, transform.init_state(param), torch.tensor(0)),
        str(path),
        True,
    )
    data = path.read_bytes()
    assert PACKAGE_FOLDER.encode() not in data
    model = onnx.load_from_string(data)
    assert [p.key for p in model.metadata_props] == [SIGNATURE_KEY]
    assert all(len(node.metadata_props) == 0 and not node.doc_string for node in model.graph.node)
    direction, _ = onnx_backend.load(str(path))(
        param, param, transform.init_state(param), torch.tensor(0)
    )
    want, _ = transform.update(param, param, transform.init_state(param), torch.tensor(0))
    torch.testing.assert_close(direction, want)
