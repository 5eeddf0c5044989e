"""The ``compiledopt sign`` command: sign an artifact with an Ed25519 private key."""

import argparse
import os
from typing import TextIO

from compiledopt.apps.paths import check_work_directory
from compiledopt.cli.trust import check_private_key, restore_interrupted

__all__ = ["add_parser", "run"]


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``sign`` subparser."""
    parser = commands.add_parser(
        "sign",
        help="sign an artifact, so that --trusted-key lets its code graphs load",
        description="Check an artifact's files against its manifest, then sign the manifest "
        "with an Ed25519 private key (PEM, e.g. from `compiledopt keygen`): writes "
        "signature.json into the artifact. Whoever names the matching public key with "
        "--trusted-key may then run its TorchScript and AOTInductor graphs.",
    )
    parser.add_argument("artifact", help="an artifact directory (`compiledopt export`)")
    parser.add_argument("--key", required=True, metavar="PRIVATE_PEM", help="the private key")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``sign`` command: the key, then the artifact: its manifest read once, every file's
    checksum checked against those bytes, and those same bytes signed
    (:func:`compiledopt.export.signing.sign_artifact`), so a file changed since the export, or
    while signing, is never signed."""
    from compiledopt.export import signing

    restore_interrupted(args.artifact)
    if not os.path.isdir(args.artifact):
        raise NotADirectoryError(f"{args.artifact}: not an artifact directory")
    check_private_key(args.key, "--key")
    check_work_directory(args.artifact, "artifact")
    key = signing.sign_artifact(args.artifact, args.key)
    print(f"signed {args.artifact} with key {key} (signature.json)", file=out)
    return 0
