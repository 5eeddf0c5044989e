"""Verifying Ed25519 signatures of artifacts (what loading a signed artifact needs).

A signature covers :data:`DOMAIN` followed by the bytes of ``manifest.json``, which lists the
SHA-256 digest of every other file, so it vouches for the whole artifact. It is stored beside the
manifest in ``signature.json`` and verified only against public keys the user names: the key
inside the file says which key signed, never whom to trust. Making keys and signing are in
:mod:`compiledopt.export.signing`. The cryptography comes from the ``cryptography`` package
(``pip install compiledopt[signing]``).
"""

import os
from pathlib import Path
from typing import Any, Sequence, Union

from compiledopt._validation import strict_json
from compiledopt.export.layout import MANIFEST, SIGNATURE, sha256
from compiledopt.export.manifest import ArtifactError

__all__ = [
    "DOMAIN",
    "FORMAT",
    "KeySource",
    "SigningUnavailableError",
    "fingerprint",
    "load_public_key",
    "raw_public_key",
    "read_key_file",
    "require",
    "verify_manifest",
]

#: What the signature covers: this prefix, then the manifest's bytes (so a signature made for
#: anything else never verifies as an artifact's).
DOMAIN = b"compiledopt-artifact-signature-v1\n"
#: The ``format`` field of ``signature.json``.
FORMAT = "compiledopt-signature"
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


def load_public_key(source: KeySource) -> bytes:
    """The raw 32 bytes of an Ed25519 public key given as a PEM file's path or PEM bytes;
    ``ValueError`` naming the source if it is not one."""
    require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    label = "the given key bytes" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else read_key_file(source)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{label} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{label} is not an Ed25519 public key")
    return raw_public_key(key)


def fingerprint(raw_public_key: bytes) -> str:
    """A short name of a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    return sha256(raw_public_key)[:16]


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
        record: Any = strict_json(data)
    except ValueError as error:
        raise bad(f"not JSON: {error}") from None
    expected = {"format", "version", "algorithm", "public_key", "signature"}
    if not isinstance(record, dict) or set(record) != expected:
        raise bad(f"fields must be {sorted(expected)}")
    if record["format"] != FORMAT or type(record["version"]) is not int or record["version"] != 1:
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


def raw_public_key(public_key: Any) -> bytes:
    """The raw 32 bytes of a ``cryptography`` Ed25519 public key object."""
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_key_file(path: "str | os.PathLike") -> bytes:
    """The bytes of a key file (refusing a missing or implausibly large one, and one whose path
    the operating system cannot look up: ``ValueError`` naming it and why)."""
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as error:  # a name too long: is_file passes over only a missing path
        raise ValueError(f"{path} cannot be read as a key file ({error.strerror})") from error
    if not found:
        raise FileNotFoundError(f"key file not found: {path}")
    if path.stat().st_size > 64 * 1024:
        raise ValueError(f"{path} is not a key file (too large)")
    return path.read_bytes()
