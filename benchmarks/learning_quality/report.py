"""The printed plan and tables, and the JSON document.

``PREFIX.json`` (schema :data:`SCHEMA`) has the keys :data:`TOP_KEYS`:

* ``command``, ``settings``, ``environment`` (python, torch, platform, CPU count, threads per
  worker, workers, load), ``estimated_s`` and ``wall_time_s``, ``notes``;
* ``optimizers`` (each learned kind's artifact path, name, manifest and default lr, backend),
  ``sweeps`` (kind -> lrs) and ``default_lrs``;
* ``tasks``: per task its sizes (``params``, ``tensors``, ``batch_size``, ``validation_size``,
  ``steps``, ``summary``; the LM tasks add their corpus) and ``summary_of_runs``
  (:func:`~benchmarks.learning_quality.analysis.summarize_task`: tuned lrs, final validation
  losses of each configuration, untuned AdamW at 1e-3 and 3e-3 included, per-seed normalised
  losses, steps and speed-ups, diverged lrs, wins, per-kind costs);
* ``runs``: one record per run (task, seed, steps, optimizer, lr, weight_decay, the validation curve
  ``eval_steps``/``val_loss``, the mean training loss between evaluations ``train_loss``,
  initial/final/counted-final/min validation loss, ``diverged``, ``diverged_step``, ms per step,
  ``optimizer_ms_median`` (the median ms of ``optimizer.step()`` alone), ``state_bytes_per_param``
  (the optimizer state's bytes over the parameter elements, at the end), seconds);
* ``lr_spread`` (:func:`~benchmarks.learning_quality.analysis.lr_spread`: per kind, its best lr
  on each task, their smallest, largest, ratio and the std of their log10);
* ``aggregates`` (:func:`~benchmarks.learning_quality.analysis.aggregate`) and ``stress`` (per
  learned kind, and AdamW as the reference, per task: the loss-×1e6 and gradient-1e38 checks,
  pass or fail).

Non-finite numbers are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON).
``PREFIX.md`` holds the printed tables.
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.learning_quality import analysis, optimizers

SCHEMA = "compiledopt-bench-learning-quality/1"
TOP_KEYS = (
    "schema",
    "command",
    "settings",
    "environment",
    "optimizers",
    "sweeps",
    "default_lrs",
    "tasks",
    "runs",
    "aggregates",
    "lr_spread",
    "stress",
    "notes",
    "estimated_s",
    "wall_time_s",
)


def _scaled(settings: Dict[str, Any]) -> str:
    """``, learned matrix steps scaled: MODE`` where ``--matrix-scale`` was set, else nothing."""
    mode = settings.get("matrix_scale", "none")
    return "" if mode == "none" else f", learned matrix steps scaled: {mode}"


def strict(value: Any) -> Any:
    """``value`` with non-finite floats as strings and tuple/dict keys made JSON-friendly."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write(doc: Dict[str, Any], text: str, prefix: str) -> List[str]:
    """Write ``PREFIX.json`` and ``PREFIX.md``; return their paths."""
    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path = base.with_name(base.name + ".json")
    md_path = base.with_name(base.name + ".md")
    json_path.write_text(json.dumps(strict(doc), indent=1, allow_nan=False) + "\n")
    md_path.write_text(f"# Learning quality\n\n`{doc['command']}`\n\n```\n{text}\n```\n")
    return [str(json_path), str(md_path)]


def _num(value: Any, width: int = 9) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float) and math.isinf(value):
        return f"{'inf':>{width}}"
    return f"{value:>{width}.4g}"


def plan_text(
    names: Sequence[str],
    steps: Dict[str, int],
    sweeps: Dict[str, List[float]],
    settings: Dict[str, Any],
    paths: Dict[str, str],
    backends: Dict[str, str],
    per_run: Dict[Tuple[str, str], float],
    estimate: float,
    seeds: Optional[Dict[str, List[int]]] = None,
    preparing: float = 0.0,
    journal: Optional[Tuple[str, int]] = None,
) -> str:
    """What is about to run, with the estimated seconds of one run of each task and kind
    (``per_run``; a task and kind missing there: none of its runs is left to run) and of the
    runs left to run (``estimate``, of which ``preparing`` is pre-training). ``journal``: its
    path and how many of the runs come from it (``--journal``). A kind with ``--lrs`` (in
    ``settings["lrs"]``) says so, and which untuned baselines were added to its lrs."""
    seeds = seeds or {name: settings["seeds"] for name in names}
    configs = sum(len(v) for v in sweeps.values())
    runs = sum(len(seeds[name]) for name in names) * configs
    counts = sorted({len(seeds[name]) for name in names})
    lines = [
        f"learning quality: {len(names)} tasks x {'/'.join(map(str, counts))} seed(s) x "
        f"{configs} optimizer configurations = {runs} runs, "
        f"{settings['jobs']} worker(s) x {settings['threads']} thread(s), "
        f"roles {settings.get('roles', optimizers.DEFAULT_ROLES)}, "
        f"weight decay {settings.get('weight_decay', 0.0):g}" + _scaled(settings),
    ]
    grids = settings.get("lrs") or {}
    for kind, lrs in sweeps.items():
        where = f" ({paths[kind]}, {backends[kind]})" if kind in paths else ""
        line = f"  {optimizers.LABELS[kind]}{where}: lr {', '.join(f'{x:g}' for x in lrs)}"
        if kind in grids:
            added = [lr for lr in lrs if lr not in grids[kind]]
            line += " (--lrs" + (
                f"; the untuned baseline(s) {', '.join(f'{x:g}' for x in added)} added)"
                if added
                else ")"
            )
        lines.append(line)
    done = (
        " (-: none left to run)"
        if any((name, kind) not in per_run for name in names for kind in sweeps)
        else ""
    )
    lines.append(
        f"  {'task':<15} {'steps':>6} {'seeds':>5}  estimated seconds per run{done}: "
        + ", ".join(sweeps)
    )
    for name in names:
        cells = ", ".join(
            f"{per_run[name, kind]:.1f}" if (name, kind) in per_run else "-" for kind in sweeps
        )
        lines.append(f"  {name:<15} {steps[name]:>6} {len(seeds[name]):>5}  {cells}")
    what = "the runs"
    if journal is not None:
        path, reused = journal
        lines.append(
            f"journal {path}: {reused} of {runs} runs recorded there, {runs - reused} to run"
        )
        what = f"the {runs - reused} runs left"
    if preparing:
        lines.append(f"pre-training before the runs: about {preparing / 60:.1f} min")
    lines.append(
        f"estimated wall time of {what}: {estimate / 60:.1f} min (from a few timed steps of "
        "each task and kind; more when other jobs load the CPUs)"
    )
    return "\n".join(lines)


def tables(doc: Dict[str, Any]) -> str:
    """The final-loss table, the learned-vs-AdamW table, the aggregates and the stress check."""
    tasks = doc["tasks"]
    kinds = [k for k in optimizers.KINDS if k in doc["sweeps"]]
    columns = [
        ("learned@default", "learned"),
        ("learned@tuned", "learned*"),
        ("adamw@tuned", "AdamW*"),
        ("adamw@default", "AdamW 1e-3"),
        ("adamw@3e-3", "AdamW 3e-3"),
        ("sgd@tuned", "SGD*"),
    ]
    if "old" in kinds:
        columns += [("old@default", "old"), ("old@tuned", "old*")]
    cost_kinds = [k for k in ("learned", "adamw") if k in kinds]
    cost_titles = [f"ms {k[:5]}" for k in cost_kinds] + [f"B/p {k[:5]}" for k in cost_kinds]
    task_seeds = doc["settings"].get("task_seeds") or {}
    decay = doc["settings"].get("weight_decay", 0.0)
    lines = [
        "final validation loss (mean over the task's seeds; * = tuned, its lr below; weight decay "
        f"{decay:g}{_scaled(doc['settings'])}), and costs: ms = median ms of one optimizer.step() "
        "alone, B/p = state bytes per parameter",
        f"  {'task':<15} {'steps':>6} {'params':>8} {'seeds':>5} "
        + " ".join(f"{t:>10}" for _, t in columns)
        + " | "
        + " ".join(f"{t:>9}" for t in cost_titles),
    ]
    for name, info in tasks.items():
        s = info["summary_of_runs"]
        count = len(task_seeds.get(name, doc["settings"]["seeds"]))
        losses = " ".join(f" {_num(s['final_val_loss'].get(c))}" for c, _ in columns)
        tuned = " ".join(
            f"{'':>10}"
            if not c.endswith("@tuned") or c[:-6] not in s["tuned_lr"]
            else f"{s['tuned_lr'][c[:-6]]:>10.2g}"
            for c, _ in columns
        )
        cost = s.get("cost", {})
        cells = [_num(cost.get(k, {}).get("optimizer_ms_median")) for k in cost_kinds]
        cells += [_num(cost.get(k, {}).get("state_bytes_per_param")) for k in cost_kinds]
        lines.append(
            f"  {name:<15} {info['steps']:>6} {info['params']:>8} {count:>5} {losses} | "
            + " ".join(cells)
        )
        lines.append(f"  {'':<15} {'':>6} {'':>8} {'':>5} {tuned}")
    spread = doc.get("lr_spread") or analysis.lr_spread(
        {name: info["summary_of_runs"] for name, info in tasks.items()}
    )
    lines.append("")
    lines.append(
        "spread of the best (tuned) lr across tasks: smallest, largest, largest / smallest, "
        "population std of log10"
    )
    for kind, entry in spread.items():
        lines.append(
            f"  {optimizers.LABELS[kind]:<22} {entry['min']:>9.3g} {entry['max']:>9.3g} "
            f"{entry['max_over_min']:>9.3g}x {entry['log10_std']:>7.3f}  over {entry['tasks']} "
            "task(s)"
        )
    lines.append("")
    learned_kinds = [k for k in ("learned", "old") if k in kinds]
    head = "  ".join(f"{k + ' ' + v:>16}" for k in learned_kinds for v in ("norm", "speed-up"))
    lines.append(
        "vs tuned AdamW: normalised final loss (learned / AdamW*) and speed-up, default / tuned lr"
    )
    lines.append(f"  {'task':<13} {head}   diverged lrs")
    for name, info in tasks.items():
        s = info["summary_of_runs"]
        cells = []
        for kind in learned_kinds:
            for table in ("normalized", "speedup"):
                pair = [s[table].get(f"{kind}@{v}") for v in ("default", "tuned")]
                cells.append(f"{_num(pair[0], 7)} /{_num(pair[1], 7)}")
        diverged = "; ".join(
            f"{k}: {', '.join(f'{x:g}' for x in lrs)}" for k, lrs in s["diverged"].items() if lrs
        )
        lines.append(f"  {name:<13} " + "  ".join(cells) + f"   {diverged or '-'}")
    lines.append("")
    aggregates = doc["aggregates"]
    lines.append(
        f"aggregates over {aggregates['count']['tasks']} tasks x seeds "
        f"({aggregates['count']['values']} values):"
    )
    for kind in learned_kinds:
        a = aggregates[kind]
        iqm, geo, speed = (
            a[key] for key in ("normalized_final_iqm", "normalized_final_geomean", "speedup_iqm")
        )
        lines += [
            f"  {optimizers.LABELS[kind]:<22} normalised final loss: IQM "
            f"{_num(iqm['default'], 0)} / {_num(iqm['tuned'], 0)}, geo-mean "
            f"{_num(geo['default'], 0)} / {_num(geo['tuned'], 0)} (default / tuned lr)",
            f"  {'':<22} speed-up IQM {_num(speed['default'], 0)} / {_num(speed['tuned'], 0)}; "
            f"{a['diverged_runs']}/{a['runs']} runs diverged",
            f"  {'':<22} default lr beats AdamW 1e-3 on "
            f"{100 * a['fraction_default_beats_adamw_default']:.0f}% of tasks; tuned beats or "
            f"ties AdamW* on {100 * a['fraction_tuned_beats_or_ties_adamw_tuned']:.0f}%",
        ]
    lines.append("")
    lines.append("stress check (every parameter finite; loss x1e6 | gradients scaled to 1e38):")
    for kind, checks in doc["stress"].items():
        cells = [
            f"{c['task']}: {'pass' if c['loss_x1e6']['pass'] else 'FAIL'} | "
            f"{'pass' if c['grad_1e38']['pass'] else 'FAIL'}"
            for c in checks
        ]
        verdict = "PASS" if all(c["pass"] for c in checks) else "FAIL"
        label = optimizers.LABELS[kind] + (" (reference)" if kind == "adamw" else "")
        lines.append(f"  {label:<22} {verdict}   " + "; ".join(cells))
    lines.append(
        f"wall time {doc['wall_time_s'] / 60:.1f} min (estimated {doc['estimated_s'] / 60:.1f})"
    )
    return "\n".join(lines)
