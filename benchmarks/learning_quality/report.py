"""The printed plan and tables, and the JSON document.

``PREFIX.json`` (schema :data:`SCHEMA`) has the keys :data:`TOP_KEYS`:

* ``command``, ``settings``, ``environment`` (python, torch, platform, CPU count, threads per
  worker, workers, load), ``estimated_s`` and ``wall_time_s``, ``notes``;
* ``optimizers`` (each learned kind's artifact path, name, manifest and default lr, backend),
  ``sweeps`` (kind -> lrs) and ``default_lrs``;
* ``tasks``: per task its sizes (``params``, ``tensors``, ``batch_size``, ``validation_size``,
  ``steps``, ``summary``) and ``summary_of_runs`` (:func:`~benchmarks.learning_quality.analysis.
  summarize_task`: tuned lrs, final validation losses of each configuration, per-seed normalised
  losses, steps and speed-ups, diverged lrs, wins);
* ``runs``: one record per run (task, seed, steps, optimizer, lr, the validation curve
  ``eval_steps``/``val_loss``, the mean training loss between evaluations ``train_loss``,
  initial/final/counted-final/min validation loss, ``diverged``, ``diverged_step``, ms per step,
  seconds);
* ``aggregates`` (:func:`~benchmarks.learning_quality.analysis.aggregate`) and ``stress`` (per
  learned kind, and AdamW as the reference, per task: the loss-×1e6 and gradient-1e38 checks,
  pass or fail).

Non-finite numbers are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON).
``PREFIX.md`` holds the printed tables.
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from benchmarks.learning_quality import optimizers

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
    "stress",
    "notes",
    "estimated_s",
    "wall_time_s",
)


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
) -> str:
    """What is about to run, with the estimated seconds of one run of each task and kind
    (``per_run``) and of the whole run (``estimate``)."""
    runs = len(names) * len(settings["seeds"]) * sum(len(v) for v in sweeps.values())
    lines = [
        f"learning quality: {len(names)} tasks x {len(settings['seeds'])} seed(s) x "
        f"{sum(len(v) for v in sweeps.values())} optimizer configurations = {runs} runs, "
        f"{settings['jobs']} worker(s) x {settings['threads']} thread(s)",
    ]
    for kind, lrs in sweeps.items():
        where = f" ({paths[kind]}, {backends[kind]})" if kind in paths else ""
        lines.append(f"  {optimizers.LABELS[kind]}{where}: lr {', '.join(f'{x:g}' for x in lrs)}")
    lines.append(f"  {'task':<13} {'steps':>6}  estimated seconds per run: " + ", ".join(sweeps))
    for name in names:
        cells = ", ".join(f"{per_run[name, kind]:.1f}" for kind in sweeps)
        lines.append(f"  {name:<13} {steps[name]:>6}  {cells}")
    lines.append(
        f"estimated wall time of the runs: {estimate / 60:.1f} min (from a few timed steps of "
        "each task and kind; more when other jobs load the CPUs)"
    )
    return "\n".join(lines)


def tables(doc: Dict[str, Any]) -> str:
    """The final-loss table, the learned-vs-AdamW table, the aggregates and the stress check."""
    tasks = doc["tasks"]
    kinds = [k for k in optimizers.KINDS if k in doc["sweeps"]]
    columns = [("adamw@default", "AdamW 1e-3"), ("adamw@tuned", "AdamW*")]
    columns += [
        ("sgd@tuned", "SGD*"),
        ("learned@default", "learned"),
        ("learned@tuned", "learned*"),
    ]
    if "old" in kinds:
        columns += [("old@default", "old"), ("old@tuned", "old*")]
    lines = [
        f"final validation loss (mean over {len(doc['settings']['seeds'])} seed(s); * = tuned, "
        "lr below)",
        f"  {'task':<13} {'steps':>6} {'params':>7} " + " ".join(f"{t:>10}" for _, t in columns),
    ]
    for name, info in tasks.items():
        s = info["summary_of_runs"]
        losses = " ".join(f" {_num(s['final_val_loss'].get(c))}" for c, _ in columns)
        tuned = " ".join(
            f"{'':>10}" if not c.endswith("@tuned") else f"{s['tuned_lr'][c[:-6]]:>10.2g}"
            for c, _ in columns
        )
        lines.append(f"  {name:<13} {info['steps']:>6} {info['params']:>7} {losses}")
        lines.append(f"  {'':<13} {'':>6} {'':>7} {tuned}")
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
