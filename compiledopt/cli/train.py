"""The ``compiledopt train`` command: meta-train a learned optimizer on a built-in task family."""

import argparse
import json
import math
import os
import time
from typing import TextIO

from compiledopt.cli.arguments import json_object, positive_float, positive_int
from compiledopt.cli.requirements import require_task_family

__all__ = ["add_parser", "run"]


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``train`` subparser."""
    from compiledopt.learned.catalog import LEARNED
    from compiledopt.meta import MetaTrainConfig
    from compiledopt.tasks import FAMILIES

    defaults = MetaTrainConfig()
    parser = commands.add_parser(
        "train",
        help="meta-train a shape-agnostic learned optimizer on a built-in task family",
        description=(
            "Meta-train a transform by truncated back-propagation through unrolled inner "
            "training on tasks of a built-in family; evaluate it on held-out tasks and save a "
            "checkpoint that `--resume` continues exactly."
        ),
    )
    parser.add_argument(
        "--transform",
        choices=sorted(LEARNED),
        default="coordinate-mlp",
        help="the learned optimizer (default: coordinate-mlp)",
    )
    parser.add_argument(
        "--transform-kwargs",
        type=json_object,
        default={},
        help="constructor arguments as JSON, e.g. '{\"hidden_sizes\": [16]}'",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="regression",
        help="task family (default: regression)",
    )
    parser.add_argument("--meta-steps", type=positive_int, default=defaults.meta_steps)
    parser.add_argument(
        "--unroll",
        type=positive_int,
        default=defaults.unroll_length,
        help=f"inner steps per truncated unroll (default: {defaults.unroll_length})",
    )
    parser.add_argument(
        "--horizon",
        type=positive_int,
        default=defaults.horizon,
        help="inner steps before a task is replaced (a multiple of --unroll)",
    )
    parser.add_argument("--tasks-per-step", type=positive_int, default=defaults.tasks_per_step)
    parser.add_argument(
        "--inner-lr",
        type=positive_float,
        default=None,
        help="lr multiplying the transform's direction (default: the catalog's)",
    )
    parser.add_argument("--meta-lr", type=positive_float, default=defaults.meta_lr)
    parser.add_argument("--clip-norm", type=positive_float, default=defaults.clip_norm)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-tasks", type=positive_int, default=defaults.eval_tasks)
    parser.add_argument("--eval-steps", type=positive_int, default=defaults.eval_steps)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the tasks")
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--output", default="runs/learned.pt", help="checkpoint path")
    parser.add_argument("--resume", action="store_true", help="continue from --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``train`` command: meta-train, checkpoint, and print a summary table."""
    require_task_family(args.family)
    import torch

    from compiledopt.learned.catalog import CATALOG, build_transform
    from compiledopt.meta import MetaTrainConfig, MetaTrainer
    from compiledopt.tasks import get_family

    torch.manual_seed(args.seed)
    spec = {"name": args.transform, "kwargs": args.transform_kwargs}
    transform = build_transform(args.transform, args.transform_kwargs)
    inner_lr = args.inner_lr if args.inner_lr is not None else CATALOG[args.transform].inner_lr
    config = MetaTrainConfig(
        meta_steps=args.meta_steps,
        unroll_length=args.unroll,
        horizon=args.horizon,
        tasks_per_step=args.tasks_per_step,
        inner_lr=inner_lr,
        meta_lr=args.meta_lr,
        clip_norm=args.clip_norm,
        eval_every=args.eval_every,
        eval_tasks=args.eval_tasks,
        eval_steps=args.eval_steps,
        checkpoint_every=args.checkpoint_every,
    )
    family = get_family(args.family, seed=args.seed, device=args.device)
    trainer = MetaTrainer(transform, family, config, metadata={"transform_spec": spec})
    if args.resume:
        trainer.load(args.output)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    start = time.perf_counter()
    result = trainer.train(checkpoint=args.output, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if not result.evaluations or result.evaluations[-1]["meta_step"] != result.meta_step:
        trainer.evaluate()
    first = next((r["meta_loss"] for r in result.history if math.isfinite(r["meta_loss"])), None)
    last = result.history[-1]["meta_loss"] if result.history else math.nan
    rows = [
        ("transform", f"{args.transform} {json.dumps(args.transform_kwargs)}"),
        ("task family", f"{args.family} (seed {args.seed}, device {args.device})"),
        (
            "meta-steps",
            f"{result.meta_step} x {config.tasks_per_step} tasks x unroll "
            f"{config.unroll_length} (inner lr {inner_lr:g})",
        ),
        ("meta-loss", f"{first if first is not None else math.nan:.4g} -> {last:.4g}"),
        ("skipped", f"{result.skipped_tasks} tasks, {result.skipped_steps} meta-steps"),
        ("time", f"{seconds:.1f} s"),
        ("checkpoint", args.output),
    ]
    width = max(len(k) for k, _ in rows)
    print("compiledopt train: summary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    print(f"\n  held-out ({config.eval_tasks} tasks, {config.eval_steps} inner steps)", file=out)
    print(f"  {'meta-step':>9}  {'final loss':>10}  {'mean loss':>10}", file=out)
    for record in trainer.evaluations:
        print(
            f"  {record['meta_step']:>9}  {record['final_loss']:>10.4g}  "
            f"{record['mean_loss']:>10.4g}",
            file=out,
        )
    return 0
