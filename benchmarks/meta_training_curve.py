"""Plot the meta-training curve of a ``compiledopt train`` checkpoint (ES or truncated backprop).

    python -m benchmarks.meta_training_curve runs/normalized-mlp/checkpoint.pt \\
        --output benchmarks/results/normalized-mlp-meta-training

writes ``OUTPUT.png`` (the per-step meta-objective, its moving average, and the held-out
evaluations) and ``OUTPUT.json`` (the same numbers, the run's settings and its training record).
The per-step objective is noisy by nature: each step sees different tasks at different points of
their unrolls, so the moving average and the held-out evaluations are the curves to read.
"""

import argparse
import json
import math
from typing import Any, Dict, List

import torch


def _moving_average(values: List[float], window: int) -> List[float]:
    out, total, count = [], 0.0, 0
    finite = [v if math.isfinite(v) else math.nan for v in values]
    for i, value in enumerate(finite):
        if math.isfinite(value):
            total, count = total + value, count + 1
        if i >= window and math.isfinite(finite[i - window]):
            total, count = total - finite[i - window], count - 1
        out.append(total / count if count else math.nan)
    return out


def curve(checkpoint: str) -> Dict[str, Any]:
    """The checkpoint's history as plain lists (tensors never unpickled: ``weights_only``)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    history = state["history"]
    estimator = state.get("estimator") or state["config"].get("estimator", "tbptt")
    es = estimator != "tbptt"
    # Format 1 checkpoints (two trainers) named the step and the loss differently.
    legacy = state.get("format") == 1
    step_key = "meta_step" if legacy and not es else "step"
    key = ("objective" if es else "meta_loss") if legacy else "loss"
    steps = [int(r[step_key]) for r in history]
    values = [float(r[key]) for r in history]
    evaluations = [
        {"step": int(r[step_key]), "final_loss": float(r["final_loss"])}
        for r in state["evaluations"]
    ]
    return {
        "checkpoint": checkpoint,
        "estimator": estimator,
        "objective": "mean log loss over a truncation" if es else "mean training loss",
        "config": state["config"],
        "training": (state.get("metadata") or {}).get("training"),
        "steps": steps,
        "values": values,
        "moving_average": _moving_average(values, max(1, len(values) // 20)),
        "evaluations": evaluations,
    }


def plot(data: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(data["steps"], data["values"], lw=0.5, alpha=0.35, label="per step")
    top.plot(data["steps"], data["moving_average"], lw=1.8, label="moving average")
    top.set_ylabel(f"meta-objective\n({data['objective']})")
    top.legend(loc="upper right")
    top.set_title(f"meta-training ({data['estimator']})")
    if data["evaluations"]:
        steps = [e["step"] for e in data["evaluations"]]
        losses = [e["final_loss"] for e in data["evaluations"]]
        bottom.plot(steps, losses, marker="o")
    bottom.set_ylabel("held-out final loss")
    bottom.set_xlabel("meta-step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--output", required=True, help="path prefix of the .png and .json")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, "meta_training_curve: needs matplotlib (pip install 'compiledopt[bench]')\n")
    data = curve(args.checkpoint)
    with open(f"{args.output}.json", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    plot(data, f"{args.output}.png")
    print(f"wrote {args.output}.png and {args.output}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
