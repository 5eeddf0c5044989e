"""Learning quality: meta-trained learned optimizers versus tuned SGD and Adam on held-out tasks.

For a task family, the learned optimizers (CoordinateMLP and CoordinateLSTM) are meta-trained on
training tasks within a wall-clock budget each (or loaded from checkpoints written by
``compiledopt train``), then every optimizer runs ``--steps`` inner steps on ``--tasks`` held-out
tasks. SGD and Adam each get the learning rate with the lowest geometric-mean final loss from a
sweep, chosen on the same held-out tasks (which favours the baselines). Reports the final loss
(mean ± std, geometric mean), the mean loss over all steps (speed), and on how many tasks each
optimizer ends below the better of SGD and Adam; writes JSON and a PNG of the loss curves.

    python benchmarks/learning_quality.py --family regression --budget-minutes 4
"""

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from compiledopt.learned.catalog import CATALOG, build_transform
from compiledopt.meta import MetaTrainConfig, MetaTrainer, evaluate_curve
from compiledopt.tasks import FAMILIES, TaskFamily, get_family
from compiledopt.transforms import SGD, Adam, Transform

SWEEP = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]


def curves(transform: Transform, family: TaskFamily, tasks: int, steps: int, lr: float) -> Tensor:
    return torch.stack(
        [evaluate_curve(transform, family.sample(i, "heldout"), steps, lr) for i in range(tasks)]
    )


def final_score(c: "torch.Tensor") -> float:
    """Geometric-mean final loss (tasks differ by orders of magnitude); a run that diverged
    (nan/inf) scores +inf."""
    last = c[:, -1]
    return float(last.log().mean().exp()) if bool(torch.isfinite(last).all()) else math.inf


def meta_train(
    name: str, family: TaskFamily, minutes: float, seed: int, config: MetaTrainConfig
) -> Dict[str, object]:
    """Meta-train the catalog transform ``name`` for ``minutes`` of wall-clock time."""
    torch.manual_seed(seed)
    transform = build_transform(name)
    trainer = MetaTrainer(transform, family, config, metadata={"transform_spec": {"name": name}})
    start = time.perf_counter()
    with tqdm(desc=f"meta-train {name}", unit="step") as bar:
        while time.perf_counter() - start < 60 * minutes and trainer.meta_step < config.meta_steps:
            record = trainer.step()
            bar.update(1)
            bar.set_postfix(meta_loss=f"{record['meta_loss']:.4g}")
    return {
        "transform": transform,
        "inner_lr": config.inner_lr,
        "meta_steps": trainer.meta_step,
        "seconds": time.perf_counter() - start,
        "skipped_tasks": trainer.skipped_tasks,
        "trainer": trainer,
    }


def load_checkpoint(path: str) -> Dict[str, object]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    spec = state["metadata"]["transform_spec"]
    transform = build_transform(spec["name"], spec.get("kwargs"))
    transform.load_state_dict(state["transform"])
    return {
        "transform": transform,
        "inner_lr": state["config"]["inner_lr"],
        "meta_steps": state["meta_step"],
        "seconds": math.nan,
        "skipped_tasks": state["skipped_tasks"],
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="regression")
    parser.add_argument("--steps", type=int, default=100, help="inner steps per held-out task")
    parser.add_argument("--tasks", type=int, default=8, help="held-out tasks (>= 5)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=4.0,
        help="meta-training wall-clock budget per learned optimizer",
    )
    parser.add_argument("--unroll", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--tasks-per-step", type=int, default=4)
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--mlp", help="CoordinateMLP checkpoint (skips its meta-training)")
    parser.add_argument("--lstm", help="CoordinateLSTM checkpoint (skips its meta-training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/learning_quality")
    args = parser.parse_args(argv)
    if args.tasks < 5:
        parser.error(f"--tasks must be at least 5, got {args.tasks}")
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and less noisy on 2 cores
    family = get_family(args.family, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    learned: Dict[str, Dict[str, object]] = {}
    for label, name, path in (
        ("CoordinateMLP", "coordinate-mlp", args.mlp),
        ("CoordinateLSTM", "coordinate-lstm", args.lstm),
    ):
        if path:
            learned[label] = load_checkpoint(path)
            continue
        config = MetaTrainConfig(
            meta_steps=10**9,
            unroll_length=args.unroll,
            horizon=args.horizon,
            tasks_per_step=args.tasks_per_step,
            inner_lr=CATALOG[name].inner_lr,
            meta_lr=args.meta_lr,
            eval_every=0,
        )
        learned[label] = meta_train(name, family, args.budget_minutes, args.seed, config)
        checkpoint = Path(f"{args.out}_{name}.pt")
        learned[label].pop("trainer").save(str(checkpoint))

    results: Dict[str, Dict[str, object]] = {}
    for label, baseline in (("SGD", SGD()), ("Adam", Adam())):
        sweep = {}
        for lr in tqdm(SWEEP, desc=f"sweep {label}"):
            sweep[lr] = curves(baseline, family, args.tasks, args.steps, lr)
        best = min(SWEEP, key=lambda lr: final_score(sweep[lr]))
        results[label] = {
            "curves": sweep[best],
            "lr": best,
            "sweep": {str(lr): final_score(c) for lr, c in sweep.items()},
        }
    for label, info in learned.items():
        results[label] = {
            "curves": curves(info["transform"], family, args.tasks, args.steps, info["inner_lr"]),
            "lr": info["inner_lr"],
            "meta_steps": info["meta_steps"],
            "meta_train_seconds": info["seconds"],
            "skipped_tasks": info["skipped_tasks"],
        }

    summary = {}
    best_baseline = torch.minimum(results["SGD"]["curves"][:, -1], results["Adam"]["curves"][:, -1])
    for label, r in results.items():
        last = r["curves"][:, -1]
        summary[label] = {
            "final_loss_mean": float(last.mean()),
            "final_loss_std": float(last.std()),
            "final_loss_geomean": float(last.log().mean().exp()),
            "mean_loss_over_steps": float(r["curves"].mean()),
            "tasks_beating_best_baseline": int((last < best_baseline).sum()),
            "lr": r["lr"],
            **{k: v for k, v in r.items() if k not in ("curves", "lr")},
            "curve_mean": [float(x) for x in r["curves"].mean(0)],
        }
    report = {
        "benchmark": "learning_quality",
        "family": args.family,
        "inner_steps": args.steps,
        "heldout_tasks": args.tasks,
        "budget_minutes_per_learned_optimizer": args.budget_minutes,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "results": summary,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    _plot(results, args, out.with_suffix(".png"))
    print(f"\n{args.family}: held-out loss after {args.steps} steps over {args.tasks} tasks")
    header = ("optimizer", "final mean ± std", "geo-mean", "mean over steps", "beats best", "lr")
    print("  {:<15} {:>20} {:>9} {:>16} {:>11}  {}".format(*header))
    for label, s in summary.items():
        spread = f"{s['final_loss_mean']:.4g} ± {s['final_loss_std']:.2g}"
        wins = f"{s['tasks_beating_best_baseline']}/{args.tasks}"
        print(
            f"  {label:<15} {spread:>20} {s['final_loss_geomean']:>9.4g}"
            f" {s['mean_loss_over_steps']:>16.4g} {wins:>11}  {s['lr']:g}"
        )
    return report


def _plot(results: Dict[str, Dict[str, object]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        log_curves = r["curves"].log()  # tasks differ by orders of magnitude: average in log space
        mean, std = log_curves.mean(0), log_curves.std(0)
        steps = torch.arange(len(mean))
        ax.plot(steps, mean.exp(), label=f"{label} (lr {r['lr']:g})")
        ax.fill_between(steps, (mean - std).exp(), (mean + std).exp(), alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel("held-out evaluation loss")
    ax.set_title(f"{args.family}: geometric mean ×/÷ geometric std over {args.tasks} tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
