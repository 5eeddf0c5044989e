"""The ``compiledopt bench`` command: how fast an artifact's optimizer step is, per backend.

Runs :func:`compiledopt.bench.benchmark` on a built-in model (``--model``) and prints its table:
one optimizer step per backend on 1 thread and on all cores, against ``torch.optim.AdamW``
(foreach and fused), with the roofline fraction. ``--json`` writes the result as JSON and
``--plot`` a bar chart (which needs matplotlib: ``pip install 'compiledopt[bench]'``), each at
the path given; without them the command writes no file. The project's full step-speed suite is
not part of the package: ``python -m benchmarks.step_speed`` in a checkout.
"""

import argparse
from typing import List, TextIO

from compiledopt.apps.bench import MODELS
from compiledopt.cli.arguments import (
    Commands,
    add_trust_options,
    comma_list,
    first_repeated,
    positive_int_up_to,
    thread_counts,
)

__all__ = ["MAX_REPEATS", "MODELS", "add_parser", "run"]

#: The most ``--repeats`` and ``--warmup`` steps (each a full optimizer step of the model).
MAX_REPEATS = 100_000


def _backend_names(text: str) -> List[str]:
    """argparse type: comma-separated distinct backend names (checked against the artifact
    later)."""
    names = comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one backend, got {text!r}")
    repeated = first_repeated(names)
    if repeated is not None:
        raise argparse.ArgumentTypeError(f"backend {repeated!r} repeated in {text!r}")
    return names


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``bench`` subparser."""
    parser = commands.add_parser(
        "bench",
        help="time one optimizer step of an artifact per backend against AdamW",
        description="Time one FrozenOptimizer step of ARTIFACT on a built-in model, on each "
        "backend, at 1 thread and at all cores, against torch.optim.AdamW (foreach and fused): "
        "the median of repeated steps after warm-up, the ratio to each AdamW, and the fraction "
        "of the roofline (peak FLOP/s and bandwidth measured in the same run). The project's "
        "full suite is `python -m benchmarks.step_speed` in a checkout.",
    )
    parser.add_argument(
        "artifact",
        help="an artifact directory (`compiledopt export`) or a packaged optimizer's name; a "
        "bound artifact only fits the model it was exported for",
    )
    parser.add_argument(
        "--model", choices=MODELS, default="mlp", help="the built-in model (default: mlp)"
    )
    parser.add_argument(
        "--backends",
        type=_backend_names,
        default=None,
        help="comma-separated FrozenOptimizer backends, or compiled-bf16 (compiled with bfloat16 "
        "state) (default: eager, compiled and every backend the artifact has)",
    )
    parser.add_argument(
        "--threads",
        type=thread_counts,
        default=None,
        help="comma-separated thread counts (default: 1 and all cores)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int_up_to(MAX_REPEATS),
        default=20,
        help=f"timed steps per backend, at most {MAX_REPEATS:,} (default: 20)",
    )
    parser.add_argument(
        "--warmup",
        type=positive_int_up_to(MAX_REPEATS),
        default=3,
        help=f"warm-up steps before timing, at most {MAX_REPEATS:,} (default: 3)",
    )
    _add_output_options(parser)
    add_trust_options(parser)
    return parser


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options on the files it writes: ``--json``, ``--plot``, ``--overwrite``."""
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write the result as JSON to PATH (default: no file is written)",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="write a bar chart of step times to PATH, in the image format its extension names "
        "(.png, .svg, .pdf...; needs matplotlib: compiledopt[bench]) (default: no file is "
        "written)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --json and --plot if they exist"
    )


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``bench`` command: :func:`compiledopt.apps.bench.run_bench` with the command's
    options. A missing package or an artifact that does not load raises (the ``compiledopt``
    command prints one line and exits 2)."""
    from compiledopt.apps.bench import run_bench

    run_bench(
        args.artifact,
        args.model,
        backends=args.backends,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        json_path=args.json,
        plot_path=args.plot,
        trust_code=args.trust_code,
        trusted_keys=args.trusted_keys,
        out=out,
        overwrite=args.overwrite,
    )
    return 0
