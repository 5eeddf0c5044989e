"""The ``compiledopt`` command line: ``compiledopt demo`` (or ``python -m compiledopt demo``)."""

import argparse
import os
import sys
from typing import Optional, Sequence

from compiledopt.demo import DEFAULT_STEPS, TRANSFORMS, run_demo

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    """argparse type: a positive integer, or an error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compiledopt`` command."""
    parser = argparse.ArgumentParser(
        prog="compiledopt",
        description="Learned optimizers written once, run anywhere.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="meta-train a learned optimizer online on a synthetic task and compare it with SGD",
        description=(
            "Train a small MLP on a synthetic regression task (no downloads) with a "
            "LearnableOptimizer whose transform is meta-trained online by Adam, and with plain "
            "SGD at the same learning rate from the same initialisation; print the held-out "
            "loss of both."
        ),
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        help=f"training steps of each optimizer (default: {DEFAULT_STEPS})",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the task, the init and the minibatches (default: 0)",
    )
    demo.add_argument(
        "--transform",
        choices=list(TRANSFORMS),
        default="kronecker",
        help="the learnable transform (default: kronecker)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``compiledopt`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    Invalid arguments exit through argparse (``SystemExit`` with status 2 and a usage message).
    """
    args = build_parser().parse_args(None if argv is None else list(argv))
    if args.command == "demo":
        try:
            run_demo(steps=args.steps, seed=args.seed, transform=args.transform, out=sys.stdout)
        except BrokenPipeError:
            # The reader went away (``compiledopt demo | head``): stop quietly, as Python's docs
            # recommend, so that the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects the rest
