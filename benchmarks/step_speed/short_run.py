"""Short training runs, whole: what a user waits for, compile included.

``python -m benchmarks.step_speed.short_run`` trains one task of the learning-quality suite (a
GPT char-LM by default) for a few hundred steps in a fresh process per optimizer: AdamW (fused
and foreach) and the packaged default learned optimizer on each backend asked for. It times the
run from building the optimizer to the last step, and the first step on its own. A learned
optimizer runs twice on each backend: first with empty caches, Inductor's and compiledopt's (its
compiled packages and compile times: a machine that never ran the artifact, ``cold``), then with
the caches that run left (``warm``). With ``auto`` the
first steps run eager while the rule compiles in the background; the run's record says whether
every compile had finished by its end.

Outputs under ``--out`` (default ``benchmarks/results/short_run``): ``short_run.json`` (settings,
machine, every run) and ``short_run.md`` (the table: wall time and first step, and their ratio to
fused AdamW's run on as many threads), and ``short_run.png``. Target: a learned optimizer's run
at most 1.5× fused AdamW's.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.step_speed.measure import child_job, child_result, in_child, json_default

PROG = "python -m benchmarks.step_speed.short_run"
RESULTS = Path(__file__).resolve().parents[1] / "results"
ADAMW_LR = 3e-3
TARGET = 1.5
BACKENDS = ("auto", "eager", "compiled")


def run_child() -> None:
    """In a child process: one short run (:func:`short_run`), handed back."""
    child_result(short_run(child_job()))


def short_run(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train ``job["task"]`` for ``job["steps"]`` steps with ``job["optimizer"]`` on
    ``job["threads"]`` threads: the wall time from building the optimizer to the end of the last
    step, the first step alone, the last training loss."""
    from benchmarks.learning_quality import tasks

    torch.set_num_threads(job["threads"])
    task = tasks.make(job["task"], 0, job["steps"])
    model = task.model()
    batches = [task.batch(step) for step in range(job["steps"])]
    start = time.perf_counter()
    optimizer = _optimizer(job["optimizer"], model)
    first = None
    loss = torch.tensor(float("nan"))
    for step, (inputs, targets) in enumerate(batches):
        began = time.perf_counter()
        loss = task.loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:
            first = time.perf_counter() - began
    wall = time.perf_counter() - start
    row = {**job, "wall_s": wall, "first_step_s": first, "final_loss": float(loss)}
    if job["optimizer"] == "auto":
        from compiledopt.runtime.warming import compiles_started, wait

        row["compiles_started"] = compiles_started()
        row["compiles_finished"] = wait(0.0) if row["compiles_started"] else False
    return row


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name.startswith("adamw-"):
        variant = {"fused": True} if name == "adamw-fused" else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, **variant)
    import compiledopt as co

    return co.FrozenOptimizer(co.param_groups(model), backend=name)


def parser() -> argparse.ArgumentParser:
    from benchmarks.step_speed.targets import OneLineParser

    p = OneLineParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--task", default="gpt-lm-rms", help="a learning-quality task (default: gpt-lm-rms)"
    )
    p.add_argument("--steps", type=int, default=800, help="training steps (default: 800)")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=["auto"],
        help="backends of the learned optimizer (default: auto)",
    )
    p.add_argument("--threads", default="1,all", help="thread counts, e.g. 1,all (default)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (default 1800)")
    p.add_argument("--out", default=str(RESULTS / "short_run"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    return p


def _settings(argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    from benchmarks.learning_quality import tasks
    from benchmarks.step_speed.targets import thread_counts

    p = parser()
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.task not in tasks.TASKS:
        p.error(f"invalid --task: {args.task!r} (one of {', '.join(tasks.TASKS)})")
    if args.steps < 1:
        p.error(f"invalid --steps: {args.steps} (at least 1)")
    if not args.timeout > 0:
        p.error(f"invalid --timeout: {args.timeout} (a positive number of seconds)")
    try:
        threads = thread_counts(args.threads)
    except ValueError as error:
        p.error(str(error))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"invalid --out: {str(out)!r} is a file, not a folder")
    return {
        "task": args.task,
        "steps": args.steps,
        "backends": list(dict.fromkeys(args.backends)),
        "threads": threads,
        "timeout_s": args.timeout,
        "out": str(out),
        "plot": not args.no_plot,
    }


def _wait_for_builders(env: Dict[str, str]) -> Optional[float]:
    """Wait for the packages a run left to build in the background (``auto``'s, see
    ``compiledopt.runtime.package_builder``), so the next run neither shares the CPU with the
    build nor misses its result; the seconds waited (``None`` if that could not be told)."""
    code = (
        "import time; from compiledopt.runtime.package_builder import wait_for_builders as w\n"
        "t = time.monotonic(); w(); print(time.monotonic() - t)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600
    )
    try:
        return float(done.stdout.split()[-1])
    except (IndexError, ValueError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run every short run; write and print the results; return the JSON document."""
    from benchmarks.step_speed.runner import machine_info

    s = _settings(argv)
    started = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    for threads in s["threads"]:
        with tempfile.TemporaryDirectory(prefix="compiledopt-short-run-") as cache:
            plan = [("adamw-fused", None), ("adamw-foreach", None)]
            plan += [(b, cache_state) for b in s["backends"] for cache_state in ("cold", "warm")]
            for optimizer, cache_state in plan:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                if cache_state is not None:  # one set of caches per backend: cold, then warm
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache) / optimizer)
                    # compiledopt's: compiled packages, compile times, backend timings
                    env["COMPILEDOPT_CACHE"] = str(Path(cache) / optimizer / "compiledopt")
                job = {
                    "task": s["task"],
                    "steps": s["steps"],
                    "threads": threads,
                    "optimizer": optimizer,
                    "cache": cache_state,
                }
                row, failure = in_child(
                    "run_child", job, s["timeout_s"], env, module="benchmarks.step_speed.short_run"
                )
                row = row or {**job, "status": "error", "reason": failure}
                if cache_state is not None:  # packages a run left to build for the next
                    row["after_run_build_s"] = _wait_for_builders(env)
                runs.append(row)
                print(
                    f"[{time.perf_counter() - started:5.0f} s] {threads} thread(s) "
                    f"{optimizer} {cache_state or ''} {failure or 'done'}",
                    file=sys.stderr,
                )
    doc = {
        "command": " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "settings": s,
        "machine": machine_info(),
        "torch": torch.__version__,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }
    derive(doc)
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "short_run.json").write_text(json.dumps(doc, indent=1, default=json_default) + "\n")
    text = markdown(doc)
    (out / "short_run.md").write_text(text)
    if s["plot"]:
        plot(doc, out / "short_run.png")
    print(text)
    return doc


def derive(doc: Dict[str, Any]) -> None:
    """Each run's wall time and first step over fused AdamW's on as many threads, and whether
    the run meets the target."""
    fused = {
        r["threads"]: r for r in doc["runs"] if r["optimizer"] == "adamw-fused" and "wall_s" in r
    }
    for row in doc["runs"]:
        base = fused.get(row["threads"])
        if "wall_s" not in row or base is None:
            continue
        row["wall_over_adamw_fused"] = row["wall_s"] / base["wall_s"]
        row["first_step_over_adamw_fused"] = row["first_step_s"] / base["first_step_s"]
        if not row["optimizer"].startswith("adamw-"):
            row["met"] = row["wall_over_adamw_fused"] <= TARGET


def markdown(doc: Dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        f"# Short runs: {s['task']}, {s['steps']} steps",
        "",
        f"`{doc['command']}` — {doc['machine'].get('cpu')}, torch {doc['torch']}; "
        f"{doc['wall_s']:.0f} s. Target: a learned optimizer's run ≤ {TARGET:g}× fused AdamW's.",
        "",
        "| threads | optimizer | caches | run s | first step s | run / fused AdamW run "
        "| first step / fused AdamW's | background compiles | built after the run | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        if "wall_s" not in r:
            lines.append(
                f"| {r['threads']} | {r['optimizer']} | {r.get('cache') or '–'} | "
                f"{r.get('reason')} | | | | | | |"
            )
            continue
        ratio = r.get("wall_over_adamw_fused")
        mark = "" if "met" not in r else (" ✓" if r["met"] else " ✗")
        lines.append(
            f"| {r['threads']} | {r['optimizer']} | {r.get('cache') or '–'} | {r['wall_s']:.1f} | "
            f"{r['first_step_s']:.3f} | {ratio:.2f}×{mark} | "
            f"{r['first_step_over_adamw_fused']:.1f}× | {_compiles(r)} | {_built(r)} | "
            f"{r['final_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _compiles(row: Dict[str, Any]) -> str:
    """What ``auto``'s background compiles did in a run (other optimizers start none)."""
    started = row.get("compiles_started")
    if not started:
        return "none started" if started == 0 else "–"
    return f"{started} started, {'all' if row.get('compiles_finished') else 'not all'} finished"


def _built(row: Dict[str, Any]) -> str:
    """How long packages left by the run took to build after it (waited for before the next)."""
    seconds = row.get("after_run_build_s")
    return "–" if seconds is None else ("none" if seconds < 1.0 else f"{seconds:.0f} s")


def plot(doc: Dict[str, Any], path: Path) -> None:
    """Each run's wall time over fused AdamW's, a group of bars per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["runs"] if "wall_over_adamw_fused" in r]
    labels = [f"{r['optimizer']} {r.get('cache') or ''}".strip() for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows)), 4.0))
    colors = [f"C{doc['settings']['threads'].index(r['threads'])}" for r in rows]
    ax.bar(range(len(rows)), [r["wall_over_adamw_fused"] for r in rows], color=colors)
    ax.axhline(TARGET, color="k", linestyle="--", linewidth=1, label=f"target {TARGET:g}×")
    ax.set_xticks(
        range(len(rows)), [f"{t}\n{r['threads']}t" for t, r in zip(labels, rows)], fontsize=7
    )
    ax.set_ylabel("run wall time / fused AdamW's")
    ax.set_title(f"{doc['settings']['task']}, {doc['settings']['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
