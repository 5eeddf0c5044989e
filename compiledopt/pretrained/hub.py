"""Learned optimizers on the Hugging Face Hub: :func:`from_hub` downloads an artifact,
:func:`push_to_hub` publishes one.

Both need the optional ``huggingface_hub`` package (``pip install 'compiledopt[hub]'``); importing
this module does not import it, and a call without it raises :class:`ImportError` before doing
anything else.

An artifact on the Hub is a model repository whose top level holds the artifact's files
(``manifest.json``, the weights, the graphs, and ``signature.json`` if it is signed). It is as
untrusted as any other artifact: :func:`from_hub` loads it with
:func:`~compiledopt.export.load_artifact`, the loader of every local folder (the manifest's
schema, every file's SHA-256, the signature with ``trusted_keys``; nothing is unpickled and no
string is evaluated), and its graphs that are code run only with ``trust_code=True`` or a
signature by a trusted key.

Where the files go: ``huggingface_hub`` downloads into its cache (``cache_dir``, by default
``$HF_HUB_CACHE``), whose snapshot folders hold symbolic links to the downloaded blobs, and the
loader reads only regular files. So :func:`from_hub` copies the files it verified from the
snapshot (each within the loader's size caps) into a folder of regular files,
``hub/<owner>--<name>/<commit>`` under ``$COMPILEDOPT_CACHE`` (default
``$XDG_CACHE_HOME/compiledopt``, else ``~/.cache/compiledopt``: the folder of the backend
timings), and loads that folder. The returned :class:`~compiledopt.export.Artifact` names it, so
the artifact can also be passed by path (``compiledopt verify``, ``FrozenOptimizer``). A later
call reuses the copy when the snapshot's manifest and signature are byte for byte the copy's
(the manifest pins every other file by its SHA-256, checked at every load).
"""

import itertools
import os
import re
import shutil
import tempfile
import uuid
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

from compiledopt.cache import cache_root
from compiledopt.export import Artifact, ArtifactError, load_artifact
from compiledopt.export.artifact import MAX_FILE_BYTES, MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES
from compiledopt.export.layout import MANIFEST, SIGNATURE, parse_manifest, read_regular, sha256
from compiledopt.export.manifest import check_manifest

__all__ = ["copies_folder", "from_hub", "push_to_hub"]

#: A repository id: ``name`` or ``owner/name``, as the Hub spells them.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: Files of an earlier artifact that :func:`push_to_hub` removes from the repository when the
#: artifact it uploads has none of that name (other files, such as a model card, stay).
_ARTIFACT_FILE = re.compile(r"(manifest\.json|signature\.json|weights\.safetensors|rule[^/]*)")


def _huggingface_hub(caller: str) -> ModuleType:
    try:
        return import_module("huggingface_hub")
    except ImportError as error:
        raise ImportError(
            f"compiledopt.pretrained.hub.{caller} needs the huggingface_hub package: "
            "pip install 'compiledopt[hub]'"
        ) from error


def _check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ValueError(
            f"Invalid repo_id: {repo_id!r} (a Hugging Face model repository, 'owner/name')"
        )
    return repo_id


def copies_folder() -> Path:
    """The folder that holds :func:`from_hub`'s copies of downloaded artifacts (not created
    here): ``hub`` under ``$COMPILEDOPT_CACHE``, else ``$XDG_CACHE_HOME/compiledopt``, else
    ``~/.cache/compiledopt``."""
    return cache_root() / "hub"


def from_hub(
    repo_id: str,
    revision: Optional[str] = None,
    *,
    cache_dir: "Optional[str | os.PathLike]" = None,
    local_files_only: bool = False,
    token: "Optional[str | bool]" = None,
    trust_code: bool = False,
    trusted_keys: "Optional[Sequence[str | os.PathLike | bytes]]" = None,
) -> Artifact:
    """The artifact in the Hub repository ``repo_id``, downloaded and verified.

    The manifest is downloaded first, then exactly the files it lists (and ``signature.json``,
    if the repository has one), all at the commit the manifest came from; other files of the
    repository are not downloaded. They are copied as regular files into :func:`copies_folder`
    and loaded from there by :func:`~compiledopt.export.load_artifact` (see the module doc).

    Args:
        repo_id (str): the repository, ``"owner/name"``.
        revision (str, optional): a branch, tag or commit hash. (default: the main branch)
        cache_dir (str or PathLike, optional): ``huggingface_hub``'s cache folder.
            (default: ``huggingface_hub``'s, ``$HF_HUB_CACHE``)
        local_files_only (bool, optional): use only what the cache holds; never go online.
            (default: False)
        token (str or bool, optional): the Hub token, as ``huggingface_hub`` takes it.
            (default: the one you are logged in with, if any)
        trust_code (bool, optional): allow the artifact's graphs that are code (TorchScript,
            AOTInductor) to load. Only for a repository you trust. (default: False)
        trusted_keys (list, optional): Ed25519 public keys; the artifact must be signed by one
            of them, which trusts its code. (default: None)

    Raises:
        ImportError: ``huggingface_hub`` is not installed (checked first).
        ValueError: ``repo_id`` is not a repository id.
        ArtifactError: the repository holds no artifact, or the artifact is invalid (a file
            missing, modified or not a regular file in the cache, a bad manifest or signature).
        huggingface_hub's errors: the repository or revision does not exist, the network is
            unreachable, or (``local_files_only``) the cache does not hold it.
    """
    hub = _huggingface_hub("from_hub")
    _check_repo_id(repo_id)
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str or None, not {type(revision).__name__}")
    where = repo_id if revision is None else f"{repo_id} at {revision}"
    common: Dict[str, Any] = dict(
        repo_id=repo_id,
        repo_type="model",
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        local_files_only=bool(local_files_only),
        token=token,
    )
    snapshot = Path(
        hub.snapshot_download(revision=revision, allow_patterns=[MANIFEST, SIGNATURE], **common)
    )
    commit = snapshot.name
    if not _COMMIT.fullmatch(commit):
        raise ArtifactError(f"{where}: the snapshot {snapshot} is not named by a commit hash")
    where = f"{repo_id} at {commit}"
    manifest = _read_cached(snapshot, MANIFEST, MAX_MANIFEST_BYTES)
    if manifest is None:
        raise ArtifactError(f"{where} holds no {MANIFEST}: it is not a compiledopt artifact")
    digests = check_manifest(parse_manifest(manifest, where), where)["files"]
    # The same commit: the files are the ones this manifest lists, whatever the branch does now.
    snapshot = Path(
        hub.snapshot_download(revision=commit, allow_patterns=sorted(digests), **common)
    )
    firsts = {MANIFEST: manifest}
    signature = _read_cached(snapshot, SIGNATURE, MAX_SIGNATURE_BYTES)
    if signature is not None:
        firsts[SIGNATURE] = signature
    target = copies_folder() / repo_id.replace("/", "--") / commit
    reused = _holds(target, firsts)
    if not reused:
        _replace(target, firsts, _Files(snapshot, digests, where))
    try:
        return load_artifact(target, trust_code=trust_code, trusted_keys=trusted_keys)
    except ArtifactError:
        if not reused:
            raise
    # The earlier copy was damaged since it was made: copy the snapshot again, once.
    _replace(target, firsts, _Files(snapshot, digests, where), damaged=True)
    return load_artifact(target, trust_code=trust_code, trusted_keys=trusted_keys)


class _Files:
    """The listed files of a cache snapshot, read one at a time, each checked against the
    manifest's SHA-256 before it is copied (so a damaged cache never leaves a copy)."""

    def __init__(self, snapshot: Path, digests: Dict[str, str], where: str) -> None:
        self.snapshot, self.digests, self.where = snapshot, digests, where

    def __iter__(self) -> Iterator[Tuple[str, bytes]]:
        for name, digest in sorted(self.digests.items()):
            data = _read_cached(self.snapshot, name, MAX_FILE_BYTES)
            if data is None:
                raise ArtifactError(f"{self.where}: missing file {name} (listed in its {MANIFEST})")
            if sha256(data) != digest:
                raise ArtifactError(
                    f"{self.where}: checksum mismatch for {name} in the Hugging Face cache "
                    f"({self.snapshot / name}: modified or truncated)"
                )
            yield name, data


def _read_cached(snapshot: Path, name: str, limit: int) -> Optional[bytes]:
    """The bytes of ``name`` in a cache snapshot (``<cache>/models--o--n/snapshots/<commit>``),
    ``None`` if absent. The snapshot's entry may be a link (as huggingface_hub makes it); what it
    resolves to must be a regular file inside the cache, read with the loader's checks."""
    entry = snapshot / name
    if not os.path.lexists(entry):
        return None
    real = Path(os.path.realpath(entry))
    cache = Path(os.path.realpath(snapshot)).parents[2]
    if not real.is_relative_to(cache):
        raise ArtifactError(f"{entry} leads outside the Hugging Face cache {cache} (to {real})")
    return read_regular(real.parent, real.name, limit)


def _holds(target: Path, firsts: Dict[str, bytes]) -> bool:
    """Whether ``target`` holds byte-identical copies of the manifest and the signature in
    ``firsts`` (or, like the snapshot, no signature)."""
    try:
        if not target.is_dir():
            return False
        manifest = read_regular(target, MANIFEST, MAX_MANIFEST_BYTES)
        signature = read_regular(target, SIGNATURE, MAX_SIGNATURE_BYTES)
    except ArtifactError:
        return False  # not a regular file, or too large: not a copy this module made
    return manifest == firsts[MANIFEST] and signature == firsts.get(SIGNATURE)


def _replace(
    target: Path,
    firsts: Dict[str, bytes],
    files: Iterable[Tuple[str, bytes]],
    damaged: bool = False,
) -> None:
    """Write ``firsts`` (the manifest and signature: name -> bytes) and ``files`` as the folder
    ``target``: written whole beside it, then renamed into place. An earlier folder there is
    moved aside first, then removed, unless it holds the same manifest and signature (another
    process made the same copy meanwhile) and is not known to be ``damaged``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        for name, data in itertools.chain(firsts.items(), files):
            with open(staging / name, "xb") as file:
                file.write(data)
        try:
            os.rename(staging, target)
            return
        except OSError:
            if not damaged and _holds(target, firsts):
                return
        retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex}"
        if os.path.lexists(target):
            os.rename(target, retired)
        os.rename(staging, target)
        if retired.exists():
            shutil.rmtree(retired)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def push_to_hub(
    artifact_dir: "str | os.PathLike",
    repo_id: str,
    *,
    token: "Optional[str | bool]" = None,
    private: bool = False,
    commit_message: str = "Upload a compiledopt artifact",
) -> Any:
    """Upload the artifact in ``artifact_dir`` to the Hub model repository ``repo_id`` (created
    if it does not exist), in one commit.

    The folder is loaded and verified first (:func:`~compiledopt.export.load_artifact`), and
    exactly its files are uploaded: ``manifest.json``, the files the manifest lists (the bytes
    that were verified) and ``signature.json`` if it is signed; nothing else in the folder.
    Files of an earlier artifact in the repository that this one does not have (a graph for a
    rank it lacks, an old signature) are deleted in the same commit; other files (a model card)
    are left alone.

    Args:
        artifact_dir (str or PathLike): the artifact's folder.
        repo_id (str): the repository, ``"owner/name"``.
        token (str or bool, optional): the Hub token, as ``huggingface_hub`` takes it.
            (default: the one you are logged in with)
        private (bool, optional): create the repository private (an existing one keeps its
            visibility). (default: False)
        commit_message (str, optional): the commit's message.

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload (``.commit_url``, ``.oid``).

    Raises:
        ImportError: ``huggingface_hub`` is not installed (checked first).
        ValueError: ``repo_id`` is not a repository id.
        ArtifactError: ``artifact_dir`` is not a valid artifact (nothing is uploaded).
    """
    hub = _huggingface_hub("push_to_hub")
    _check_repo_id(repo_id)
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"Invalid commit_message: {commit_message!r}")
    artifact = load_artifact(artifact_dir)
    folder = artifact.path
    manifest = read_regular(folder, MANIFEST, MAX_MANIFEST_BYTES)
    if manifest is None or parse_manifest(manifest, str(folder)) != artifact.manifest:
        raise ArtifactError(f"{folder}: {MANIFEST} changed while it was read")
    uploads = {MANIFEST: manifest}
    for name in sorted(artifact.manifest["files"]):
        uploads[name] = artifact.read(name)
    signature = read_regular(folder, SIGNATURE, MAX_SIGNATURE_BYTES)
    if signature is not None:
        uploads[SIGNATURE] = signature
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=bool(private), exist_ok=True)
    present = api.list_repo_files(repo_id, repo_type="model")
    stale = sorted(f for f in present if _ARTIFACT_FILE.fullmatch(f) and f not in uploads)
    operations = [
        hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
        for name, data in uploads.items()
    ] + [hub.CommitOperationDelete(path_in_repo=name) for name in stale]
    return api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=operations,
        commit_message=commit_message,
    )
