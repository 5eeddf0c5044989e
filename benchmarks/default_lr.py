"""Choose a meta-trained optimizer's recommended lr on its own family's held-out tasks.

    python -m benchmarks.default_lr runs/normalized-mlp/checkpoint.pt \\
        --output benchmarks/results/normalized-mlp-default-lr.json

Runs the checkpoint's transform with the warm-up + cosine schedule at each lr on the held-out
split of the task family it was meta-trained on (never on the learning-quality benchmark's
tasks, which judge it) and reports the mean final evaluation loss per lr and horizon. The lr with
the lowest mean over the horizons is the recommendation (``compiledopt train``'s
``export_lr``).
"""

import argparse
import json
import statistics
import sys
from typing import List

import torch


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--lrs", default="0.001,0.002,0.003,0.01")
    parser.add_argument("--horizons", default="200,300")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args(argv)

    from compiledopt.learned.catalog import build_transform
    from compiledopt.meta import MetaConfig, MetaLoop
    from compiledopt.meta.launch import make_family

    torch.set_num_threads(1)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    spec = state["metadata"]["transform_spec"]
    training = state["metadata"]["training"]
    transform = build_transform(spec["name"], spec["kwargs"])
    transform.load_state_dict(state["transform"])
    family = make_family(
        training["task_family"], int(training["seed"]), "cpu", training["family_kwargs"]
    )
    lrs = [float(x) for x in args.lrs.split(",")]
    horizons = [int(x) for x in args.horizons.split(",")]
    table = {}
    for lr in lrs:
        losses = {}
        for steps in horizons:
            config = MetaConfig("pes", eval_tasks=args.tasks, eval_steps=steps, inner_lr=lr)
            losses[steps] = MetaLoop(transform, family, config).evaluate()["final_loss"]
            print(f"lr {lr:g}, {steps} steps: mean final loss {losses[steps]:.4f}", flush=True)
        table[lr] = losses
    best = min(lrs, key=lambda lr: statistics.mean(table[lr].values()))
    result = {
        "command": "python -m benchmarks.default_lr " + " ".join(argv or sys.argv[1:]),
        "checkpoint": args.checkpoint,
        "family": training["task_family"],
        "split": f"held-out tasks 0..{args.tasks - 1} of the family",
        "schedule": "warm-up 5 % + cosine to 0 over the horizon",
        "mean_final_loss": {str(lr): {str(h): v for h, v in t.items()} for lr, t in table.items()},
        "best_lr": best,
    }
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(f"best lr {best:g}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
