"""The ``compiledopt convert`` command: published Celo2 weights (PyLO layouts) -> an artifact."""

import argparse
import os
import time
from typing import TextIO

from compiledopt.apps.paths import check_output_directory
from compiledopt.cli.arguments import Commands, add_artifact_options, json_object
from compiledopt.cli.text import wrote_artifact

__all__ = ["LAYOUTS", "add_parser", "run"]

#: The ``--layout`` values (``compiledopt.export.convert.LAYOUTS`` and ``auto``; not imported
#: here: command modules import only light modules at their top level).
LAYOUTS = ("auto", "Celo2MLP", "CELO2MLP")


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``convert`` subparser."""
    parser = commands.add_parser(
        "convert",
        help="convert published Celo2 weights (a PyLO state_dict) into an artifact",
        description="Read a Celo2 network in one of PyLO's PyTorch state_dict layouts "
        "(Celo2MLP, CELO2MLP), map its weights exactly onto compiledopt's Celo2 and write a "
        "self-describing artifact (check it with `compiledopt verify`). Any key, shape or "
        "value the layout does not account for is refused.",
    )
    parser.add_argument(
        "checkpoint",
        help="a .pt/.pth/.bin file (read with weights_only), a .safetensors file, or a folder "
        "as the Hugging Face Hub stores a model (model.safetensors, config.json)",
    )
    parser.add_argument("--output", required=True, help="the artifact directory to create")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="the state_dict's layout (default: auto, from its keys)",
    )
    parser.add_argument(
        "--activation",
        choices=("relu", "tanh"),
        default=None,
        help="the network's activation (default: the config.json's, else relu)",
    )
    parser.add_argument(
        "--options",
        type=json_object,
        default=None,
        metavar="JSON",
        help="other Celo2 keywords as a JSON object, e.g. '{\"orthogonalize\": false}' for "
        "celo2-base weights (default: those of the layout's PyLO optimizer)",
    )
    parser.add_argument(
        "--routes",
        type=json_object,
        default=None,
        metavar="JSON",
        help='the rule of each parameter role, e.g. \'{"embedding": "adam"}\' (default: '
        "the layout's PyLO optimizer's)",
    )
    add_artifact_options(
        parser,
        ["torchscript", "onnx"],
        [0, 1, 2],
        1e-3,
        "all three; TorchScript serves every rank",
        "1e-3",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``convert`` command: the output folder and the input checked first, then the
    weights read, mapped and exported (:func:`compiledopt.export.convert.convert_celo2`)."""
    check_output_directory(args.output, "--output", args.overwrite)
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint}: No such file or directory")
    from compiledopt.export.convert import convert_celo2

    start = time.perf_counter()
    path = convert_celo2(
        args.checkpoint,
        args.output,
        args.layout,
        activation=args.activation,
        options=args.options,
        routes=args.routes,
        backends=list(args.backends),
        ranks=list(args.ranks),
        lr=args.lr,
        overwrite=args.overwrite,
    )
    print(wrote_artifact(path, args.backends, time.perf_counter() - start), file=out)
    return 0
