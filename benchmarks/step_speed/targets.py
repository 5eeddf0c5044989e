"""Production targets of the packaged default learned optimizer.

Run ``python -m benchmarks.step_speed.targets`` from the repository root.

The packaged default (:data:`compiledopt.pretrained.DEFAULT`, by name) runs as
``FrozenOptimizer(params, DEFAULT, backend=...)`` on each backend asked for, at each thread count
(each in a child process of its own: torch's and onnxruntime's thread pools are fixed at first
use), next to ``torch.optim.AdamW`` (fused and foreach) on the same parameters. Every time is the
median of repeated steps after warm-up (:func:`benchmarks.step_speed.measure.time_optimizer`);
the headline shows ratios only:

1. ResNet-18 (:class:`~benchmarks.step_speed.models.ResNet18`, 11.7M parameters, 62 tensors): the
   step over fused AdamW's (target ≤ 8×), over foreach AdamW's, and over the model's own
   forward + backward (zero_grad, forward, cross-entropy on random labels, backward) at batch
   8×3×64×64 (target ≤ 1×). A tiny GPT-2 (:func:`~benchmarks.step_speed.models.gpt2_tiny_shapes`,
   0.11M parameters, 28 tensors): the step over fused AdamW's (target ≤ 5×).
2. Many tensors: 1,000 parameters of 1,024 elements against 10 of 102,400 (the same total): time
   per coordinate (target ≤ 1.5×); the 1,000-tensor step over foreach AdamW's (target ≤ 2×); and
   1,000 tensors of mixed ranks and small sizes (their step over foreach AdamW's: target ≤ 3×).
3. Memory: the peak resident memory of one step (after the first, so the state exists) beyond
   the optimizer state, on one 10M-element parameter, in a fresh child process per optimizer:
   what the optimizer holds between steps besides its state (a runtime's arena, its graphs) plus
   the rise within the step, over the state bytes (target ≤ 2×), next to AdamW's.
4. Roofline: the floor of each step from the artifact's own cost model and the ceilings measured
   at that thread count (:mod:`benchmarks.step_speed.roofline`), and the achieved fraction (on
   ResNet-18, target ≥ 30%).
5. GPU, where ``torch.cuda.is_available()``: ResNet-18 and a 16.8M-parameter MLP stack timed with
   CUDA events (target: step ≤ 2× fused AdamW's on the same card); skipped with a note otherwise.
   ``--gpu-only`` times this section alone (``scripts/gpu_check.sh`` runs it after the GPU
   tests).

``--matmul-precision medium`` runs every child under ``torch.set_float32_matmul_precision``
(the learned step's matrix products, Newton–Schulz's among them, the model's forward + backward
and the measured peak alike; AdamW has none). Targets are judged at the largest thread count
run (all cores by default). Outputs under
``--out``: ``targets.json``, ``targets.md``, ``targets.png``. The cases and the child processes
are :mod:`benchmarks.step_speed.targets_runs`'s, the report and the plot
:mod:`benchmarks.step_speed.targets_report`'s.
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.step_speed.measure import ROOT, quiet
from benchmarks.step_speed.targets_runs import ADAMW, CASES, case_shapes, memory_label

PROG = "python -m benchmarks.step_speed.targets"
SCHEMA = "compiledopt-bench-step-targets/1"
BACKENDS = ("eager", "compiled", "torchscript", "onnx", "aoti", "auto")
DEFAULT_BACKENDS = ("eager", "compiled", "torchscript", "onnx", "auto")
MATMUL_PRECISIONS = ("highest", "high", "medium")
RESULTS = Path(__file__).resolve().parents[1] / "results"

#: Sizes of the full and the quick run.
SIZES: Dict[str, Dict[str, Any]] = {
    "full": {
        "resnet_width": 64,
        "classes": 1000,
        "batch": [8, 3, 64, 64],
        "many": [1000, 1024],
        "few": [10, 102400],
        "mixed": [1000, 4096],
        "memory_numel": 10_000_000,
        "gpu_large": "mlp-stack",
        "reps": 10,
        "warmup": 3,
        "ceilings": {"matmul_n": 2048, "copy_mb": 256, "reps": 5},
        "timeout_s": 1800.0,
    },
    "quick": {
        "resnet_width": 8,
        "classes": 100,
        "batch": [2, 3, 32, 32],
        "many": [100, 64],
        "few": [10, 640],
        "mixed": [100, 256],
        "memory_numel": 250_000,
        "gpu_large": "convnet",
        "reps": 3,
        "warmup": 1,
        "ceilings": {"matmul_n": 512, "copy_mb": 16, "reps": 3},
        "timeout_s": 300.0,
    },
}


# -- the command line ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: ...``) and status 2."""

    def error(self, message: str) -> "None":
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Production targets of the packaged default learned optimizer: ResNet-18, "
        "many tensors, memory, roofline and GPU, as ratios to AdamW and to forward + backward.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, few reps (structure only)")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help=f"FrozenOptimizer backends (default: {' '.join(DEFAULT_BACKENDS)}; aoti builds "
        "AOTInductor graphs first, minutes)",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts, each a positive integer or all (default: 1,all; "
        "1 with --quick)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed steps (default: 10; 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3; 1 quick)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before a child process is stopped (default: 1800; 300 quick)",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=None,
        help=f"the cases to time (default: all of {' '.join(CASES)}; the per-coordinate ratios "
        "need few too)",
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurement of one step"
    )
    p.add_argument(
        "--gpu-only",
        action="store_true",
        help="time the GPU section only (no CPU runs, no memory measurement); needs a CUDA device",
    )
    p.add_argument(
        "--memory-shape",
        default=None,
        help="the parameter of the peak-memory measurement: N (a vector) or ROWSxCOLS (a matrix; "
        "default: a vector of 10,000,000; 250,000 quick)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of parameters, gradients and data")
    p.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="highest",
        help="torch.set_float32_matmul_precision in every child, for the optimizers and the "
        "model alike: medium lets float32 matrix products run in bfloat16 where the hardware "
        "has it (AMX, tensor cores), and the measured peak FLOP/s follows (default: highest)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: benchmarks/results/targets, or "
        "benchmarks/results/quick/targets with --quick)",
    )
    return p


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_counts(text: str) -> List[int]:
    """``--threads``: ``"1,all"`` → ``[1, cores()]`` (sorted, without repeats)."""
    counts = set()
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            counts.add(cores())
        elif item.isdigit() and int(item) >= 1:
            counts.add(int(item))
        else:
            raise ValueError(
                f"invalid --threads item {item!r} in {text!r} (positive integers or all)"
            )
    return sorted(counts)


def settings_of(args: argparse.Namespace, p: argparse.ArgumentParser) -> Dict[str, Any]:
    """The run's settings from the options; a bad value ends the run with one line (status 2)."""
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    try:
        threads = thread_counts(args.threads or ("1" if args.quick else "1,all"))
    except ValueError as error:
        p.error(str(error))
    for name in ("reps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "reps" else 0):
            p.error(f"invalid --{name}: {value} (at least {1 if name == 'reps' else 0})")
    if args.timeout is not None and not args.timeout > 0:
        p.error(f"invalid --timeout: {args.timeout} (a positive number of seconds)")
    out = Path(args.out) if args.out else RESULTS / ("quick/targets" if args.quick else "targets")
    if out.exists() and not out.is_dir():
        p.error(f"invalid --out: {str(out)!r} is a file, not a folder")
    if args.gpu_only and not torch.cuda.is_available():
        p.error("invalid --gpu-only: no CUDA device here (torch.cuda.is_available() is False)")
    backends = list(dict.fromkeys(args.backends or DEFAULT_BACKENDS))
    memory_shape = [sizes["memory_numel"]]
    if args.memory_shape is not None:
        parts = args.memory_shape.split("x")
        if not 1 <= len(parts) <= 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            p.error(f"invalid --memory-shape: {args.memory_shape!r} (N or ROWSxCOLS, positive)")
        memory_shape = [int(x) for x in parts]
    return {
        "mode": mode,
        "backends": backends,
        "threads": threads,
        "reps": args.reps or sizes["reps"],
        "warmup": args.warmup if args.warmup is not None else sizes["warmup"],
        "slow_step_s": 5.0,
        # Fast steps get more timed reps, to fill this many seconds (up to 10× --reps).
        "min_timed_s": 0.0 if args.quick else 0.25,
        "timeout_s": args.timeout or sizes["timeout_s"],
        "seed": args.seed,
        "matmul_precision": args.matmul_precision,
        "cases": list(dict.fromkeys(args.cases or CASES)),
        "memory": not (args.no_memory or args.gpu_only),
        "gpu_only": args.gpu_only,
        "out": str(out),
        **{k: v for k, v in sizes.items() if k not in ("reps", "warmup", "timeout_s")},
        "memory_shape": memory_shape,
        "memory_numel": math.prod(memory_shape),
    }


def spawn(job: Dict[str, Any], timeout: float) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Run ``job`` in a child process (:func:`child_main`) with ``job["threads"]`` threads, stopped
    after ``timeout`` seconds. Returns ``(result, None)`` or ``(None, why)``."""
    with tempfile.TemporaryDirectory(prefix="compiledopt-targets-") as work:
        job = {**job, "result": str(Path(work) / "result.json")}
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from benchmarks.step_speed.targets_runs import child_main; child_main()"
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a stopped child takes its compile workers with it
        )
        try:
            _, stderr = child.communicate(json.dumps(job), timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return None, f"timeout: stopped after {timeout:.0f} s"
        # `auto` builds the packages a run lacked in a background process as it exits: the next
        # child must not share the CPU with that build (it read 12x slower on 2 threads).
        waited = _wait_for_builders()
        done = Path(job["result"])
        if child.returncode == 0 and done.exists():
            return {**json.loads(done.read_text()), "builders_waited_s": waited}, None
        tail = " ".join(stderr.strip().splitlines()[-3:])
        return None, f"child exited {child.returncode}: {tail}"


def _wait_for_builders() -> float:
    """Wait for the package builds a child left running in the background (see
    ``compiledopt.runtime.package_builder``); the seconds waited."""
    from compiledopt.runtime.package_builder import wait_for_builders

    started = time.monotonic()
    if not wait_for_builders():
        print("targets: a background package build still runs after an hour", file=sys.stderr)
    return time.monotonic() - started


def spawn_many(
    jobs: Sequence[Dict[str, Any]], timeout: float, parallel: int
) -> List[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    """:func:`spawn` for each job, ``parallel`` at a time (for measurements that are not timings:
    a peak resident memory is per process)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda job: spawn(job, timeout), jobs))


# -- the run ----------------------------------------------------------------------------------


def _log(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {text}", file=sys.stderr, flush=True)


def _preflight() -> None:
    from compiledopt.apps.requirements import require

    try:
        require("matplotlib", "bench")
    except ImportError as error:
        print(f"{PROG}: the plot {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _aoti_artifact(s: Dict[str, Any], work: Path) -> Tuple[Optional[str], Dict[str, Any]]:
    """The default optimizer's weights exported with AOTInductor graphs for the ranks the cases
    use (the packaged artifact ships none): ``(path or None, build record)``."""
    from compiledopt import pretrained
    from compiledopt.export import export_shape_agnostic

    ranks = sorted({len(shape) for case in CASES for _, shape in case_shapes(case, s)} | {1})
    start = time.perf_counter()
    try:
        artifact = pretrained.load(pretrained.DEFAULT)
        with quiet():
            path = export_shape_agnostic(
                work / "aoti",
                artifact.spec,
                artifact.transforms()[0],
                backends=["aoti"],
                ranks=ranks,
                lr=float(artifact.manifest["lr"]),
            )
    except Exception as error:  # recorded: the aoti rows say why they did not run
        return None, {
            "status": "error",
            "reason": f"export failed: {type(error).__name__}: {error}",
        }
    return str(path), {"status": "ok", "ranks": ranks, "seconds": time.perf_counter() - start}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; write ``targets.{json,md,png}`` under ``--out``, print the markdown,
    return the JSON document."""
    p = parser()
    args = p.parse_args(list(argv) if argv is not None else None)
    s = settings_of(args, p)
    _preflight()
    from benchmarks.step_speed import targets_report
    from benchmarks.step_speed.runner import machine_info
    from compiledopt import pretrained

    started = time.perf_counter()
    shown = list(argv) if argv is not None else sys.argv[1:]
    artifact = pretrained.load(pretrained.DEFAULT)
    doc: Dict[str, Any] = {
        "schema": SCHEMA,
        "mode": s["mode"],
        "command": " ".join([PROG, *map(shlex.quote, shown)]),
        "settings": s,
        "machine": {**machine_info(), **_versions()},
        "optimizer": {
            "name": pretrained.DEFAULT,
            "spec": artifact.spec,
            "lr": artifact.manifest["lr"],
            "artifact_backends": artifact.backends,
            "state_names": artifact.manifest.get("state_names"),
        },
        "cases": targets_report.case_info(s),
        "builds": {},
        "runs": [],
        "notes": [],
    }
    work = tempfile.TemporaryDirectory(prefix="compiledopt-targets-")
    try:
        sources = {b: pretrained.DEFAULT for b in s["backends"]}
        if "aoti" in s["backends"]:
            _log(started, "exporting AOTInductor graphs (minutes)")
            sources["aoti"], doc["builds"]["aoti"] = _aoti_artifact(s, Path(work.name))
        if not s["gpu_only"]:
            _run_cpu(doc, s, sources, started)
        _run_memory(doc, s, sources, started)
        _run_gpu(doc, s, sources, started)
    finally:
        work.cleanup()
    targets_report.derive(doc)
    doc["wall_s"] = time.perf_counter() - started
    doc["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    markdown = targets_report.write(doc, Path(s["out"]))
    print(markdown)
    return doc


def _versions() -> Dict[str, Any]:
    import matplotlib
    import numpy

    import compiledopt

    return {
        "compiledopt": compiledopt.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cores_usable": cores(),
    }


def _unavailable(source: Optional[str], build: Optional[Dict[str, Any]]) -> Optional[str]:
    if source is None:
        return f"skipped: no AOTInductor artifact ({(build or {}).get('reason')})"
    return None


def _run_cpu(doc: Dict[str, Any], s: Dict[str, Any], sources: Dict[str, Any], t0: float) -> None:
    for threads in s["threads"]:
        run: Dict[str, Any] = {"threads": threads, "frozen": {}}
        job = {"kind": "baseline", "threads": threads, "settings": s}
        result, failure = spawn(job, s["timeout_s"])
        run["baseline"] = result or {"status": "error", "reason": failure}
        run["baseline"].setdefault("status", "ok")
        _log(t0, f"{threads} thread(s): AdamW and forward + backward {failure or 'done'}")
        for backend in s["backends"]:
            skip = _unavailable(sources[backend], doc["builds"].get(backend))
            if skip:
                run["frozen"][backend] = {"status": "skipped", "reason": skip}
                continue
            job = {
                "kind": "frozen",
                "threads": threads,
                "settings": s,
                "backend": backend,
                "artifact": sources[backend],
            }
            result, failure = spawn(job, s["timeout_s"])
            run["frozen"][backend] = (
                {"status": "ok", **result}
                if result
                else {
                    "status": "error",
                    "reason": failure,
                }
            )
            _log(t0, f"{threads} thread(s): {backend} {failure or 'done'}")
        doc["runs"].append(run)


def _run_memory(doc: Dict[str, Any], s: Dict[str, Any], sources: Dict[str, Any], t0: float) -> None:
    names = [*(f"adamw-{v}" for v in ADAMW), *s["backends"]]
    threads = max(s["threads"])
    if not s.get("memory", True):
        doc["memory"] = {"threads": threads, "rows": {}}
        return
    jobs, memory = [], {}
    for name in names:
        skip = None if name.startswith("adamw-") else _unavailable(sources[name], None)
        if skip:
            memory[name] = {"status": "skipped", "reason": skip}
            continue
        jobs.append(
            {
                "kind": "memory",
                "threads": threads,
                "settings": s,
                "optimizer": name,
                "artifact": sources.get(name),
            }
        )
    for job, (result, failure) in zip(jobs, spawn_many(jobs, s["timeout_s"], cores())):
        memory[job["optimizer"]] = result or {"status": "error", "reason": failure}
    doc["memory"] = {"threads": threads, "rows": {n: memory[n] for n in names}}
    _log(t0, f"memory of one step on {memory_label(s)} done")


def _run_gpu(doc: Dict[str, Any], s: Dict[str, Any], sources: Dict[str, Any], t0: float) -> None:
    if not torch.cuda.is_available():
        doc["gpu"] = {"status": "skipped", "note": "skipped: torch.cuda.is_available() is False"}
        return
    backends = [b for b in s["backends"] if b != "aoti"]
    job = {
        "kind": "gpu",
        "threads": max(s["threads"]),
        "settings": s,
        "backends": backends,
        "artifact": doc["optimizer"]["name"],
    }
    result, failure = spawn(job, s["timeout_s"])
    doc["gpu"] = {"status": "ok", **result} if result else {"status": "error", "reason": failure}
    if "aoti" in s["backends"]:
        doc["notes"].append("GPU: aoti left out (the AOTInductor graphs are built for the CPU).")
    _log(t0, f"GPU {failure or 'done'}")


if __name__ == "__main__":
    main()
