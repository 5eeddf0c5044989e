"""The ``bench`` command: the step-speed benchmark (:mod:`compiledopt.bench`), which parses its
own options (``compiledopt bench --help``)."""

import argparse
from typing import TextIO


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``bench`` subparser: every argument after ``bench`` goes to the benchmark."""
    bench = commands.add_parser(
        "bench",
        help="the step-speed benchmark (options: compiledopt bench --help)",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    return bench


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run the benchmark with ``args.args``; it prints its own report."""
    from compiledopt import bench

    bench.main(args.args)
    return 0
