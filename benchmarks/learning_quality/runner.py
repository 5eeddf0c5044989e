"""The run: resolve the optimizers, plan the jobs, take the finished ones from the journal
(``--journal``), estimate the time, run the others in a process pool (each appended to the journal
as it finishes), run the stress check, summarise, print and write the results."""

import contextlib
import heapq
import importlib.util
import multiprocessing
import os
import platform
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from benchmarks.learning_quality import analysis, journal, optimizers, options, report, run, tasks

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
    matrix_scale: str = "none",
) -> List[Dict[str, Any]]:
    """One job per task, seed (``seeds``: task -> its seeds), kind and lr, all at
    ``weight_decay``; the learned kinds' matrix steps scaled by ``matrix_scale``
    (:mod:`~benchmarks.learning_quality.scaling`)."""
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
            "matrix_scale": matrix_scale,
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt (:func:`terminate_as_interrupt`)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in this process, so
    that an interrupted run stops its workers and closes its journal as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(
    jobs: List[Dict[str, Any]],
    seconds: List[float],
    workers: int,
    threads: int,
    done: Optional[Callable[[int, Dict[str, Any]], None]] = None,
) -> list:
    """Every job's record, longest jobs first, in ``workers`` processes (``1``: this one).
    ``done(i, record)`` is called in this process as soon as job ``i`` finishes. An interrupt or
    an error stops the workers at once; the jobs finished before it have been given to ``done``."""
    order = sorted(range(len(jobs)), key=lambda i: -seconds[i])
    records: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="runs", unit="run")

    def finished(i: int, record: Dict[str, Any]) -> None:
        records[i] = record
        if done is not None:
            done(i, record)
        bar.update(1)

    try:
        if workers == 1:
            for i in order:
                finished(i, run.run_job(jobs[i]))
        else:
            context = multiprocessing.get_context("spawn")
            before = set(multiprocessing.active_children())
            pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=run.init_worker, initargs=(threads,)
            )
            try:
                futures = {pool.submit(run.run_job, jobs[i]): i for i in order}
                for future in as_completed(futures):
                    finished(futures[future], future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                for child in multiprocessing.active_children():
                    if child not in before:  # this pool's workers: their runs are lost anyway
                        child.terminate()
                raise
            pool.shutdown()
    finally:
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
    grids = settings["lrs"]
    planned = optimizers.plan(
        learned_lr,
        old_lr,
        settings["quick"],
        default_only=settings["default_lr_only"],
        grids=grids,
    )
    sweeps = {kind: lrs for kind, lrs in planned.items() if kind in kinds}
    if not sweeps:
        raise SystemExit("no optimizer kind to run: " + ", ".join(kinds) + " (see notes)")
    for kind in grids:
        if kind not in sweeps:
            why = "not in --kinds" if kind not in kinds else "the kind is left out (see notes)"
            notes.append(f"--lrs {kind} ignored: {why}")
    defaults = optimizers.defaults(learned_lr, old_lr)
    paths = {kind: path for kind, path in paths.items() if kind in sweeps}
    seeds = {name: settings["task_seeds"][name] for name in names}
    roles = settings["roles"]
    decay = settings["weight_decay"]
    scale = settings["matrix_scale"]
    jobs = make_jobs(names, seeds, sweeps, steps, paths, backends, roles, decay, scale)
    journal_path = settings["journal"]
    keys: List[Dict[str, Any]] = []
    reused: Dict[int, Dict[str, Any]] = {}
    if journal_path:
        artifacts = {kind: journal.artifact_identity(path) for kind, path in paths.items()}
        keys = [journal.job_key(job, artifacts) for job in jobs]
        canonical = [journal.canonical(key) for key in keys]
        found, unreadable, unmatched = journal.read(journal_path, canonical)
        reused = {i: found[key] for i, key in enumerate(canonical) if key in found}
        if unreadable or unmatched:
            notes.append(
                f"journal {journal_path}: {unreadable + unmatched} line(s) ignored ({unreadable} "
                f"unreadable, {unmatched} of other runs)"
            )
    left = [i for i in range(len(jobs)) if i not in reused]
    remaining = [jobs[i] for i in left]

    names_left = [n for n in names if any(job["task"] == n for job in remaining)]
    kinds_left = [k for k in sweeps if any(job["optimizer"] == k for job in remaining)]
    costs = calibrate(names_left, kinds_left, steps, defaults, paths, backends) if remaining else {}
    seconds = [job_seconds(job, costs) for job in remaining]
    workers = min(settings["jobs"], len(remaining))
    pending = {(job["task"], job["seed"]) for job in remaining}
    todo = [item for item in preparations(names_left, seeds, steps) if item[:2] in pending]
    preparing = makespan(
        [
            costs.get((name, "adamw"), costs[name, kinds_left[0]])[1]
            * tasks.make(name, s, n).preparation_steps()
            for name, s, n in todo
        ],
        min(settings["jobs"], max(1, len(todo))),
    )
    estimate = makespan(seconds, workers) + preparing + (_WORKER_START_S if workers > 1 else 0.0)
    per_run = {
        (n, kind): job_seconds({"task": n, "optimizer": kind, "steps": steps[n]}, costs)
        for n, kind in costs
    }
    print(
        report.plan_text(
            names,
            steps,
            sweeps,
            settings,
            paths,
            backends,
            per_run,
            estimate,
            seeds,
            preparing,
            journal=(journal_path, len(reused)) if journal_path else None,
        )
    )
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()
    for kind, lrs in sweeps.items():
        added = [lr for lr in lrs if kind in grids and lr not in grids[kind]]
        if added:
            notes.append(
                f"--lrs {kind}: the untuned baseline lr(s) {', '.join(f'{x:g}' for x in added)} "
                "added"
            )
    if reused:
        notes.append(f"{len(reused)} of {len(jobs)} runs reused from the journal {journal_path}")
    if settings["estimate_only"]:
        return 0

    records: List[Optional[Dict[str, Any]]] = [reused.get(i) for i in range(len(jobs))]
    writer = journal.Writer(journal_path) if journal_path else None

    def done(k: int, record: Dict[str, Any]) -> None:
        records[left[k]] = record
        if writer is not None:
            writer.append(keys[left[k]], record)

    try:
        with terminate_as_interrupt():
            prepare(todo, settings["jobs"], settings["threads"])
            if remaining:
                execute(remaining, seconds, workers, settings["threads"], done)
    except KeyboardInterrupt as interrupt:
        finished = sum(record is not None for record in records)
        kept = (
            f"all in the journal {journal_path}: rerun the same command to resume"
            if journal_path
            else "no --journal: none kept"
        )
        print(f"interrupted: {finished} of {len(jobs)} runs finished ({kept})", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    finally:
        if writer is not None:
            writer.close()
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
                matrix_scale=scale if kind in journal.ARTIFACT_KINDS else "none",
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
