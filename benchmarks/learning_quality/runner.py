"""The run: resolve the optimizers, plan the jobs, estimate the time, run the jobs in a process
pool, run the stress check, summarise, print and write the results."""

import heapq
import importlib.util
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from benchmarks.learning_quality import analysis, optimizers, options, report, run, tasks

#: The lr each kind's step is timed at for the estimate (the learned kinds: their default).
_TIMING_LRS = {"adamw": optimizers.ADAMW_DEFAULT_LR, "sgd": 1e-2}
#: (task, kind) -> seconds of set-up, per step and per validation.
Costs = Dict[Tuple[str, str], Tuple[float, float, float]]
#: Seconds a spawned worker takes to start (imports), added once per worker to the estimate.
_WORKER_START_S = 3.0


def missing_requirements(names: Sequence[str]) -> Dict[str, str]:
    """Tasks whose optional packages are not installed: task -> why."""
    missing = {}
    for name in names:
        absent = [m for m in tasks.TASKS[name].needs if importlib.util.find_spec(m) is None]
        if absent:
            missing[name] = f"needs {', '.join(absent)} (pip install 'compiledopt[tasks]')"
    return missing


def make_jobs(
    names: Sequence[str],
    seeds: Dict[str, List[int]],
    sweeps: Dict[str, List[float]],
    steps: Dict[str, int],
    paths: Dict[str, str],
    backends: Dict[str, str],
    roles: str = optimizers.DEFAULT_ROLES,
    weight_decay: float = 0.0,
) -> List[Dict[str, Any]]:
    """One job per task, seed (``seeds``: task -> its seeds), kind and lr, all at
    ``weight_decay``."""
    return [
        {
            "task": name,
            "seed": seed,
            "steps": steps[name],
            "optimizer": kind,
            "lr": lr,
            "paths": paths,
            "backends": backends,
            "roles": roles,
            "weight_decay": weight_decay,
        }
        for name in names
        for kind, lrs in sweeps.items()
        for lr in lrs
        for seed in seeds[name]
    ]


def preparations(
    names: Sequence[str], seeds: Dict[str, List[int]], steps: Dict[str, int]
) -> List[Tuple[str, int, int]]:
    """``(task, seed, steps)`` of every task and seed with one-off work (pre-training)."""
    return [
        (name, seed, steps[name])
        for name in names
        if tasks.make(name, 0, steps[name]).preparation_steps() > 0
        for seed in seeds[name]
    ]


def prepare(todo: List[Tuple[str, int, int]], workers: int, threads: int) -> None:
    """Do every task's one-off work (:func:`~benchmarks.learning_quality.run.prepare_task`) before
    any run, in ``workers`` processes (``1``: this one); its results stay in memory and in the
    task's disk cache for the runs."""
    if not todo:
        return
    bar = tqdm(total=len(todo), desc="preparing (pre-training)", unit="task")
    if workers == 1 or len(todo) == 1:
        for item in todo:
            run.prepare_task(*item)
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            min(workers, len(todo)),
            mp_context=context,
            initializer=run.init_worker,
            initargs=(threads,),
        ) as pool:
            for future in as_completed([pool.submit(run.prepare_task, *item) for item in todo]):
                future.result()
                bar.update(1)
    bar.close()


def calibrate(
    names: Sequence[str],
    kinds: Sequence[str],
    steps: Dict[str, int],
    defaults: Dict[str, float],
    paths: Dict[str, str],
    backends: Dict[str, str],
) -> Costs:
    """Seconds of set-up, per step and per validation of each task under each kind (from a few
    timed steps: :func:`~benchmarks.learning_quality.run.time_job`)."""
    costs = {}
    for kind in kinds:  # a warm-up: the first graph load and run of a process cost extra
        lr = defaults.get(kind, _TIMING_LRS.get(kind, 1e-3))
        job = {"task": names[0], "seed": 0, "steps": steps[names[0]], "optimizer": kind}
        run.time_job({**job, "lr": lr, "paths": paths, "backends": backends}, reps=1)
    for name in names:
        tasks.make(name, 0, steps[name]).timing_model()  # the data, once per process
        for kind in kinds:
            lr = defaults.get(kind, _TIMING_LRS.get(kind, 1e-3))
            job = {"task": name, "seed": 0, "steps": steps[name], "optimizer": kind, "lr": lr}
            costs[name, kind] = run.time_job({**job, "paths": paths, "backends": backends})
    return costs


def job_seconds(job: Dict[str, Any], costs: Costs) -> float:
    """The estimated seconds of ``job`` from its task's and kind's timed steps."""
    setup_s, step_s, eval_s = costs[job["task"], job["optimizer"]]
    return setup_s + job["steps"] * step_s + len(run.evaluation_steps(job["steps"])) * eval_s


def makespan(durations: Sequence[float], workers: int) -> float:
    """The wall time of running ``durations`` longest first on ``workers`` workers."""
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads)


def execute(jobs: List[Dict[str, Any]], seconds: List[float], workers: int, threads: int) -> list:
    """Every job's record, longest jobs first, in ``workers`` processes (``1``: this one)."""
    order = sorted(range(len(jobs)), key=lambda i: -seconds[i])
    records: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="runs", unit="run")
    if workers == 1:
        for i in order:
            records[i] = run.run_job(jobs[i])
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=run.init_worker, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(run.run_job, jobs[i]): i for i in order}
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return records


def environment(settings: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_worker": settings["threads"],
        "workers": settings["jobs"],
        "load_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.perf_counter()
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = options.parse(arguments)
    settings = options.settings(args)
    torch.set_num_threads(settings["threads"])
    notes: List[str] = []
    paths = {"learned": optimizers.resolve_artifact(settings["optimizer"])}
    learned_lr = settings["optimizer_lr"] or optimizers.manifest_lr(paths["learned"])
    old_lr = None
    if settings["old_optimizer"] is not None:
        if Path(settings["old_optimizer"]).is_dir():
            paths["old"] = settings["old_optimizer"]
            old_lr = optimizers.manifest_lr(paths["old"])
        else:
            notes.append(f"old optimizer {settings['old_optimizer']} not found: left out")
    backends = {k: optimizers.backend_for(p, settings["backend"]) for k, p in paths.items()}
    skipped = missing_requirements(settings["tasks"])
    notes += [f"task {name} skipped: {why}" for name, why in skipped.items()]
    names = [n for n in settings["tasks"] if n not in skipped]
    if not names:
        raise SystemExit("no task can run: " + "; ".join(notes))
    steps = {n: tasks.steps_for(n, settings["quick"], settings["steps_scale"]) for n in names}
    kinds = settings["kinds"]
    planned = optimizers.plan(
        learned_lr, old_lr, settings["quick"], default_only=settings["default_lr_only"]
    )
    sweeps = {kind: lrs for kind, lrs in planned.items() if kind in kinds}
    if not sweeps:
        raise SystemExit("no optimizer kind to run: " + ", ".join(kinds) + " (see notes)")
    defaults = optimizers.defaults(learned_lr, old_lr)
    paths = {kind: path for kind, path in paths.items() if kind in sweeps}
    seeds = {name: settings["task_seeds"][name] for name in names}
    roles = settings["roles"]
    decay = settings["weight_decay"]
    jobs = make_jobs(names, seeds, sweeps, steps, paths, backends, roles, decay)

    costs = calibrate(names, list(sweeps), steps, defaults, paths, backends)
    seconds = [job_seconds(job, costs) for job in jobs]
    workers = min(settings["jobs"], len(jobs))
    todo = preparations(names, seeds, steps)
    preparing = makespan(
        [
            costs[name, "adamw"][1] * tasks.make(name, s, n).preparation_steps()
            for name, s, n in todo
        ],
        min(settings["jobs"], max(1, len(todo))),
    )
    estimate = makespan(seconds, workers) + preparing + (_WORKER_START_S if workers > 1 else 0.0)
    per_run = {
        (n, kind): job_seconds({"task": n, "optimizer": kind, "steps": steps[n]}, costs)
        for n in names
        for kind in sweeps
    }
    print(
        report.plan_text(
            names, steps, sweeps, settings, paths, backends, per_run, estimate, seeds, preparing
        )
    )
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()
    if settings["estimate_only"]:
        return 0

    prepare(todo, settings["jobs"], settings["threads"])
    records = execute(jobs, seconds, workers, settings["threads"])
    stress = {
        kind: [
            run.stress(
                kind,
                name,
                defaults[kind],
                paths,
                backends,
                settings["stress_steps"],
                roles=roles,
                weight_decay=decay,
            )
            for name in run.STRESS_TASKS
            if name in tasks.TASKS
        ]
        for kind in (*paths, "adamw")  # AdamW: the reference that passes
    }
    summaries = analysis.summarize(records, seeds, defaults)
    doc = {
        "schema": report.SCHEMA,
        "command": shlex.join(
            [
                "python",
                "-m",
                "benchmarks.learning_quality",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "settings": settings,
        "environment": environment(settings),
        "optimizers": {
            kind: {
                "path": path,
                "name": optimizers.artifact_name(path),
                "manifest_lr": optimizers.manifest_lr(path),
                "default_lr": defaults[kind],
                "backend": backends[kind],
            }
            for kind, path in paths.items()
        },
        "sweeps": sweeps,
        "default_lrs": defaults,
        "tasks": {
            n: {**tasks.make(n, 0, steps[n]).describe(), "summary_of_runs": summaries[n]}
            for n in names
        },
        "runs": records,
        "aggregates": analysis.aggregate(summaries, records),
        "lr_spread": analysis.lr_spread(summaries),
        "stress": stress,
        "notes": notes,
        "estimated_s": estimate,
        "wall_time_s": time.perf_counter() - start,
    }
    text = report.tables(doc)
    print(text)
    written = report.write(doc, text, settings["output"])
    if settings["plots"]:
        from benchmarks.learning_quality import plots

        written += plots.write(doc, settings["output"])
    print("wrote " + ", ".join(written))
    return 0
