"""From runs to per-task summaries and the suite's aggregates (the Celo papers' measures).

Per task: each kind's *tuned* lr is the one with the lowest mean counted final validation loss over
the seeds (:func:`~benchmarks.learning_quality.metrics.best_lr`; a diverged run counts with its
initial loss). Per task and seed, the *target* is tuned AdamW's final validation loss; each learned
configuration (``learned@default``, ``learned@tuned`` and the same for ``old``) gets its final loss
normalised by the target, the steps it needs to reach the target (``None`` if never, or if it
diverged) and the speed-up over tuned AdamW's own steps to that loss.

Per task also each kind's costs (:func:`costs`: the median milliseconds of the optimizer's step
alone and its state bytes per parameter element), and over tasks the spread of each kind's best
lr (:func:`lr_spread`).

Aggregates over tasks × seeds: the IQM and the geometric mean of the normalised final loss, the
IQM of the speed-up; over tasks (final losses averaged over seeds): the fraction where the learned
optimizer at its default lr beats AdamW at 1e-3, and the fraction where the tuned learned optimizer
beats or ties (within 1e-3, relative) tuned AdamW.
"""

import math
import statistics
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from benchmarks.learning_quality import metrics

#: The learned kinds, each compared at its default and its tuned lr.
LEARNED_KINDS = ("learned", "old")
VARIANTS = ("default", "tuned")
#: Untuned baselines reported beside each kind's default: label -> (kind, lr).
EXTRA_BASELINES = {"adamw@3e-3": ("adamw", 3e-3)}
#: Kinds whose best lr's spread across tasks is reported (:func:`lr_spread`).
SPREAD_KINDS = ("learned", "old", "adamw", "sgd")

Table = Dict[str, Dict[float, Dict[int, Dict[str, Any]]]]  # kind -> lr -> seed -> run


def group(runs: Iterable[Mapping[str, Any]]) -> Dict[str, Table]:
    """Runs by task, kind, lr and seed."""
    grouped: Dict[str, Table] = {}
    for run in runs:
        kinds = grouped.setdefault(run["task"], {})
        kinds.setdefault(run["optimizer"], {}).setdefault(run["lr"], {})[run["seed"]] = dict(run)
    return grouped


def _finals(by_seed: Mapping[int, Mapping[str, Any]]) -> List[float]:
    return [run["counted_final_val_loss"] for run in by_seed.values()]


def summarize_task(
    table: Table, seeds: Sequence[int], default_lrs: Mapping[str, float]
) -> Dict[str, Any]:
    """One task's summary from its runs (``table``: kind -> lr -> seed -> run)."""
    tuned = {
        kind: metrics.best_lr({lr: _finals(by_seed) for lr, by_seed in lrs.items()})
        for kind, lrs in table.items()
    }
    configs: Dict[str, tuple] = {}
    for kind in table:
        if kind in default_lrs and default_lrs[kind] in table[kind]:
            configs[f"{kind}@default"] = (kind, default_lrs[kind])
        configs[f"{kind}@tuned"] = (kind, tuned[kind])
    for label, (kind, lr) in EXTRA_BASELINES.items():
        if kind in table and lr in table[kind]:
            configs[label] = (kind, lr)
    final = {label: metrics.mean(_finals(table[k][lr])) for label, (k, lr) in configs.items()}
    per_seed = []
    for seed in seeds:
        adam = table["adamw"][tuned["adamw"]][seed]
        target = adam["counted_final_val_loss"]
        adam_steps = metrics.steps_to_reach(adam["eval_steps"], adam["val_loss"], target)
        row: Dict[str, Any] = {"seed": seed, "target": target, "adamw_steps": adam_steps}
        for label, (kind, lr) in configs.items():
            if kind not in LEARNED_KINDS:
                continue
            run = table[kind][lr][seed]
            counted = run["counted_final_val_loss"]
            steps = (
                None
                if run["diverged"]
                else metrics.steps_to_reach(run["eval_steps"], run["val_loss"], target)
            )
            row[label] = {
                "lr": lr,
                "final": counted,
                "normalized": metrics.normalized(counted, target),
                "steps": steps,
                "speedup": metrics.speedup(adam_steps, steps),
                "diverged": run["diverged"],
            }
        per_seed.append(row)
    summary: Dict[str, Any] = {
        "default_lr": {k: default_lrs[k] for k in table if k in default_lrs},
        "tuned_lr": tuned,
        "final_val_loss": final,
        "per_seed": per_seed,
        "diverged": {
            kind: sorted(
                lr for lr, by_seed in lrs.items() if any(r["diverged"] for r in by_seed.values())
            )
            for kind, lrs in table.items()
        },
        "normalized": {},
        "speedup": {},
        "wins": {},
        "cost": costs(table),
    }
    for kind in LEARNED_KINDS:
        for variant in VARIANTS:
            label = f"{kind}@{variant}"
            values = [row[label] for row in per_seed if label in row]
            if values:
                summary["normalized"][label] = metrics.geomean(v["normalized"] for v in values)
                summary["speedup"][label] = metrics.mean(v["speedup"] for v in values)
        if f"{kind}@default" in final and "adamw@default" in final:
            summary["wins"][f"{kind}_default_beats_adamw_default"] = metrics.beats(
                final[f"{kind}@default"], final["adamw@default"]
            )
        if f"{kind}@tuned" in final:
            summary["wins"][f"{kind}_tuned_beats_or_ties_adamw_tuned"] = metrics.beats_or_ties(
                final[f"{kind}@tuned"], final["adamw@tuned"]
            )
    return summary


def summarize(
    runs: Iterable[Mapping[str, Any]],
    seeds: Union[Sequence[int], Mapping[str, Sequence[int]]],
    default_lrs: Mapping[str, float],
) -> Dict[str, Dict[str, Any]]:
    """Every task's summary, by task (``seeds``: one list for every task, or task -> its list)."""
    return {
        task: summarize_task(
            table, seeds[task] if isinstance(seeds, Mapping) else seeds, default_lrs
        )
        for task, table in group(runs).items()
    }


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(kept) if kept else None


def costs(table: Table) -> Dict[str, Dict[str, Optional[float]]]:
    """Per kind, over all its runs of a task: the median of the runs' median milliseconds of one
    ``optimizer.step()`` alone, and the median state bytes per parameter element (``None`` where
    the runs did not record them)."""
    result = {}
    for kind, lrs in table.items():
        runs = [run for by_seed in lrs.values() for run in by_seed.values()]
        result[kind] = {
            "optimizer_ms_median": _median(r.get("optimizer_ms_median") for r in runs),
            "state_bytes_per_param": _median(r.get("state_bytes_per_param") for r in runs),
        }
    return result


def lr_spread(summaries: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """How far each kind's best (tuned) lr moves across tasks: the best lr per task, the largest
    over the smallest, and the population standard deviation of their log10 (0: one lr fits
    every task; 1: a decade typical spread)."""
    result: Dict[str, Any] = {}
    for kind in SPREAD_KINDS:
        best = {task: s["tuned_lr"][kind] for task, s in summaries.items() if kind in s["tuned_lr"]}
        if not best:
            continue
        logs = [math.log10(lr) for lr in best.values()]
        result[kind] = {
            "best_lr": best,
            "tasks": len(best),
            "min": min(best.values()),
            "max": max(best.values()),
            "max_over_min": max(best.values()) / min(best.values()),
            "log10_std": statistics.pstdev(logs) if len(logs) > 1 else 0.0,
        }
    return result


def aggregate(
    summaries: Mapping[str, Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]
) -> Dict[str, Any]:
    """The aggregates over tasks × seeds (see the module's docstring), per learned kind."""
    result: Dict[str, Any] = {
        "count": {
            "tasks": len(summaries),
            "values": sum(len(s["per_seed"]) for s in summaries.values()),
        }
    }
    for kind in LEARNED_KINDS:
        rows = [row for s in summaries.values() for row in s["per_seed"]]
        if not any(f"{kind}@tuned" in row for row in rows):
            continue
        entry: Dict[str, Any] = {
            "normalized_final_iqm": {},
            "normalized_final_geomean": {},
            "speedup_iqm": {},
        }
        for variant in VARIANTS:
            label = f"{kind}@{variant}"
            values = [row[label] for row in rows if label in row]
            entry["normalized_final_iqm"][variant] = metrics.iqm(v["normalized"] for v in values)
            entry["normalized_final_geomean"][variant] = metrics.geomean(
                v["normalized"] for v in values
            )
            entry["speedup_iqm"][variant] = metrics.iqm(v["speedup"] for v in values)
        for key in ("default_beats_adamw_default", "tuned_beats_or_ties_adamw_tuned"):
            flags = [
                s["wins"][f"{kind}_{key}"]
                for s in summaries.values()
                if f"{kind}_{key}" in s["wins"]
            ]
            entry[f"fraction_{key}"] = metrics.fraction(flags)
        own = [r for r in runs if r["optimizer"] == kind]
        entry["runs"] = len(own)
        entry["diverged_runs"] = sum(bool(r["diverged"]) for r in own)
        result[kind] = entry
    return result
