"""An AOTInductor package compiled for an instruction set this CPU lacks is refused before its
native code is loaded (running it would kill the process), and ``auto`` passes it over."""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch._inductor import cpu_vec_isa

import compiledopt as co
from compiledopt.export import ArtifactError, load_artifact
from compiledopt.export.aoti import check_runnable, package_cpu_isa
from compiledopt.runtime import frozen_optimizer

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "coordinate-mlp"


def _foreign_isa() -> str:
    """An instruction set Inductor knows but this CPU cannot run."""
    here = {str(i).lower() for i in cpu_vec_isa.valid_vec_isa_list()}
    foreign = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if str(i).lower() not in here]
    if not foreign:
        pytest.skip("this CPU runs every instruction set Inductor knows")
    return foreign[0]


def _retarget(package: Path, isa: str) -> None:
    """Rewrite the ISA a package records (what a package built on another machine holds)."""
    rewritten = package.with_suffix(".tmp")
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(rewritten, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("wrapper_metadata.json"):
                data = json.dumps({**json.loads(data), "AOTI_CPU_ISA": isa.upper()}).encode()
            target.writestr(info, data)
    rewritten.replace(package)


@pytest.fixture()
def foreign(tmp_path):
    """The shipped artifact with its rank-1 AOTI package marked as built for a foreign CPU,
    checksums recomputed as its author would."""
    isa = _foreign_isa()
    artifact = tmp_path / "artifact"
    shutil.copytree(SHIPPED, artifact)
    _retarget(artifact / "rule_rank1.pt2", isa)
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    return artifact, isa


def test_shipped_packages_run_here():
    for rank in range(6):
        package = SHIPPED / f"rule_rank{rank}.pt2"
        assert package_cpu_isa(str(package)) is not None
        check_runnable(str(package))
    load_artifact(SHIPPED).check_runnable("aoti")


def test_a_package_for_another_cpu_is_refused_before_loading(foreign):
    artifact, isa = foreign
    assert package_cpu_isa(str(artifact / "rule_rank1.pt2")) == isa.lower()
    with pytest.raises(ArtifactError, match=f"compiled for {isa.upper()}"):
        load_artifact(artifact, trust_code=True).runner("aoti")
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ArtifactError, match="re-export"):
        co.FrozenOptimizer(model.parameters(), artifact, backend="aoti", trust_code=True)


def test_auto_passes_over_a_package_for_another_cpu(foreign, monkeypatch):
    artifact, _ = foreign
    model = torch.nn.Linear(4, 3)
    # As if AOTInductor had been measured fastest here.
    order = ("aoti", "compiled", "onnx", "torchscript", "eager")
    monkeypatch.setattr(frozen_optimizer, "auto_order", lambda *_: order)
    assert co.FrozenOptimizer(model.parameters(), artifact, trust_code=True).backend == "compiled"
    assert co.FrozenOptimizer(model.parameters(), SHIPPED, trust_code=True).backend == "aoti"
    # Native code is never chosen from an artifact nobody vouched for.
    assert co.FrozenOptimizer(model.parameters(), SHIPPED).backend == "compiled"


def test_an_archive_that_is_not_a_package(tmp_path):
    bad = tmp_path / "rule_rank1.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an AOTInductor package"):
        check_runnable(str(bad))
