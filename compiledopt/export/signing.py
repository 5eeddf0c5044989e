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
from typing import Any, Sequence, Union

from compiledopt.export.layout import MANIFEST, SIGNATURE, sha256
from compiledopt.export.manifest import ArtifactError

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

#: What the signature covers: this prefix, then the manifest's bytes (so a signature made for
#: anything else never verifies as an artifact's).
DOMAIN = b"compiledopt-artifact-signature-v1\n"
_FORMAT = "compiledopt-signature"
#: The largest ``signature.json`` read (a valid one is under 400 bytes).
_MAX_SIGNATURE_BYTES = 4096

KeySource = Union[str, os.PathLike, bytes]


class SigningUnavailableError(ImportError):
    """Signing or verifying needs the ``cryptography`` package, which is not installed."""


def require() -> None:
    """Raise :class:`SigningUnavailableError` unless ``cryptography`` is installed."""
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError:
        raise SigningUnavailableError(
            "signing and verifying artifacts needs the cryptography package "
            "(pip install 'compiledopt[signing]')"
        ) from None


def generate_keypair(private_path: "str | os.PathLike", public_path: "str | os.PathLike") -> str:
    """Write a new Ed25519 key pair as PEM files and return the public key's fingerprint. The
    private key file is created readable by its owner only; neither file may exist already."""
    require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
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
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public)
    return fingerprint(_raw(key.public_key()))


def load_public_key(source: KeySource) -> bytes:
    """The raw 32 bytes of an Ed25519 public key given as a PEM file's path or PEM bytes;
    ``ValueError`` naming the source if it is not one."""
    require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    label = "the given key bytes" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else _read_key_file(source)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{label} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{label} is not an Ed25519 public key")
    return _raw(key)


def fingerprint(raw_public_key: bytes) -> str:
    """A short name of a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    return sha256(raw_public_key)[:16]


def load_private_key(path: "str | os.PathLike") -> Any:
    """The Ed25519 private key in the PEM file ``path`` (unencrypted); ``ValueError`` naming the
    file if it holds anything else."""
    require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
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
        "format": _FORMAT,
        "version": 1,
        "algorithm": "ed25519",
        "public_key": _raw(key.public_key()).hex(),
        "signature": signature.hex(),
    }
    handle, temporary = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=directory)
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(record, indent=2) + "\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, directory / SIGNATURE)
    if _read_manifest(directory) != data:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / SIGNATURE)
        raise ArtifactError(
            f"{directory}: {MANIFEST} changed while it was being signed (signature removed)"
        )
    return fingerprint(_raw(key.public_key()))


def _read_manifest(directory: Path) -> bytes:
    """The bytes of ``directory``'s manifest (read once, at most the loader's limit)."""
    from compiledopt.export.artifact import MAX_MANIFEST_BYTES

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
    from compiledopt.export.artifact import Artifact
    from compiledopt.export.manifest import check_manifest

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        parsed = json.loads(data, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ArtifactError(f"{directory}: {MANIFEST} is not valid JSON: {error}") from None
    manifest = check_manifest(parsed, str(directory))
    artifact = Artifact(directory, manifest)
    for name in manifest["files"]:
        artifact.read(name)  # hashes the file against the digest in ``data``


def verify_manifest(
    manifest: bytes, signature: "bytes | None", trusted_keys: Sequence[bytes], where: str
) -> str:
    """Check that ``signature`` (the bytes of ``signature.json``; ``None`` if absent) is a valid
    signature of ``manifest`` (its bytes) by one of ``trusted_keys`` (raw public keys); return
    that key's fingerprint, or raise :class:`ArtifactError` naming ``where`` and the reason."""
    require()
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature is None:
        raise ArtifactError(f"{where}: not signed (no {SIGNATURE}), and trusted keys were given")
    record = _parse_signature(signature, where)
    public = bytes.fromhex(record["public_key"])
    if public not in set(trusted_keys):
        raise ArtifactError(
            f"{where}: signed by key {fingerprint(public)}, which is not among the trusted keys "
            f"({', '.join(fingerprint(k) for k in trusted_keys)})"
        )
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            bytes.fromhex(record["signature"]), DOMAIN + manifest
        )
    except InvalidSignature:
        raise ArtifactError(
            f"{where}: the signature does not match {MANIFEST} (modified after signing)"
        ) from None
    return fingerprint(public)


def _parse_signature(data: bytes, where: str) -> dict:
    def bad(reason: str) -> ArtifactError:
        return ArtifactError(f"{where}: {SIGNATURE} is malformed ({reason})")

    if len(data) > _MAX_SIGNATURE_BYTES:
        raise bad(f"{len(data)} bytes")
    try:
        record: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"not JSON: {error}") from None
    expected = {"format", "version", "algorithm", "public_key", "signature"}
    if not isinstance(record, dict) or set(record) != expected:
        raise bad(f"fields must be {sorted(expected)}")
    if record["format"] != _FORMAT or record["version"] != 1 or record["version"] is True:
        raise bad(f"format {record['format']!r} version {record['version']!r}")
    if record["algorithm"] != "ed25519":
        raise bad(f"algorithm {record['algorithm']!r}; only 'ed25519' is read")
    for field, digits in (("public_key", 64), ("signature", 128)):
        value = record[field]
        if not isinstance(value, str) or len(value) != digits or not _is_hex(value):
            raise bad(f"{field} must be {digits} lowercase hex digits")
    return record


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _raw(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_key_file(path: "str | os.PathLike") -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"key file not found: {path}")
    if path.stat().st_size > 64 * 1024:
        raise ValueError(f"{path} is not a key file (too large)")
    return path.read_bytes()
