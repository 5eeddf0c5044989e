"""The ``compiledopt export`` command: a ``compiledopt train`` checkpoint -> an artifact."""

import argparse
import time
from typing import List, TextIO

from compiledopt.cli.arguments import comma_list, json_object, positive_float

__all__ = ["add_parser", "run"]


def _ranks(text: str) -> List[int]:
    """argparse type: comma-separated parameter ranks, e.g. ``"1,2"``."""
    try:
        return [int(item) for item in comma_list(text)]
    except ValueError:
        message = f"must be comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


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
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--ranks",
        type=_ranks,
        default="0,1,2,3,4,5",
        help="parameter ranks to export ONNX/AOTI graphs for (default: 0-5)",
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
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``export`` command: checkpoint -> shape-agnostic artifact, its ``training`` block the
    checkpoint's ``metadata["training"]`` updated with ``--training`` (none if both are absent);
    the block's ``lr`` is the manifest's (``--lr``, else the block's, else the inner lr)."""
    import torch

    from compiledopt.export import export_shape_agnostic
    from compiledopt.learned.catalog import build_transform

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    metadata = state.get("metadata") or {}
    spec = metadata.get("transform_spec")
    if not spec:
        raise ValueError(
            f"{args.checkpoint} has no transform spec (write it with `compiledopt train`)"
        )
    transform = build_transform(spec["name"], spec.get("kwargs"))
    transform.load_state_dict(state["transform"])
    backends = comma_list(args.backends)
    training = metadata.get("training")
    if training is not None and not isinstance(training, dict):
        raise ValueError(f"{args.checkpoint}: metadata['training'] is not a dict: {training!r}")
    if training is not None or args.training is not None:
        training = {**(training or {}), **(args.training or {})}
    lr = args.lr
    if lr is None and training and "lr" in training:
        lr = float(training["lr"])
    lr = lr if lr is not None else float(state["config"]["inner_lr"])
    if training is not None:
        training["lr"] = lr
    start = time.perf_counter()
    path = export_shape_agnostic(
        args.output,
        {"kind": "shape_agnostic", "name": spec["name"], "kwargs": spec.get("kwargs", {})},
        transform,
        backends=backends,
        ranks=args.ranks,
        lr=lr,
        overwrite=args.overwrite,
        training=training,
    )
    print(f"wrote {path} ({', '.join(backends)}) in {time.perf_counter() - start:.1f} s", file=out)
    return 0
