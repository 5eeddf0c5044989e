"""Compare learning-quality results that differ only in their weight decay (``--weight-decay``).

    python -m benchmarks.learning_quality.weight_decay benchmarks/results/weight_decay_wd*.json \\
        --output benchmarks/results/weight_decay.md

Per task, kind and weight decay: the mean ± sample std over the seeds of the final validation loss
(a diverged run counts with its initial loss, as in the suite). Each kind's loss at a weight decay
is normalised per task and seed by the same kind's loss at weight decay 0; the summary per weight
decay is the geometric mean of those ratios over tasks × seeds, the number of tasks where the mean
loss is lower or higher (by more than the suite's tie tolerance), and the mean and standard error
over tasks of the per-task mean log-ratio.

The decision rule (:func:`decide`): the weight decay with the lowest geometric mean ratio, if it
is lower than 1 by more than two standard errors of the per-task mean log-ratio (a paired check
across tasks); otherwise weight decay 0 (a tie within noise keeps 0).
"""

import argparse
import datetime
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.learning_quality import metrics, optimizers

#: torch.optim.AdamW's default weight decay: the reference the learned kinds are compared with.
ADAMW_DEFAULT_DECAY = 0.01
#: (task, kind, weight decay) -> seed -> counted final validation loss.
Finals = Dict[Tuple[str, str, float], Dict[int, float]]


def _decay(doc: Dict[str, Any], record: Dict[str, Any]) -> float:
    return float(record.get("weight_decay", doc["settings"].get("weight_decay", 0.0)))


def collect(docs: Sequence[Dict[str, Any]]) -> Tuple[List[str], Finals]:
    """The tasks (in the files' order) and every run's counted final validation loss; a run
    measured twice (same task, kind, weight decay, lr and seed) is refused."""
    names: List[str] = []
    finals: Finals = {}
    seen = set()
    for doc in docs:
        names += [name for name in doc["tasks"] if name not in names]
        defaults = doc["default_lrs"]
        for record in doc["runs"]:
            kind = record["optimizer"]
            if record["lr"] != defaults.get(kind):
                continue  # compared at each kind's default lr only
            key = (record["task"], kind, _decay(doc, record))
            if (*key, record["lr"], record["seed"]) in seen:
                raise ValueError(f"run measured twice: {key}, seed {record['seed']}")
            seen.add((*key, record["lr"], record["seed"]))
            finals.setdefault(key, {})[record["seed"]] = float(record["counted_final_val_loss"])
    return names, finals


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4g} ± {std:.2g}"


def summary(names: Sequence[str], finals: Finals, kind: str) -> Dict[float, Dict[str, Any]]:
    """Per weight decay of ``kind`` (0 included, as the reference): the normalised measures."""
    decays = sorted({d for (_, k, d) in finals if k == kind})
    result: Dict[float, Dict[str, Any]] = {}
    for decay in decays:
        ratios, task_logs, better, worse = [], [], 0, 0
        for name in names:
            base, here = finals.get((name, kind, 0.0)), finals.get((name, kind, decay))
            if not base or not here:
                continue
            seeds = sorted(set(base) & set(here))
            pairs = [here[s] / base[s] for s in seeds]
            ratios += pairs
            task_logs.append(statistics.fmean(math.log(r) for r in pairs))
            mean_here = statistics.fmean(here[s] for s in seeds)
            mean_base = statistics.fmean(base[s] for s in seeds)
            better += mean_here * (1 + metrics.TIE_TOLERANCE) < mean_base
            worse += mean_base * (1 + metrics.TIE_TOLERANCE) < mean_here
        se = statistics.stdev(task_logs) / math.sqrt(len(task_logs)) if len(task_logs) > 1 else 0.0
        result[decay] = {
            "tasks": len(task_logs),
            "geomean_ratio": metrics.geomean(ratios),
            "mean_log_ratio": statistics.fmean(task_logs) if task_logs else math.nan,
            "se_log_ratio": se,
            "better": int(better),
            "worse": int(worse),
        }
    return result


def decide(rows: Dict[float, Dict[str, Any]]) -> Tuple[float, str]:
    """The weight decay the rule picks (see the module's docstring) and why."""
    best = min(rows, key=lambda d: rows[d]["geomean_ratio"])
    row = rows[best]
    if best == 0.0 or row["geomean_ratio"] >= 1.0:
        return 0.0, "no weight decay lowers the geometric-mean normalised loss below 1"
    bound = row["mean_log_ratio"] + 2 * row["se_log_ratio"]
    if bound < 0:
        return best, (
            f"{best:g} has the lowest geometric-mean ratio ({row['geomean_ratio']:.4f}) and its "
            f"per-task mean log-ratio {row['mean_log_ratio']:+.4f} is below 0 by more than two "
            f"standard errors ({row['se_log_ratio']:.4f})"
        )
    return 0.0, (
        f"{best:g} has the lowest geometric-mean ratio ({row['geomean_ratio']:.4f}), but its "
        f"per-task mean log-ratio {row['mean_log_ratio']:+.4f} is within two standard errors "
        f"({row['se_log_ratio']:.4f}) of 0: a tie within noise keeps 0"
    )


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def text(paths: Sequence[str], docs: Sequence[Dict[str, Any]]) -> str:
    names, finals = collect(docs)
    kinds = [k for k in optimizers.KINDS if any(key[1] == k for key in finals)]
    lines = [
        "# Weight decay of the learned optimizer at its default lr",
        "",
        "Final validation loss, mean ± std over the seeds (diverged runs count with their initial "
        "loss), of each kind at its untuned default lr, per decoupled weight decay. Re-measure "
        "and summarise with:",
        "",
        "```",
        *[doc["command"] for doc in docs],
        "python -m benchmarks.learning_quality.weight_decay " + " ".join(paths),
        "```",
        "",
    ]
    env = docs[0]["environment"]
    lines += [
        f"Measured with torch {env['torch']}, Python {env['python']}, on {env['platform']} "
        f"({env['cpu_count']} CPUs, {env['workers']} worker x {env['threads_per_worker']} "
        f"thread); CPU {_cpu_model()}; summarised {datetime.date.today().isoformat()}. Wall "
        "time per file: "
        + ", ".join(f"{Path(p).name} {d['wall_time_s'] / 60:.1f} min" for p, d in zip(paths, docs))
        + ".",
        "",
    ]
    for kind in kinds:
        decays = sorted({d for (_, k, d) in finals if k == kind})
        lr = docs[0]["default_lrs"][kind]
        lines += [
            f"## {optimizers.LABELS[kind]} (lr {lr:g})",
            "",
            "| task | seeds | " + " | ".join(f"wd {d:g}" for d in decays) + " |",
            "|---|---|" + "---|" * len(decays),
        ]
        for name in names:
            cells = []
            for decay in decays:
                values = finals.get((name, kind, decay), {})
                cells.append(_mean_std(list(values.values())) if values else "-")
            count = max(len(finals.get((name, kind, d), {})) for d in decays)
            lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
        rows = summary(names, finals, kind)
        lines += [
            "",
            "Normalised by the same kind at weight decay 0 (per task and seed):",
            "",
            "| wd | geo-mean ratio | per-task mean log-ratio ± SE | tasks better / worse |",
            "|---|---|---|---|",
        ]
        for decay, row in rows.items():
            lines.append(
                f"| {decay:g} | {row['geomean_ratio']:.4f} | {row['mean_log_ratio']:+.4f} ± "
                f"{row['se_log_ratio']:.4f} | {row['better']} / {row['worse']} of {row['tasks']} |"
            )
        reference = ("adamw", ADAMW_DEFAULT_DECAY)
        if kind != "adamw" and any(key[1:] == reference for key in finals):
            lines += [
                "",
                f"Against AdamW at its defaults (lr {optimizers.ADAMW_DEFAULT_LR:g}, weight decay "
                f"{ADAMW_DEFAULT_DECAY:g}): geometric mean over tasks x seeds of the loss ratio, "
                "and the tasks where the mean loss is lower:",
                "",
                "| wd | ratio to AdamW defaults | tasks lower |",
                "|---|---|---|",
            ]
            for decay in decays:
                ratios, lower, count = [], 0, 0
                for name in names:
                    here, adam = finals.get((name, kind, decay)), finals.get((name, *reference))
                    if not here or not adam:
                        continue
                    seeds = sorted(set(here) & set(adam))
                    ratios += [here[s] / adam[s] for s in seeds]
                    count += 1
                    lower += statistics.fmean(here[s] for s in seeds) < statistics.fmean(
                        adam[s] for s in seeds
                    )
                lines.append(f"| {decay:g} | {metrics.geomean(ratios):.4f} | {lower} of {count} |")
        chosen, why = decide(rows)
        lines += [
            "",
            f"Decision rule for {optimizers.LABELS[kind]}: weight decay {chosen:g} ({why}).",
            "",
        ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="learning_quality JSON files")
    parser.add_argument("--output", default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    docs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.results]
    report = text(args.results, docs)
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
