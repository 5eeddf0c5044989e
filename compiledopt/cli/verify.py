"""The ``compiledopt verify`` command: every backend of an artifact against the eager reference."""

import argparse
from typing import TextIO

from compiledopt.cli.arguments import positive_float, positive_int, random_seed
from compiledopt.cli.trust import add_trust_options

__all__ = ["add_parser", "run"]


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``verify`` subparser."""
    parser = commands.add_parser(
        "verify",
        help="replay random gradients through every backend and the eager reference",
        description="Check every backend of an artifact against the eager reference rebuilt "
        "from its weights, over several steps with state carried; exit 1 above --tolerance.",
    )
    parser.add_argument("artifact", help="an artifact directory or a packaged optimizer's name")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-6,
        help="largest relative error accepted (default: 1e-6)",
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="in [0, 2**31) (default: 0)")
    add_trust_options(parser)
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``verify`` command: per-backend max relative error; 1 if any exceeds the tolerance.
    Graphs that are code are run only from a trusted artifact (``--trust-code``, a signature by
    a ``--trusted-key``, or a packaged optimizer); the others are listed as not run, and an
    artifact of which no backend could run fails (exit 1): nothing was verified."""
    from compiledopt.cli.trust import open_trusted
    from compiledopt.export.verify import verify_artifact

    artifact = open_trusted(args)
    skipped = [b for b in artifact.backends if not artifact.may_load(b)]
    errors = verify_artifact(artifact, steps=args.steps, seed=args.seed)
    print(
        f"{args.artifact}: {args.steps} steps with state carried, vs the eager reference", file=out
    )
    print(f"  {'backend':<12} {'max rel error':>14}  result", file=out)
    failed = False
    for backend, error in errors.items():
        ok = error <= args.tolerance
        failed |= not ok
        print(f"  {backend:<12} {error:>14.3g}  {'ok' if ok else 'FAIL'}", file=out)
    for backend in skipped:
        note = "not run: code, from an artifact not trusted (--trust-code, --trusted-key)"
        print(f"  {backend:<12} {'-':>14}  {note}", file=out)
    if not errors:
        print("  no backend was verified: nothing here runs without trusting code", file=out)
        return 1
    return 1 if failed else 0
