"""The ``compiledopt meta-descent`` command: a learned optimizer meta-trained online, against SGD.

The run itself is :func:`compiledopt.apps.meta_descent.run_demo`: a small MLP learns a synthetic,
ill-conditioned regression task with a LearnableOptimizer whose transform is meta-trained online,
and with plain SGD from the same initialisation; the held-out loss of both is printed.
"""

import argparse
import os
import sys
from typing import TextIO

from compiledopt.apps.meta_descent import DEFAULT_STEPS, TRANSFORMS, run_demo
from compiledopt.cli.arguments import Commands, positive_int_up_to, random_seed

__all__ = ["MAX_STEPS", "add_parser", "run"]

#: The most ``--steps`` the command takes (each a training step of both optimizers).
MAX_STEPS = 1_000_000


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``meta-descent`` subparser."""
    parser = commands.add_parser(
        "meta-descent",
        help="meta-train a learned optimizer online on a synthetic task and compare it with SGD",
        description=(
            "Train a small MLP on a synthetic regression task (no downloads) with a "
            "LearnableOptimizer whose transform is meta-trained online by Adam, and with plain "
            "SGD at the same learning rate from the same initialisation; print the held-out "
            "loss of both."
        ),
    )
    parser.add_argument(
        "--steps",
        type=positive_int_up_to(MAX_STEPS),
        default=DEFAULT_STEPS,
        help=f"training steps of each optimizer, at most {MAX_STEPS:,} (default: {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--seed",
        type=random_seed,
        default=0,
        help="seed of the task, the init and the minibatches (default: 0)",
    )
    parser.add_argument(
        "--transform",
        choices=list(TRANSFORMS),
        default="kronecker",
        help="the learnable transform (default: kronecker)",
    )
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``meta-descent`` command: :func:`run_demo` with the command's options."""
    try:
        run_demo(steps=args.steps, seed=args.seed, transform=args.transform, out=out)
    except BrokenPipeError:
        # The reader went away (``compiledopt meta-descent | head``): stop quietly, as Python's
        # docs recommend, so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0
