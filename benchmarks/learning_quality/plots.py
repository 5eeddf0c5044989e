"""Plots (matplotlib, the ``bench`` extra): ``PREFIX_curves.png``, the validation curves of seed 0
per task (tuned learned, learned at its default lr, tuned AdamW, AdamW at 1e-3), and
``PREFIX_normalized.png``, each task's normalised final loss (learned / tuned AdamW, geometric mean
over seeds) as bars on a log axis with the parity line at 1."""

import math
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.learning_quality import optimizers

CURVES = (
    ("learned@tuned", "learned, tuned lr", "C3", "-"),
    ("learned@default", "learned, default lr", "C3", "--"),
    ("adamw@tuned", "AdamW, tuned lr", "C0", "-"),
    ("adamw@default", "AdamW, lr 1e-3", "C0", "--"),
)


def _run(doc: Dict[str, Any], task: str, kind: str, lr: float, seed: int) -> Dict[str, Any]:
    for record in doc["runs"]:
        if (record["task"], record["optimizer"], record["lr"], record["seed"]) == (
            task,
            kind,
            lr,
            seed,
        ):
            return record
    raise KeyError((task, kind, lr, seed))


def _lr(summary: Dict[str, Any], label: str) -> float:
    kind, variant = label.split("@")
    return summary["tuned_lr" if variant == "tuned" else "default_lr"][kind]


def write(doc: Dict[str, Any], prefix: str) -> List[str]:
    """Write both figures; return their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plots (matplotlib is missing: pip install 'compiledopt[bench]')")
        return []
    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    names = list(doc["tasks"])
    seed = doc["settings"]["seeds"][0]
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        summary = doc["tasks"][name]["summary_of_runs"]
        for label, legend, colour, style in CURVES:
            kind, variant = label.split("@")
            if kind not in summary["tuned_lr" if variant == "tuned" else "default_lr"]:
                continue  # a kind not run (--kinds)
            record = _run(doc, name, label.split("@")[0], _lr(summary, label), seed)
            values = [v if isinstance(v, float) else math.nan for v in record["val_loss"]]
            axis.plot(
                record["eval_steps"],
                values,
                color=colour,
                linestyle=style,
                label=f"{legend} ({_lr(summary, label):g})",
            )
        axis.set_yscale("log")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("validation loss")
    figure.suptitle(f"validation loss, seed {seed}")
    figure.tight_layout()
    curves = base.with_name(base.name + "_curves.png")
    figure.savefig(curves, dpi=110)
    plt.close(figure)

    labels = [
        f"{kind}@{variant}"
        for kind in ("learned", "old")
        if kind in doc["sweeps"]
        for variant in ("default", "tuned")
    ]
    figure, axis = plt.subplots(figsize=(max(7, 1.2 * len(names)), 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        heights = [doc["tasks"][n]["summary_of_runs"]["normalized"].get(label) for n in names]
        heights = [h if isinstance(h, float) and math.isfinite(h) else math.nan for h in heights]
        kind, variant = label.split("@")
        axis.bar(
            [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))],
            heights,
            width,
            label=f"{optimizers.LABELS[kind]}, {variant} lr",
        )
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_xticks(range(len(names)), names, rotation=20)
    axis.set_ylabel("final loss / tuned AdamW's")
    axis.set_title("final validation loss / tuned AdamW's (below 1: better)")
    if labels:
        axis.legend(fontsize=7)
    figure.tight_layout()
    bars = base.with_name(base.name + "_normalized.png")
    figure.savefig(bars, dpi=110)
    plt.close(figure)
    return [str(curves), str(bars)]
