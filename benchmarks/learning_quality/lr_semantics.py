"""Compare learning-quality results that differ only in how the learned optimizer's matrix steps
are scaled (``--matrix-scale``, :mod:`~benchmarks.learning_quality.scaling`).

    python -m benchmarks.learning_quality.lr_semantics runs/lr_semantics/lr_semantics_*.json \\
        --output benchmarks/results/lr_semantics.md

Per task and scaling: the learned optimizer's mean final validation loss at its default lr and
at its best lr (and which), each over tuned AdamW's. Per scaling: how far its best lr spreads
over the tasks (largest over smallest, population std of log10, as the suite reports), on how
many tasks its default lr is within 5% of tuned AdamW, on how many it beats or ties tuned AdamW
tuned, their geometric mean, and how many runs diverged. The tuned AdamW of every file is the
same runs where the files share a journal.
"""

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

#: Within this fraction of tuned AdamW counts as "within 5%".
WITHIN = 0.05


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 and math.isfinite(value) else math.inf


def scale_of(doc: Dict[str, Any]) -> str:
    """The file's ``--matrix-scale`` (``none`` where the file predates the option)."""
    return str(doc["settings"].get("matrix_scale", "none"))


def rows(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per task: default and tuned lr of the learned kind, their losses and tuned AdamW's."""
    out = []
    for name, task in doc["tasks"].items():
        summary = task["summary_of_runs"]
        losses = summary["final_val_loss"]
        adamw = losses["adamw@tuned"]
        out.append(
            {
                "task": name,
                "default_lr": summary["default_lr"]["learned"],
                "tuned_lr": summary["tuned_lr"]["learned"],
                "default": _ratio(losses["learned@default"], adamw),
                "tuned": _ratio(losses["learned@tuned"], adamw),
            }
        )
    return out


def aggregate(doc: Dict[str, Any]) -> Dict[str, Any]:
    """One scaling's figures over its tasks (see the module)."""
    table = rows(doc)
    spread = doc["lr_spread"]["learned"]
    tuned = [r["tuned"] for r in table]
    finite = [math.log(x) for x in tuned if math.isfinite(x)]
    counts = doc["aggregates"]["learned"]
    return {
        "scale": scale_of(doc),
        "default_lr": table[0]["default_lr"] if table else None,
        "tasks": len(table),
        "spread": spread["max_over_min"],
        "log10_std": spread["log10_std"],
        "within": sum(r["default"] <= 1.0 + WITHIN for r in table),
        "beats_or_ties": round(counts["fraction_tuned_beats_or_ties_adamw_tuned"] * len(table)),
        "tuned_geomean": math.exp(statistics.fmean(finite)) if len(finite) == len(tuned) else None,
        "diverged": f"{counts['diverged_runs']}/{counts['runs']}",
    }


def render(docs: Sequence[Dict[str, Any]]) -> str:
    """The comparison as Markdown: a table per task and scaling, then one row per scaling."""
    lines = [
        "| task | " + " | ".join(f"{scale_of(d)}: default / best (lr)" for d in docs) + " |",
        "|---|" + "---|" * len(docs),
    ]
    tables = [{r["task"]: r for r in rows(d)} for d in docs]
    for name in docs[0]["tasks"]:
        cells = []
        for table in tables:
            r = table.get(name)
            cells.append(
                "–" if r is None else f"{r['default']:.3g} / {r['tuned']:.3g} ({r['tuned_lr']:g})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| scaling | default lr | best-lr spread | log10 std | default within 5% | tuned beats or "
        "ties | tuned geo-mean | diverged runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for doc in docs:
        a = aggregate(doc)
        geomean = "–" if a["tuned_geomean"] is None else f"{a['tuned_geomean']:.3f}"
        lines.append(
            f"| {a['scale']} | {a['default_lr']:g} | {a['spread']:g}x | {a['log10_std']:.3f} | "
            f"{a['within']}/{a['tasks']} | {a['beats_or_ties']}/{a['tasks']} | {geomean} | "
            f"{a['diverged']} |"
        )
    adamw = docs[0]["lr_spread"].get("adamw")
    if adamw:
        lines += [
            "",
            f"AdamW's best lr over the same tasks spreads {adamw['max_over_min']:g}x "
            f"(log10 std {adamw['log10_std']:.3f}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="learning_quality JSON files")
    parser.add_argument("--output", default=None, help="also write the tables to this .md file")
    args = parser.parse_args(argv)
    docs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.results]
    text = render(docs)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
