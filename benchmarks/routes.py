"""Choose an artifact's routes (the rule for each parameter role) and its lr on the held-out
tasks of a meta-training family, never on the learning-quality benchmark's tasks.

    python -m benchmarks.routes normalized-mlp --family image-mlp --tasks 6 --steps 300 \\
        --output benchmarks/results/routes_image-mlp.json

Every candidate routing (:data:`CANDIDATES`) runs the artifact through ``FrozenOptimizer`` on
``compiledopt.param_groups(task.model)`` (roles from the model's module types) at each lr, and
AdamW runs over the same lrs, all on a linear warm-up (5% of the steps) then a cosine decay to 0.
Reported: the mean final evaluation loss over the tasks per candidate and lr, each candidate's
best lr, and its mean loss over tuned AdamW's (per task, AdamW at its best lr over the tasks).
``--matrix-scale`` scales the candidates' matrix steps as the learning-quality benchmark's option
of that name does (:mod:`benchmarks.learning_quality.scaling`); AdamW is never scaled.
``--vector-scales 0.3,1`` runs each candidate again with the lr of its ``vector`` groups (biases,
normalisation gains) multiplied by each factor other than 1, reported as ``NAME@vF``.
"""

import argparse
import json
import math
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.learning_quality import scaling

#: Candidate routings (role -> rule); a role left out runs the artifact as configured.
CANDIDATES: Dict[str, Dict[str, str]] = {
    "none": {},
    "harness": {
        "matrix": "orthogonal",
        "vector": "adam",
        "embedding": "orthogonal",
        "head": "orthogonal",
        "input": "orthogonal",
    },
    "ends-adam": {
        "matrix": "orthogonal",
        "vector": "adam",
        "embedding": "adam",
        "head": "adam",
        "input": "orthogonal",
    },
    "ends-learned": {
        "matrix": "orthogonal",
        "vector": "adam",
        "embedding": "learned",
        "head": "learned",
        "input": "learned",
    },
    "head-learned": {
        "matrix": "orthogonal",
        "vector": "adam",
        "embedding": "orthogonal",
        "head": "learned",
        "input": "orthogonal",
    },
    "head-adam": {
        "matrix": "orthogonal",
        "vector": "adam",
        "embedding": "orthogonal",
        "head": "adam",
        "input": "orthogonal",
    },
    "all-adam": dict.fromkeys(("matrix", "vector", "embedding", "head", "input"), "adam"),
}
WARMUP = 0.05
FLOOR = 1e-4


def schedule(steps: int):
    warm = max(1, int(WARMUP * steps))

    def factor(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, steps - warm)))

    return factor


def run(task, initial, make_optimizer, steps: int) -> float:
    """The final evaluation loss of ``task`` trained for ``steps`` from the parameters
    ``initial`` (``inf`` when it diverges). The task's model is trained in place."""
    model = task.model
    with torch.no_grad():
        for name, value in initial.items():
            model.get_parameter(name).copy_(value)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    for k in range(steps):
        inputs, target = task.batch(k)
        optimizer.zero_grad(set_to_none=True)
        loss = task.criterion(model(inputs), target)
        if not torch.isfinite(loss):
            return float("inf")
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        inputs, target = task.evaluation_batch()
        final = float(task.criterion(model(inputs), target))
    return final if math.isfinite(final) else float("inf")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="a packaged optimizer's name or an artifact folder")
    parser.add_argument("--family", default="image-mlp")
    parser.add_argument("--tasks", type=int, default=6, help="held-out tasks 0..N-1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", default="0.001,0.003,0.01")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--matrix-scale", choices=scaling.MODES, default="none")
    parser.add_argument(
        "--vector-scales", default="1", help="comma-separated factors of the vector groups' lr"
    )
    parser.add_argument("--output", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)

    import compiledopt
    from compiledopt.tasks.families import get_family

    torch.set_num_threads(1)
    lrs = [float(x) for x in args.lrs.split(",")]
    names = args.candidates.split(",")
    for name in names:
        if name not in CANDIDATES:
            parser.error(f"unknown candidate {name!r} (one of {sorted(CANDIDATES)})")
    try:
        factors = [float(x) for x in args.vector_scales.split(",")]
    except ValueError:
        parser.error(f"invalid --vector-scales: {args.vector_scales!r} (comma-separated numbers)")
    if not all(math.isfinite(f) and f > 0 for f in factors):
        parser.error(f"invalid --vector-scales: {args.vector_scales!r} (positive numbers)")
    configs = [(n, f) for n in names for f in dict.fromkeys(factors)]
    family = get_family(args.family)
    losses: Dict[str, Dict[str, List[float]]] = {}
    started = time.time()
    for index in range(args.tasks):
        task = family.sample(index, "heldout")
        initial = task.init_params()  # the model's own parameters: taken before any run
        for lr in lrs:

            def adamw(model, lr=lr):
                return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

            loss = run(task, initial, adamw, args.steps)
            losses.setdefault("adamw", {}).setdefault(f"{lr:g}", []).append(loss)
            for name, factor in configs:

                def learned(model, lr=lr, name=name, factor=factor):
                    groups = compiledopt.param_groups(model)
                    for group in groups:
                        group["rule"] = CANDIDATES[name].get(group["role"], "artifact")
                        if group["role"] == "vector":
                            group["lr"] = lr * factor
                    optimizer = compiledopt.FrozenOptimizer(
                        groups, args.artifact, lr=lr, backend=args.backend
                    )
                    return scaling.attach(optimizer, args.matrix_scale)

                loss = run(task, initial, learned, args.steps)
                label = name if factor == 1 else f"{name}@v{factor:g}"
                losses.setdefault(label, {}).setdefault(f"{lr:g}", []).append(loss)
        print(f"task {index} done ({time.time() - started:.0f} s)", flush=True)

    def mean(values: List[float]) -> float:
        return statistics.fmean(values) if all(map(math.isfinite, values)) else float("inf")

    summary = {}
    adamw_best = min(losses["adamw"], key=lambda lr: mean(losses["adamw"][lr]))
    tuned_adamw = losses["adamw"][adamw_best]
    for name, table in losses.items():
        best = min(table, key=lambda lr: mean(table[lr]))
        # A loss floor keeps the ratio of two runs that both reach (near) zero finite.
        ratios = [(a + FLOOR) / (b + FLOOR) for a, b in zip(table[best], tuned_adamw)]
        summary[name] = {
            "mean_final_loss": {lr: mean(v) for lr, v in table.items()},
            "best_lr": float(best),
            "best_mean_loss": mean(table[best]),
            "geomean_ratio_to_tuned_adamw": math.exp(statistics.fmean(map(math.log, ratios)))
            if all(map(math.isfinite, ratios))
            else float("inf"),
        }
        row = "  ".join(f"{lr}: {mean(v):.4f}" for lr, v in table.items())
        ratio = summary[name]["geomean_ratio_to_tuned_adamw"]
        print(f"{name:14s} {row}   best {best} ratio {ratio:.3f}")
    result = {
        "command": "python -m benchmarks.routes " + " ".join(argv or sys.argv[1:]),
        "artifact": args.artifact,
        "family": args.family,
        "split": f"held-out tasks 0..{args.tasks - 1} of the family",
        "steps": args.steps,
        "schedule": "warm-up 5% + cosine to 0",
        "candidates": {n: CANDIDATES[n] for n in names},
        "matrix_scale": args.matrix_scale,
        "vector_scales": factors,
        "torch": torch.__version__,
        "threads": 1,
        "wall_time_s": round(time.time() - started, 1),
        "losses": losses,
        "summary": summary,
    }
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, allow_nan=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
