"""The ``compiledopt export`` command: a ``compiledopt train`` checkpoint -> an artifact."""

import argparse
import time
from typing import TextIO

from compiledopt.apps.export import RANKS
from compiledopt.apps.paths import check_output_directory
from compiledopt.cli.arguments import Commands, add_artifact_options, json_object
from compiledopt.cli.text import wrote_artifact

__all__ = ["RANKS", "add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``export`` subparser."""
    from compiledopt.export import BACKENDS

    parser = commands.add_parser(
        "export",
        help="export a meta-trained checkpoint as an artifact (TorchScript, ONNX, AOTInductor)",
        description="Freeze the transform of a `compiledopt train` checkpoint and write a "
        "self-describing artifact directory with one graph per backend.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by `compiledopt train`")
    parser.add_argument("--output", required=True, help="the artifact directory to create")
    add_artifact_options(parser, BACKENDS, RANKS, None, "all", "the checkpoint's inner lr")
    parser.add_argument(
        "--training",
        type=json_object,
        default=None,
        metavar="JSON",
        help="provenance for the manifest's training block, a JSON object merged over the "
        "checkpoint's metadata['training'] (task_family, estimator, meta_steps, wall_time_s, "
        "cpu_count, seed, config, schedule…)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--sign-key",
        default=None,
        metavar="PRIVATE_PEM",
        help="sign the artifact with this Ed25519 private key (`compiledopt keygen`), so that "
        "--trusted-key with its public key lets its code graphs load",
    )
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``export`` command: checkpoint -> shape-agnostic artifact, its ``training`` block the
    checkpoint's ``metadata["training"]`` updated with ``--training`` (none if both are absent);
    the block's ``lr`` is the manifest's (``--lr``, else the block's, else the inner lr).
    Everything is checked (the output folder, the signing key, the checkpoint, its weights)
    before the export; with ``--sign-key`` the artifact is signed once written."""
    from compiledopt.apps.export import export_checkpoint
    from compiledopt.apps.trust import check_private_key

    check_output_directory(args.output, "--output", args.overwrite)
    if args.sign_key is not None:
        check_private_key(args.sign_key, "--sign-key")
    start = time.perf_counter()
    path = export_checkpoint(
        args.checkpoint,
        args.output,
        args.backends,
        ranks=args.ranks,
        lr=args.lr,
        training=args.training,
        overwrite=args.overwrite,
    )
    print(wrote_artifact(path, args.backends, time.perf_counter() - start), file=out)
    if args.sign_key is not None:
        from compiledopt.export import signing

        print(f"signed it with key {signing.sign_artifact(path, args.sign_key)}", file=out)
    return 0
