"""The ``compiledopt keygen`` command: a new Ed25519 key pair for signing artifacts."""

import argparse
from typing import TextIO

from compiledopt.apps.trust import generate_keys
from compiledopt.cli.arguments import Commands

__all__ = ["add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``keygen`` subparser."""
    parser = commands.add_parser(
        "keygen",
        help="make an Ed25519 key pair to sign artifacts with (needs compiledopt[signing])",
        description="Write a new Ed25519 private key (readable by its owner only: keep it "
        "secret) and its public key, both PEM. Sign artifacts with the private key "
        "(`compiledopt sign`, `compiledopt export --sign-key`); whoever loads them names the "
        "public key with --trusted-key.",
    )
    parser.add_argument("--private", required=True, metavar="PATH", help="the private key file")
    parser.add_argument("--public", required=True, metavar="PATH", help="the public key file")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``keygen`` command: check both paths (neither may exist), then write the pair
    (:func:`compiledopt.apps.trust.generate_keys`)."""
    key = generate_keys(args.private, args.public)
    print(f"wrote {args.private} (private: keep it secret) and {args.public}", file=out)
    print(f"key fingerprint {key}", file=out)
    return 0
