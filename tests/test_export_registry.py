"""The export backend registry, optional backend dependencies, and export leaving its input alone.

* every registered backend carries the whole :class:`Backend` interface, ``register`` refuses one
  that lacks a member (or repeats a name or an extension), ``get`` names an unknown backend and
  the known ones, and ``BACKENDS`` is the registry's list;
* a backend defined outside the package works end to end once registered (export, load, rank
  dispatch);
* ``import compiledopt.export`` and a TorchScript export work with onnx, onnxruntime, onnxscript
  and onnx_ir unimportable (in a subprocess); a backend whose modules are missing fails before
  any export work, naming what to install;
* ``export_shape_agnostic(dtype=float64)`` converts a copy, never the caller's transform;
* the one identity-dedup helper, and no private names imported across ``compiledopt.export``.
"""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import compiledopt.export
from compiledopt._identity import unique_by_identity
from compiledopt.export import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    build_shape_agnostic,
    export_shape_agnostic,
    load_artifact,
    torchscript,
)
from compiledopt.export import backend as registry
from compiledopt.export import writer as writer_module
from compiledopt.export.rule import ModelRule

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "export" / "coordinate-mlp"
SPEC: Dict[str, Any] = {
    "kind": "shape_agnostic",
    "name": "coordinate-mlp",
    "kwargs": {"hidden_sizes": [8]},
}
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript", "onnx_ir")
MEMBERS = ("name", "extension", "per_rank", "carries_code", "fused", "requires", "install")
METHODS = ("available", "save", "load")


class _Toy(Backend):
    """A backend from outside the package: TorchScript files under another name and extension,
    written once per rank so that the artifact's rank dispatch is exercised."""

    name = "toy"
    extension = ".toy"
    per_rank = True
    carries_code = True
    requires = ()

    def __init__(self) -> None:
        self.saved: List[str] = []

    def save(self, rule, example, path, dynamic) -> None:
        self.saved.append(path)
        torchscript.save(rule, example, path, dynamic)

    def load(self, path):
        return torchscript.load(path)


class _Missing(_Toy):
    name = "missing"
    extension = ".missing"
    requires = ("compiledopt_test_no_such_module",)
    install = "compiledopt-test-extra"


@pytest.fixture()
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


def _transform() -> torch.nn.Module:
    torch.manual_seed(0)
    transform = build_shape_agnostic(SPEC)
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    return transform


# -- the registry ------------------------------------------------------------------------------


def test_backends_is_the_registry():
    assert BACKENDS == registry.names() == ("torchscript", "onnx", "aoti")
    assert compiledopt.export.BACKENDS == BACKENDS


@pytest.mark.parametrize("name", BACKENDS)
def test_every_registered_backend_has_the_interface(name):
    backend = registry.get(name)
    assert isinstance(backend, Backend) and backend.name == name
    assert isinstance(backend.extension, str) and backend.extension.startswith(".")
    for flag in ("per_rank", "carries_code", "fused"):
        assert isinstance(getattr(backend, flag), bool)
    assert isinstance(backend.requires, tuple) and isinstance(backend.install, str)
    for method in METHODS:
        assert callable(getattr(backend, method))
    assert backend.available() is True  # this environment has every backend installed


def test_backend_properties():
    ts, onnx, aoti = (registry.get(n) for n in ("torchscript", "onnx", "aoti"))
    assert (ts.extension, onnx.extension, aoti.extension) == (".pt", ".onnx", ".pt2")
    assert (ts.per_rank, onnx.per_rank, aoti.per_rank) == (False, True, True)
    assert (ts.carries_code, onnx.carries_code, aoti.carries_code) == (True, False, True)
    assert (ts.fused, onnx.fused, aoti.fused) == (False, False, True)
    assert set(onnx.requires) == set(ONNX_MODULES) and "onnx" in onnx.install


def test_get_names_an_unknown_backend():
    with pytest.raises(ValueError, match=r"Unknown backend: 'tensorrt'.*'torchscript'"):
        registry.get("tensorrt")
    with pytest.raises(ValueError, match="Unknown backend"):
        load_artifact(SHIPPED).runner("tensorrt")


@pytest.mark.parametrize("member", MEMBERS + METHODS)
def test_register_refuses_a_backend_missing_a_member(scratch_registry, member):
    backend = _Toy()
    setattr(backend, member, None)  # shadows the class's attribute or method
    with pytest.raises(TypeError, match=member):
        scratch_registry.register(backend)
    assert "toy" not in scratch_registry.names()


def test_register_refuses_a_class_without_a_name(scratch_registry):
    class Nameless(Backend):
        extension = ".nameless"
        per_rank = False
        carries_code = True
        save = staticmethod(torchscript.save)
        load = staticmethod(torchscript.load)

    with pytest.raises(TypeError, match="'name'"):
        scratch_registry.register(Nameless())


def test_register_refuses_duplicates_and_reserved_names(scratch_registry):
    with pytest.raises(TypeError, match="Backend instance"):
        scratch_registry.register(torchscript)  # the module, not its BACKEND
    with pytest.raises(ValueError, match="'torchscript' is already registered"):
        scratch_registry.register(torchscript.BACKEND)
    same_extension = _Toy()
    same_extension.extension = ".onnx"
    with pytest.raises(ValueError, match=r"writes \.onnx files, as 'onnx'"):
        scratch_registry.register(same_extension)
    for bad in ("eager", "compiled", "auto", "Toy", "a,b", ""):
        named = _Toy()
        named.name = bad
        with pytest.raises(ValueError, match="Invalid backend name"):
            scratch_registry.register(named)
    assert scratch_registry.names() == BACKENDS


def test_a_registered_backend_works_end_to_end(scratch_registry, tmp_path):
    toy = scratch_registry.register(_Toy())
    assert scratch_registry.names() == (*BACKENDS, "toy")
    transform = _transform()
    path = export_shape_agnostic(tmp_path / "a", SPEC, transform, backends=["toy"], ranks=(1, 2))
    assert sorted(Path(p).name for p in toy.saved) == ["rule_rank1.toy", "rule_rank2.toy"]
    artifact = load_artifact(path, trust_code=True)  # the toy backend's graphs are code
    assert artifact.manifest["backends"] == {"toy": ["rule_rank1.toy", "rule_rank2.toy"]}
    run = artifact.runner("toy")
    for shape in [(5,), (4, 3)]:
        grad, param = torch.randn(shape), torch.randn(shape)
        state = transform.init_state(param)
        direction, _ = run(grad, param, state, torch.tensor(0))
        expected, _ = transform.update(grad, param, state, torch.tensor(0))
        torch.testing.assert_close(direction, expected, rtol=1e-6, atol=1e-7)


# -- optional dependencies ---------------------------------------------------------------------


def test_missing_requirements_fail_before_any_export_work(scratch_registry, tmp_path):
    missing = scratch_registry.register(_Missing())
    assert missing.available() is False
    assert missing.missing() == ["compiledopt_test_no_such_module"]
    with pytest.raises(BackendUnavailableError, match="pip install compiledopt-test-extra"):
        export_shape_agnostic(
            tmp_path / "a", SPEC, _transform(), backends=["torchscript", "missing"]
        )
    assert missing.saved == [] and not (tmp_path / "a").exists()
    assert not (tmp_path / "a.partial").exists()


def test_onnx_export_without_onnx_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    onnx = registry.get("onnx")
    assert onnx.available() is False and onnx.missing() == ["onnxscript"]
    with pytest.raises(BackendUnavailableError, match="pip install onnx onnxruntime onnxscript"):
        export_shape_agnostic(tmp_path / "a", SPEC, _transform(), backends=["onnx"])
    assert not (tmp_path / "a").exists()
    with pytest.raises(BackendUnavailableError, match="onnxscript"):
        export_shape_agnostic(tmp_path / "b", SPEC, _transform())  # every backend by default
    # Running an ONNX graph needs onnxruntime only.
    assert onnx.missing(loading=True) == []
    artifact = load_artifact(SHIPPED)
    param = torch.ones(3)
    state = artifact.transforms()[0].init_state(param)
    direction, _ = artifact.runner("onnx")(torch.ones(3), param, state, torch.tensor(0))
    assert direction.shape == (3,)


def test_running_onnx_without_onnxruntime_names_what_to_install(monkeypatch):
    artifact = load_artifact(SHIPPED)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r"cannot load: onnxruntime is not install"):
        artifact.runner("onnx")


def test_producer_reads_versions_without_importing():
    assert writer_module._installed_version("compiledopt-no-such-dist", "no_such") == (
        "not installed"
    )
    producer = writer_module._producer()
    assert list(producer) == ["compiledopt", "torch", "onnx", "onnxruntime", "python"]


_WITHOUT_ONNX = textwrap.dedent(
    """
    import json, sys
    for name in sys.argv[2:]:
        sys.modules[name] = None  # import raises ImportError
    import torch
    import compiledopt.export as export
    from compiledopt.export import build_shape_agnostic, export_shape_agnostic, load_artifact

    spec = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
    transform = build_shape_agnostic(spec)
    path = export_shape_agnostic(sys.argv[1], spec, transform, backends=["torchscript"])
    artifact = load_artifact(path, trust_code=True)
    param = torch.randn(4, 3)
    direction, _ = artifact.runner("torchscript")(
        torch.randn(4, 3), param, transform.init_state(param), torch.tensor(0)
    )
    try:
        export_shape_agnostic(sys.argv[1] + "-onnx", spec, transform, backends=["onnx"])
        error = None
    except export.BackendUnavailableError as caught:
        error = str(caught)
    print(json.dumps({
        "available": {n: export.backend.get(n).available() for n in export.BACKENDS},
        "producer": artifact.manifest["producer"],
        "shape": list(direction.shape),
        "error": error,
    }))
    """
)


def test_torchscript_export_without_onnx_installed(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ONNX, str(tmp_path / "a"), *ONNX_MODULES],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["available"] == {"torchscript": True, "onnx": False, "aoti": True}
    assert result["shape"] == [4, 3]
    # Versions come from package metadata, which an unimportable module still has.
    assert set(result["producer"]) == {"compiledopt", "torch", "onnx", "onnxruntime", "python"}
    assert "onnx, onnxruntime, onnxscript, onnx_ir are not installed" in result["error"]


# -- export leaves its input alone --------------------------------------------------------------


def test_float64_export_leaves_the_callers_transform_unchanged(tmp_path):
    transform = _transform()
    before = {k: v.clone() for k, v in transform.state_dict().items()}
    dtypes = {k: v.dtype for k, v in before.items()}
    path = export_shape_agnostic(
        tmp_path / "a", SPEC, transform, backends=["torchscript"], dtype=torch.float64
    )
    after = transform.state_dict()
    assert {k: v.dtype for k, v in after.items()} == dtypes == {k: torch.float32 for k in before}
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # bitwise: same dtype, same values
    artifact = load_artifact(path)
    assert artifact.dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in artifact.transforms()[0].state_dict().values())


# -- helpers and layering ----------------------------------------------------------------------


def test_unique_by_identity():
    a, b, c = torch.zeros(2), torch.zeros(2), torch.ones(2)  # a and b equal, not the same
    unique, index = unique_by_identity([a, b, a, c, b])
    assert len(unique) == 3 and all(u is v for u, v in zip(unique, [a, b, c]))
    assert index == [0, 1, 0, 2, 1]
    assert unique_by_identity(iter([c, c])) == ([c], [0, 0])
    assert unique_by_identity([]) == ([], [])


def test_model_rule_freezes_a_shared_transform_once():
    shared, other = _transform(), _transform()
    rule = ModelRule([shared, other, shared], [6, 6, 6])
    assert len(rule.transforms) == 2 and rule.index == [0, 1, 0]


def test_no_private_names_imported_across_the_export_package():
    offenders = []
    for file in sorted((ROOT / "compiledopt" / "export").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compiledopt"):
                offenders += [f"{file.name}: {a.name}" for a in node.names if a.name[0] == "_"]
    assert offenders == []
