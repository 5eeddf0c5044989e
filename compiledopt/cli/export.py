"""The ``compiledopt export`` command: a ``compiledopt train`` checkpoint -> an artifact."""

import argparse
import time
from typing import TextIO

from compiledopt.apps.export import RANKS
from compiledopt.apps.paths import check_output_directory
from compiledopt.cli.arguments import (
    int_list,
    json_object,
    names_of,
    non_negative_int,
    positive_float,
)

__all__ = ["RANKS", "add_parser", "run"]


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--backends",
        type=names_of(BACKENDS, "backend"),
        default=list(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--ranks",
        type=int_list(non_negative_int, "rank", limit=max(RANKS)),
        default=list(RANKS),
        help="parameter ranks to export ONNX/AOTI graphs for, out of 0-5 (default: all)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="suggested learning rate recorded in the manifest "
        "(default: the checkpoint's inner lr)",
    )
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
    check_output_directory(args.output, "--output", args.overwrite)
    sign_key = getattr(args, "sign_key", None)
    if sign_key is not None:
        from compiledopt.cli.trust import check_private_key

        check_private_key(sign_key, "--sign-key")
    from compiledopt.apps.export import export_checkpoint

    backends = list(args.backends)
    start = time.perf_counter()
    path = export_checkpoint(
        args.checkpoint,
        args.output,
        backends,
        ranks=args.ranks,
        lr=args.lr,
        training=args.training,
        overwrite=args.overwrite,
    )
    print(f"wrote {path} ({', '.join(backends)}) in {time.perf_counter() - start:.1f} s", file=out)
    if sign_key is not None:
        from compiledopt.export import signing

        print(f"signed it with key {signing.sign_artifact(path, sign_key)}", file=out)
    return 0
