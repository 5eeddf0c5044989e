"""How far an application trusts an artifact it loads, and the keys that sign artifacts.

An artifact's graphs that are code (TorchScript programs, AOTInductor libraries) load only from
a trusted artifact: one the user vouches for (``trust_code``) or one signed by a key the user
names (``trusted_keys``, public keys in PEM; see :mod:`compiledopt.export.signing`). ONNX graphs
are data and load from any artifact; the optimizers packaged with compiledopt are trusted. Every
key is checked before the artifact is opened or the work it would sign is done, each error
naming the option (``--trusted-key``, ``--sign-key``, ...) and the file.
"""

import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from compiledopt.apps.paths import (
    OVERWRITE_HINT,
    check_input_file,
    check_output_file,
    check_work_directory,
)
from compiledopt.apps.requirements import require

if TYPE_CHECKING:
    from compiledopt.export import Artifact

__all__ = [
    "check_private_key",
    "generate_keys",
    "open_trusted",
    "restore_interrupted",
    "sign",
    "trust_options",
]


def trust_options(trust_code: bool, trusted_keys: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``trust_code`` and ``trusted_keys`` for the loaders, the key files checked first."""
    if trusted_keys:
        require("cryptography", "signing")
        from compiledopt.export import signing

        for key in trusted_keys:
            check_input_file(key, "--trusted-key")
            try:
                signing.load_public_key(key)
            except ValueError as error:
                raise ValueError(f"--trusted-key {key}: {error}") from None
    keys = list(trusted_keys) if trusted_keys else None
    return {"trust_code": bool(trust_code), "trusted_keys": keys}


def restore_interrupted(path: str) -> None:
    """If ``path`` does not exist because an export replacing it was killed between its two
    renames, put the old artifact back (:func:`compiledopt.export.writer.recover`; nothing
    happens otherwise, nor while that export is still running)."""
    if isinstance(path, str) and path and not os.path.lexists(path):
        from compiledopt.export.writer import recover

        recover(path)


def open_trusted(
    artifact: str, trust_code: bool = False, trusted_keys: Optional[Sequence[str]] = None
) -> "Artifact":
    """The artifact (directory or packaged name) ``artifact``, opened with the trust given (an
    interrupted replace undone first: :func:`restore_interrupted`)."""
    from compiledopt.pretrained import open_artifact

    options = trust_options(trust_code, trusted_keys)
    restore_interrupted(artifact)
    return open_artifact(artifact, **options)


def check_private_key(path: str, option: str) -> str:
    """``path`` if it holds an unencrypted Ed25519 private key in PEM; else an error naming
    ``option`` (checked before the work that the key would sign)."""
    check_input_file(path, option)
    require("cryptography", "signing")
    from compiledopt.export import signing

    try:
        signing.load_private_key(path)
    except ValueError as error:
        raise ValueError(f"{option} {error}") from None
    return path


def sign(artifact: str, key: str, option: str = "--key", overwrite: bool = False) -> str:
    """Sign the artifact directory ``artifact`` with the private key ``key`` (named ``option``);
    returns the key's fingerprint. An artifact signed already is refused unless ``overwrite``
    (which replaces its signature). The key is checked, then the artifact: its manifest read
    once, every file's checksum checked against those bytes, and those same bytes signed
    (:func:`compiledopt.export.signing.sign_artifact`), so a file changed since the export, or
    while signing, is never signed."""
    restore_interrupted(artifact)
    if not os.path.isdir(artifact):
        raise NotADirectoryError(f"{artifact}: not an artifact directory")
    check_private_key(key, option)
    check_work_directory(artifact, "artifact")
    from compiledopt.export import signing

    signature = os.path.join(artifact, signing.SIGNATURE)
    if os.path.lexists(signature) and not os.path.isdir(signature) and not overwrite:
        raise FileExistsError(
            f"{artifact}: signed already ({signing.SIGNATURE} exists; {OVERWRITE_HINT})"
        )

    return signing.sign_artifact(artifact, key)


def generate_keys(private: str, public: str) -> str:
    """Write a new Ed25519 key pair, the ``private`` key readable by its owner only, both PEM;
    returns its fingerprint. Neither file may exist (each checked first, named by the option
    ``--private`` or ``--public``), and they must differ."""
    check_output_file(private, "--private", exists_ok=False)
    check_output_file(public, "--public", exists_ok=False)
    if os.path.abspath(private) == os.path.abspath(public):
        raise ValueError(f"--public {public}: the same file as --private")
    require("cryptography", "signing")
    from compiledopt.export import signing

    for path in (private, public):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return signing.generate_keypair(private, public)
