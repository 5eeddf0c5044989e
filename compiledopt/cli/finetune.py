"""The ``compiledopt finetune`` command: fine-tuning with a frozen learned optimizer, against AdamW.

The job itself is :func:`compiledopt.apps.finetune.run_finetune`: an MLP pre-trained with AdamW
on digits 0-4, fine-tuned on digits 5-9 with the artifact's FrozenOptimizer on each backend and
with AdamW at the best learning rate of a sweep. The digits need scikit-learn (the ``tasks``
extra), checked before the artifact is loaded.
"""

import argparse
from typing import TextIO

from compiledopt.apps.finetune import MAX_STEPS, run_finetune
from compiledopt.apps.requirements import require
from compiledopt.apps.trust import open_trusted
from compiledopt.cli.arguments import (
    Commands,
    add_trust_options,
    backend_list,
    positive_float,
    positive_int_up_to,
    random_seed,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``finetune`` subparser."""
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a pre-trained model with an artifact's frozen optimizer vs AdamW",
        description="Pre-train an MLP on digits 0-4, fine-tune it on digits 5-9 with the "
        "artifact's FrozenOptimizer on each backend and with AdamW (best of an lr sweep); print "
        "loss, accuracy and step time.",
    )
    parser.add_argument("artifact", help="an artifact directory or a packaged optimizer's name")
    parser.add_argument(
        "--steps",
        type=positive_int_up_to(MAX_STEPS),
        default=200,
        help=f"fine-tuning steps of each run, at most {MAX_STEPS:,} (default: 200)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated FrozenOptimizer backends (default: eager, "
        "compiled and every backend in the artifact)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="the frozen optimizer's lr (default: the artifact's)",
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="in [0, 2**31) (default: 0)")
    add_trust_options(parser)
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``finetune`` command: :func:`run_finetune` with the command's options."""
    backends = backend_list(args.backends) if args.backends is not None else None
    require("sklearn", "tasks")  # before the artifact is loaded
    artifact = open_trusted(args.artifact, args.trust_code, args.trusted_keys)
    run_finetune(artifact, args.steps, backends=backends, lr=args.lr, seed=args.seed, out=out)
    return 0
