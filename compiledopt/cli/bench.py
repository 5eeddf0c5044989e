"""The ``compiledopt bench`` command: how fast an artifact's optimizer step is, per backend.

Runs :func:`compiledopt.bench.benchmark` on a built-in model (``--model``) and prints its table:
one optimizer step per backend on 1 thread and on all cores, against ``torch.optim.AdamW``
(foreach and fused), with the roofline fraction. ``--json`` writes the result as JSON and
``--plot`` a bar chart (which needs matplotlib: ``pip install 'compiledopt[bench]'``), each at
the path given; without them the command writes no file. The project's full step-speed suite is
not part of the package: ``python -m benchmarks.step_speed`` in a checkout.
"""

import argparse
import json
import os
from pathlib import Path
from typing import List, TextIO

from compiledopt.apps.paths import check_output_file
from compiledopt.cli.arguments import comma_list, positive_int, positive_int_up_to
from compiledopt.cli.trust import add_trust_options

__all__ = ["MAX_REPEATS", "MODELS", "add_parser", "run"]

#: The most ``--repeats`` and ``--warmup`` steps (each a full optimizer step of the model).
MAX_REPEATS = 100_000

#: The built-in models of ``--model`` (:func:`compiledopt.bench.example_model`).
MODELS = ("mlp", "convnet", "transformer")


def _thread_counts(text: str) -> List[int]:
    """argparse type: comma-separated positive thread counts, at most the machine's cores."""
    counts = [positive_int(item) for item in comma_list(text)]
    if not counts:
        raise argparse.ArgumentTypeError(f"needs at least one thread count, got {text!r}")
    cores = os.cpu_count() or 1
    above = [count for count in counts if count > cores]
    if above:
        raise argparse.ArgumentTypeError(
            f"{above[0]} threads: this machine has {cores} cores (got {text!r})"
        )
    return counts


def _backend_names(text: str) -> List[str]:
    """argparse type: comma-separated backend names (checked against the artifact later)."""
    names = comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one backend, got {text!r}")
    return names


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
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
        type=_thread_counts,
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
    """The ``bench`` options that write the result to files: ``--json`` and ``--plot``."""
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
        help="write a bar chart of step times to PATH (PNG; needs matplotlib: "
        "compiledopt[bench]) (default: no file is written)",
    )


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``bench`` command: check the optional packages, benchmark, print the table, write
    ``--json`` and ``--plot``. A missing package or an artifact that does not load raises (the
    ``compiledopt`` command prints one line and exits 2)."""
    if args.plot:
        from compiledopt.apps.requirements import require

        require("matplotlib", "bench")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, option)  # before minutes of timing
    from compiledopt import bench
    from compiledopt.apps.backends import check_loadable
    from compiledopt.cli.trust import open_trusted

    artifact = open_trusted(args)
    check_loadable(artifact, args.backends or (), "--backends")
    result = bench.benchmark(
        artifact,
        bench.example_model(args.model),
        backends=args.backends,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(f"compiledopt bench: {args.model} model", file=out)
    print(result, file=out)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}", file=out)
    if args.plot:
        _plot(result, args.model, Path(args.plot))
        print(f"wrote {args.plot}", file=out)
    return 0


def _plot(result, model: str, path: Path) -> None:
    """Step time per backend (bars), one group per thread count, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row.backend for row in result.rows))
    counts = list(result.ceilings)
    width = 0.8 / max(1, len(counts))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    for i, count in enumerate(counts):
        times = {r.backend: r.step_ms for r in result.rows if r.threads == count}
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [times.get(n, 0.0) for n in names], width, label=f"{count} thread(s)")
    ax.set_xticks([j + width * (len(counts) - 1) / 2 for j in range(len(names))], names)
    ax.set(yscale="log", ylabel="step (ms, median)", title=f"{result.rule} on {model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
