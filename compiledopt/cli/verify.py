"""The ``compiledopt verify`` command: every backend of an artifact against the eager reference."""

import argparse
from typing import TextIO

from compiledopt.cli.arguments import (
    Commands,
    add_trust_options,
    positive_float,
    positive_int_up_to,
    random_seed,
)

__all__ = ["MAX_STEPS", "add_parser", "run"]

#: The most ``--steps`` (``compiledopt.export.verify.MAX_STEPS``, not imported here: command
#: modules import only light modules at their top level).
MAX_STEPS = 100_000


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``verify`` subparser."""
    parser = commands.add_parser(
        "verify",
        help="replay random gradients through every backend and the eager reference",
        description="Check every backend of an artifact against the eager reference rebuilt "
        "from its weights, over several steps with state carried; exit 1 above --tolerance.",
    )
    parser.add_argument("artifact", help="an artifact directory or a packaged optimizer's name")
    parser.add_argument(
        "--steps",
        type=positive_int_up_to(MAX_STEPS),
        default=10,
        help=f"steps replayed, with state carried, in [1, {MAX_STEPS:,}] (default: 10)",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-5,
        help="largest relative error accepted (default: 1e-5: float32 rounding of the rule "
        "computed in another order, which Newton-Schulz iterations amplify to about 1e-6); a "
        "NaN or infinite direction, from a backend or from the reference, always fails",
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="in [0, 2**31) (default: 0)")
    add_trust_options(parser)
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``verify`` command: :func:`compiledopt.apps.verify.run_verify`, its per-backend
    largest relative error printed; 1 if any exceeds the tolerance or is not finite, or if no
    backend could run (nothing was verified)."""
    from compiledopt.apps.verify import run_verify

    passed = run_verify(
        args.artifact,
        args.steps,
        args.seed,
        args.tolerance,
        trust_code=args.trust_code,
        trusted_keys=args.trusted_keys,
        out=out,
    )
    return 0 if passed else 1
