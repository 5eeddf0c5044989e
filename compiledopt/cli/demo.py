"""The ``compiledopt demo`` command: the main job end to end on built-in defaults.

The pipeline itself is :func:`compiledopt.apps.pipeline.run_pipeline`: meta-train a NormalizedMLP
briefly, export it, verify every backend, and fine-tune a pre-trained MLP with the shipped default
optimizer against AdamW. The checkpoint and the artifact go to ``--workdir``, by default
``<output root>/demo`` (:func:`compiledopt.apps.paths.output_root`), checked before any work. The
default folder is the demo's own: a run replaces the previous run's files there, so the demo can
be run again as it is; a folder named by ``--workdir`` keeps them unless ``--overwrite``.
"""

import argparse
from typing import TextIO

from compiledopt.apps.finetune import MAX_STEPS
from compiledopt.apps.paths import check_work_directory, default_output
from compiledopt.apps.pipeline import run_pipeline
from compiledopt.apps.train_settings import MAX_META_STEPS
from compiledopt.cli.arguments import Commands, backend_list, positive_int_up_to, random_seed

__all__ = ["add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``demo`` subparser."""
    from compiledopt.export import BACKENDS

    parser = commands.add_parser(
        "demo",
        help="the main job end to end: meta-train -> export -> verify -> fine-tune vs AdamW",
        description="Meta-train a NormalizedMLP briefly by PES on built-in tasks, export it "
        "(TorchScript, ONNX, AOTInductor), verify every backend, and fine-tune a pre-trained "
        "model with the shipped default optimizer against AdamW. No downloads; a few minutes "
        "on 2 CPU cores.",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="checkpoint and artifact go here (default: <output root>/demo, the output root "
        "being $COMPILEDOPT_HOME, else $XDG_DATA_HOME/compiledopt, else "
        "~/.local/share/compiledopt)",
    )
    parser.add_argument(
        "--meta-steps",
        type=positive_int_up_to(MAX_META_STEPS),
        default=20,
        help=f"at most {MAX_META_STEPS:,} (default: 20)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=positive_int_up_to(MAX_STEPS),
        default=300,
        help=f"at most {MAX_STEPS:,} (default: 300)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="in [0, 2**31) (default: 0)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint and artifact of an earlier run in the --workdir given "
        "(without it they are refused before any work; the default folder is the demo's own, "
        "replaced at every run)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``demo`` command: :func:`run_pipeline` with the command's options (checked first)."""
    backends = backend_list(args.backends)
    # The default folder holds nothing but earlier demo runs: each run replaces the last.
    overwrite = args.overwrite or args.workdir is None
    if args.workdir is None:
        workdir = str(default_output("demo", "--workdir"))
    else:
        workdir = check_work_directory(args.workdir, "--workdir")
    run_pipeline(
        workdir,
        meta_steps=args.meta_steps,
        backends=backends,
        finetune_steps=args.finetune_steps,
        seed=args.seed,
        out=out,
        progress=not args.no_progress,
        overwrite=overwrite,
    )
    return 0
