"""How far the commands that load an artifact trust it: ``--trust-code`` and ``--trusted-key``.

An artifact's graphs that are code (TorchScript programs, AOTInductor libraries) load only from
a trusted artifact: one the user vouches for (``--trust-code``) or one signed by a key the user
names (``--trusted-key PUBLIC_PEM``, repeatable; see :mod:`compiledopt.export.signing`). ONNX
graphs are data and load from any artifact; the optimizers packaged with compiledopt are trusted.
The keys are checked before the artifact is opened, each error naming the option and the file.
"""

import argparse
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from compiledopt.apps.paths import check_input_file
from compiledopt.apps.requirements import require

if TYPE_CHECKING:
    from compiledopt.export import Artifact

__all__ = [
    "add_trust_options",
    "check_private_key",
    "open_trusted",
    "restore_interrupted",
    "trust_options",
]


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--trust-code`` and ``--trusted-key`` to a command that loads an artifact."""
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the artifact's graphs that are code (TorchScript, AOTInductor) load: only for "
        "an artifact whose source you trust (ONNX graphs load without it)",
    )
    parser.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        action="append",
        default=None,
        metavar="PUBLIC_PEM",
        help="an Ed25519 public key (PEM file, e.g. from `compiledopt keygen`): the artifact "
        "must be signed by one of the keys given, and its code graphs then load (repeatable)",
    )


def trust_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``trust_code`` and ``trusted_keys`` for the loaders, the key files checked first."""
    keys: Optional[Sequence[str]] = args.trusted_keys
    if keys:
        require("cryptography", "signing")
        from compiledopt.export import signing

        for key in keys:
            check_input_file(key, "--trusted-key")
            try:
                signing.load_public_key(key)
            except ValueError as error:
                raise ValueError(f"--trusted-key {key}: {error}") from None
    return {"trust_code": bool(args.trust_code), "trusted_keys": list(keys) if keys else None}


def restore_interrupted(path: str) -> None:
    """If ``path`` does not exist because an export replacing it was killed between its two
    renames, put the old artifact back (:func:`compiledopt.export.writer.recover`; nothing
    happens otherwise, nor while that export is still running)."""
    import os

    if isinstance(path, str) and path and not os.path.lexists(path):
        from compiledopt.export.writer import recover

        recover(path)


def open_trusted(args: argparse.Namespace) -> "Artifact":
    """The artifact (directory or packaged name) ``args.artifact``, opened with the trust the
    command line gives it (an interrupted replace undone first: :func:`restore_interrupted`)."""
    from compiledopt.pretrained import open_artifact

    options = trust_options(args)
    restore_interrupted(args.artifact)
    return open_artifact(args.artifact, **options)


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
