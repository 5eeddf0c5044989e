"""The ``compiledopt sign`` command: sign an artifact with an Ed25519 private key."""

import argparse
from typing import TextIO

from compiledopt.apps.trust import sign
from compiledopt.cli.arguments import Commands

__all__ = ["add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the signature of an artifact signed already (without it, refused)",
    )
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``sign`` command: the key checked, then the artifact's files, and the very bytes
    checked signed (:func:`compiledopt.apps.trust.sign`)."""
    key = sign(args.artifact, args.key, "--key", args.overwrite)
    print(f"signed {args.artifact} with key {key} (signature.json)", file=out)
    return 0
