"""compiledopt.pretrained.hub, offline: from_hub reads a Hugging Face cache laid out as
huggingface_hub's client writes it (blobs, snapshots of links to them, refs) and loads the
artifact through the loader of every local folder; push_to_hub is driven through a recording
stand-in for HfApi."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Dict, List, Optional

import pytest
import torch

from compiledopt import FrozenOptimizer, pretrained
from compiledopt.export import ArtifactError, load_artifact
from compiledopt.pretrained import hub

huggingface_hub = pytest.importorskip("huggingface_hub")

REPO = "someone/learned-opt"
COMMIT = hashlib.sha1(b"first").hexdigest()
PACKAGED = pretrained.path(pretrained.DEFAULT)


def cache_repo(
    cache: Path,
    files: Dict[str, bytes],
    *,
    repo: str = REPO,
    commit: str = COMMIT,
    refs: Optional[Dict[str, str]] = None,
) -> Path:
    """Write ``files`` into ``cache`` as huggingface_hub lays out a downloaded snapshot:
    ``models--owner--name/blobs/<hash>``, ``snapshots/<commit>/<name>`` a relative link to its
    blob, and ``refs/<ref>`` holding the commit hash. Returns the snapshot folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    for ref, target in (refs if refs is not None else {"main": commit}).items():
        (folder / "refs" / ref).write_text(target)  # no newline, as huggingface_hub writes it
    return snapshot


def artifact_files(folder: Path = PACKAGED) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """(Hugging Face cache, compiledopt's copies folder), both empty and inside tmp_path."""
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(tmp_path / "compiledopt"))
    return tmp_path / "hf", tmp_path / "compiledopt" / "hub"


def load(cache: Path, **kwargs):
    return hub.from_hub(REPO, cache_dir=cache, local_files_only=True, **kwargs)


def test_from_hub_loads_the_cached_artifact_as_any_local_one(caches) -> None:
    cache, copies = caches
    files = artifact_files()
    snapshot = cache_repo(cache, {**files, "README.md": b"# a model card\n"})
    assert (snapshot / "rule.pt").is_symlink()  # what the loader alone would refuse
    artifact = load(cache)
    assert artifact.path == copies / "someone--learned-opt" / COMMIT
    assert sorted(os.listdir(artifact.path)) == sorted(files)  # the model card is not copied
    assert all(not (artifact.path / n).is_symlink() for n in files)
    assert artifact.manifest == load_artifact(PACKAGED).manifest
    # As untrusted as any other artifact: data backends only, code with trust_code.
    assert not artifact.code_trusted and not artifact.may_load("torchscript")
    assert load(cache, trust_code=True).may_load("torchscript")
    # It steps exactly as the packaged optimizer it was copied from.
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    grads = [torch.randn_like(p) for p in model.parameters()]
    results = []
    for source in (artifact, PACKAGED):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        FrozenOptimizer(params, source, backend="eager").step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_from_hub_resolves_revisions(caches) -> None:
    cache, _ = caches
    files = artifact_files()
    second = hashlib.sha1(b"second").hexdigest()
    cache_repo(cache, files, refs={"main": second, "v1": COMMIT})
    cache_repo(cache, {**files, "manifest.json": files["manifest.json"] + b"\n"}, commit=second)
    assert load(cache).path.name == second
    assert load(cache, revision="v1").path.name == COMMIT
    assert load(cache, revision=COMMIT).path.name == COMMIT
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        load(cache, revision="v2")


def test_a_tampered_file_in_the_cache_is_refused(caches) -> None:
    cache, copies = caches
    files = artifact_files()
    files["rule_rank1.onnx"] = files["rule_rank1.onnx"][:-1] + b"\0"
    cache_repo(cache, files)
    with pytest.raises(ArtifactError, match=r"checksum mismatch for rule_rank1\.onnx in the Hug"):
        load(cache)
    assert os.listdir(copies / "someone--learned-opt") == []  # no copy, no staging left


def test_a_damaged_copy_is_made_again(caches) -> None:
    cache, _ = caches
    cache_repo(cache, artifact_files())
    first = load(cache)
    (first.path / "weights.safetensors").write_bytes(b"not the weights")
    again = load(cache)
    assert again.path == first.path
    assert again.read("weights.safetensors") == (PACKAGED / "weights.safetensors").read_bytes()


def test_a_link_out_of_the_cache_is_refused(caches, tmp_path) -> None:
    cache, _ = caches
    snapshot = cache_repo(cache, artifact_files())
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((snapshot / "weights.safetensors").read_bytes())
    (snapshot / "weights.safetensors").unlink()
    (snapshot / "weights.safetensors").symlink_to(outside)
    with pytest.raises(ArtifactError, match="leads outside the Hugging Face cache"):
        load(cache)


def test_a_repository_without_an_artifact_is_refused(caches) -> None:
    cache, _ = caches
    cache_repo(cache, {"config.json": b"{}"})
    with pytest.raises(ArtifactError, match=r"holds no manifest\.json: it is not a compiledopt"):
        load(cache)
    cache_repo(cache, {"manifest.json": b'{"format": "something else"}'}, commit="b" * 40)
    with pytest.raises(ArtifactError, match="format"):
        load(cache, revision="b" * 40)


def test_a_signed_artifact_is_trusted_by_its_key(caches, tmp_path) -> None:
    pytest.importorskip("cryptography")
    from compiledopt.export.signing import generate_keypair, sign_artifact

    cache, _ = caches
    folder = tmp_path / "signed"
    shutil.copytree(PACKAGED, folder)
    generate_keypair(tmp_path / "author.pem", tmp_path / "author.pub.pem")
    sign_artifact(folder, tmp_path / "author.pem")
    cache_repo(cache, artifact_files(folder))
    artifact = load(cache, trusted_keys=[tmp_path / "author.pub.pem"])
    assert artifact.code_trusted and artifact.signed_by
    signature = (folder / "signature.json").read_bytes()
    assert (artifact.path / "signature.json").read_bytes() == signature
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    with pytest.raises(ArtifactError, match="not among the trusted keys"):
        load(cache, trusted_keys=[tmp_path / "other.pub.pem"])


@pytest.mark.parametrize("repo_id", ["", "../x", "a/b/c", "a/..", "-a/b", 3, "a b/c"])
def test_a_bad_repo_id_is_refused(caches, repo_id) -> None:
    with pytest.raises(ValueError, match="Invalid repo_id"):
        hub.from_hub(repo_id, cache_dir=caches[0], local_files_only=True)
    with pytest.raises(ValueError, match="Invalid repo_id"):
        hub.push_to_hub(PACKAGED, repo_id)


# -- push_to_hub --------------------------------------------------------------------------------


class RecordingApi:
    """A stand-in for huggingface_hub.HfApi: records the calls; its repository starts with
    ``present`` and create_commit writes the commit into a local cache (``cache``), as a
    download of it would."""

    calls: ClassVar[List[tuple]] = []
    present: ClassVar[List[str]] = []
    cache: ClassVar[Optional[Path]] = None

    def __init__(self, token=None) -> None:
        self.calls.append(("HfApi", token))

    def create_repo(self, repo_id, *, repo_type=None, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def list_repo_files(self, repo_id, *, repo_type=None):
        return list(self.present)

    def create_commit(self, *, repo_id, repo_type, operations, commit_message):
        self.calls.append(("create_commit", repo_id, repo_type, commit_message))
        add, delete = huggingface_hub.CommitOperationAdd, huggingface_hub.CommitOperationDelete
        assert all(isinstance(op, (add, delete)) for op in operations)
        added = {op.path_in_repo: op.path_or_fileobj for op in operations if isinstance(op, add)}
        deleted = [op.path_in_repo for op in operations if isinstance(op, delete)]
        self.calls.append(("added", added))
        self.calls.append(("deleted", deleted))
        if self.cache is not None:
            cache_repo(self.cache, added, repo=repo_id)
        return "commit-info"


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setattr(RecordingApi, "calls", [])
    monkeypatch.setattr(RecordingApi, "present", [])
    monkeypatch.setattr(RecordingApi, "cache", None)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def _recorded(api, what):
    return next(call[1] for call in api.calls if call[0] == what)


def test_push_uploads_exactly_the_manifests_files(api, tmp_path) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(PACKAGED, folder)
    (folder / "notes.txt").write_text("not part of the artifact")
    (folder / "rule.pt2").write_bytes(b"not listed either")
    api.present = ["README.md", "manifest.json", "rule_rank7.onnx", "signature.json"]
    info = hub.push_to_hub(folder, REPO, token="hf_x", private=True, commit_message="v1")
    assert info == "commit-info"
    assert api.calls[0] == ("HfApi", "hf_x")
    assert ("create_repo", REPO, "model", True, True) in api.calls
    assert ("create_commit", REPO, "model", "v1") in api.calls
    added = _recorded(api, "added")
    assert added == artifact_files(PACKAGED)  # the verified bytes, nothing else
    # An earlier artifact's files it lacks are deleted; the model card stays.
    assert _recorded(api, "deleted") == ["rule_rank7.onnx", "signature.json"]


def test_push_refuses_a_folder_that_is_not_a_valid_artifact(api, tmp_path) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(PACKAGED, folder)
    (folder / "rule_rank2.onnx").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for rule_rank2\.onnx"):
        hub.push_to_hub(folder, REPO)
    with pytest.raises(ArtifactError, match="not a directory"):
        hub.push_to_hub(tmp_path / "missing", REPO)
    assert api.calls == []  # nothing reached the Hub


def test_what_is_pushed_is_what_from_hub_loads(api, caches, tmp_path) -> None:
    cache, _ = caches
    api.cache = cache
    hub.push_to_hub(PACKAGED, REPO)
    artifact = load(cache)
    assert {n: artifact.read(n) for n in artifact.manifest["files"]} == {
        n: b for n, b in artifact_files(PACKAGED).items() if n != "manifest.json"
    }


def test_without_huggingface_hub_both_say_what_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # an import of it now fails
    with pytest.raises(ImportError, match=r"pip install 'compiledopt\[hub\]'"):
        hub.from_hub(REPO, cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(ImportError, match=r"pip install 'compiledopt\[hub\]'"):
        hub.push_to_hub(tmp_path / "not-an-artifact", "not a repo id")  # checked first
    assert list(tmp_path.iterdir()) == []


def test_importing_compiledopt_does_not_import_huggingface_hub() -> None:
    code = (
        "import sys, compiledopt, compiledopt.pretrained.hub\n"
        "from compiledopt.pretrained import from_hub, push_to_hub\n"
        "assert 'huggingface_hub' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
