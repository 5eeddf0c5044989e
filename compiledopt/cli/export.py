"""The ``compiledopt export`` command: a ``compiledopt train`` checkpoint -> an artifact."""

import argparse
import time
from typing import List, TextIO

from compiledopt.cli.arguments import comma_list, positive_float

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
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``export`` command: checkpoint -> shape-agnostic artifact."""
    import torch

    from compiledopt.export import export_shape_agnostic
    from compiledopt.learned.catalog import build_transform

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    spec = (state.get("metadata") or {}).get("transform_spec")
    if not spec:
        raise ValueError(
            f"{args.checkpoint} has no transform spec (write it with `compiledopt train`)"
        )
    transform = build_transform(spec["name"], spec.get("kwargs"))
    transform.load_state_dict(state["transform"])
    backends = comma_list(args.backends)
    lr = args.lr if args.lr is not None else float(state["config"]["inner_lr"])
    start = time.perf_counter()
    path = export_shape_agnostic(
        args.output,
        {"kind": "shape_agnostic", "name": spec["name"], "kwargs": spec.get("kwargs", {})},
        transform,
        backends=backends,
        ranks=args.ranks,
        lr=lr,
        overwrite=args.overwrite,
    )
    print(f"wrote {path} ({', '.join(backends)}) in {time.perf_counter() - start:.1f} s", file=out)
    return 0
