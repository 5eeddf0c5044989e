"""The ``compiledopt verify`` command: every backend of an artifact against the eager reference."""

import argparse
import math
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
    """The ``verify`` command: per-backend max relative error; 1 if any exceeds the tolerance.
    Graphs that are code are run only from a trusted artifact (``--trust-code``, a signature by
    a ``--trusted-key``, or a packaged optimizer); the others are listed as not run, and an
    artifact of which no backend could run fails (exit 1): nothing was verified. A backend
    whose directions (or the reference's) are not finite fails whatever the tolerance; a bound
    artifact too large to replay is refused before anything is allocated."""
    from compiledopt.apps.trust import open_trusted
    from compiledopt.export.verify import check_probe_size, verify_artifact

    artifact = open_trusted(args.artifact, args.trust_code, args.trusted_keys)
    check_probe_size(artifact)
    skipped = [b for b in artifact.backends if not artifact.may_load(b)]
    errors = verify_artifact(artifact, steps=args.steps, seed=args.seed)
    print(
        f"{args.artifact}: {args.steps} steps with state carried, vs the eager reference", file=out
    )
    print(f"  {'backend':<12} {'max rel error':>14}  result", file=out)
    failed = False
    for backend, error in errors.items():
        ok = math.isfinite(error) and error <= args.tolerance
        failed |= not ok
        result = "ok" if ok else "FAIL"
        if not math.isfinite(error):
            result += ": non-finite directions (NaN or inf, from it or from the reference)"
        print(f"  {backend:<12} {error:>14.3g}  {result}", file=out)
    for backend in skipped:
        note = "not run: code, from an artifact not trusted (--trust-code, --trusted-key)"
        print(f"  {backend:<12} {'-':>14}  {note}", file=out)
    if not errors:
        print("  no backend was verified: nothing here runs without trusting code", file=out)
        return 1
    return 1 if failed else 0
