"""Ed25519 signatures of artifacts: who may vouch for graphs that are code.

An artifact's ``manifest.json`` lists the SHA-256 digest of every other file, and the loader
hashes the exact bytes it loads, so a signature over the manifest's bytes covers the whole
artifact. The signature is stored beside it in ``signature.json``::

    {"format": "compiledopt-signature", "version": 1, "algorithm": "ed25519",
     "public_key": "<64 hex digits>", "signature": "<128 hex digits>"}

and verified only against public keys the user names (``trusted_keys``): the key inside the
file says which key signed, never whom to trust. Keys are PEM files (PKCS#8 private,
SubjectPublicKeyInfo public) made by :func:`generate_keypair` or by any tool that writes
Ed25519 keys (``openssl genpkey -algorithm ed25519``). The cryptography comes from the
``cryptography`` package
(``pip install compiledopt[signing]``); nothing else in compiledopt needs it.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compiledopt.export.artifact import MAX_MANIFEST_BYTES, Artifact
from compiledopt.export.layout import MANIFEST, SIGNATURE, parse_manifest
from compiledopt.export.manifest import ArtifactError, check_manifest
from compiledopt.export.signatures import (
    DOMAIN,
    FORMAT,
    SigningUnavailableError,
    fingerprint,
    load_public_key,
    raw_public_key,
    read_key_file,
    require,
    verify_manifest,
)

__all__ = [
    "SigningUnavailableError",
    "fingerprint",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "require",
    "sign_artifact",
    "verify_manifest",
]


def generate_keypair(private_path: "str | os.PathLike", public_path: "str | os.PathLike") -> str:
    """Write a new Ed25519 key pair as PEM files and return the public key's fingerprint. The
    private key file is created readable by its owner only; neither file may exist already, nor
    may they be one path (the public key would replace the private one). If the public key
    cannot be written, the private key file just created is removed (and the error raised)."""
    require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    if os.path.abspath(private_path) == os.path.abspath(public_path):
        raise ValueError(f"{public_path}: the same path as the private key {private_path}")
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    written = []
    try:
        for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
    except BaseException:  # no half pair: a private key whose public key was never written
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return fingerprint(raw_public_key(key.public_key()))


def load_private_key(path: "str | os.PathLike") -> Any:
    """The Ed25519 private key in the PEM file ``path`` (unencrypted); ``ValueError`` naming the
    file if it holds anything else."""
    require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(read_key_file(path), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def sign_artifact(directory: "str | os.PathLike", private_key: "str | os.PathLike") -> str:
    """Sign the artifact in ``directory`` with the Ed25519 private key in the PEM file
    ``private_key``: writes (atomically) ``signature.json`` and returns the key's fingerprint.

    ``manifest.json`` is read once; those bytes are parsed and checked against the schema, every
    file they list is hashed and compared with the digest they give, and the same bytes are
    signed: a manifest (or a file) swapped while this runs is never what gets signed. If the
    manifest on disk no longer holds those bytes once the signature is written, the signature
    is removed and :class:`ArtifactError` raised. Sign after the artifact is complete; any later
    change to a file breaks the signature.

    Raises:
        ArtifactError: no manifest, a manifest the loader would refuse, a listed file missing or
            not matching its digest, or a manifest changed while it was signed.
        ValueError: ``private_key`` is not an Ed25519 private key.
    """
    directory = Path(directory)
    key = load_private_key(private_key)
    data = _read_manifest(directory)
    _check_files(directory, data)
    signature = key.sign(DOMAIN + data)
    record = {
        "format": FORMAT,
        "version": 1,
        "algorithm": "ed25519",
        "public_key": raw_public_key(key.public_key()).hex(),
        "signature": signature.hex(),
    }
    target = directory / SIGNATURE
    if target.is_dir() and not target.is_symlink():  # os.replace would name the temporary file
        raise ArtifactError(f"{directory}: {SIGNATURE} is a directory, not a signature file")
    handle, temporary = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=directory)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(record, indent=2) + "\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:  # never leave the temporary file in the artifact (nor Ctrl-C's)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if _read_manifest(directory) != data:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / SIGNATURE)
        raise ArtifactError(
            f"{directory}: {MANIFEST} changed while it was being signed (signature removed)"
        )
    return fingerprint(raw_public_key(key.public_key()))


def _read_manifest(directory: Path) -> bytes:
    """The bytes of ``directory``'s manifest (read once, at most the loader's limit)."""
    file = directory / MANIFEST
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: missing {MANIFEST} (not an artifact)") from None
    except IsADirectoryError:
        raise ArtifactError(f"{directory}: {MANIFEST} is a directory (not an artifact)") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{directory}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def _check_files(directory: Path, data: bytes) -> None:
    """Check the manifest ``data`` as the loader does (strict JSON, the schema) and every file
    it lists against the digest it gives; :class:`ArtifactError` names the problem."""

    manifest = check_manifest(parse_manifest(data, directory), str(directory))
    artifact = Artifact(directory, manifest)
    for name in manifest["files"]:
        artifact.read(name)  # hashes the file against the digest in ``data``
