"""Measuring one configuration: step timing, peak memory, Dynamo graph counts, the profiler, and
the child-process runner that isolates a run and stops it at a time limit.

The timing itself and the machine's ceilings are :mod:`compiledopt.bench`'s (the library's
user-facing measurement), so the suite and ``compiledopt bench`` time steps the same way.
"""

import contextlib
import gc
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from compiledopt.bench import median_time

#: The repository root: a child process imports ``benchmarks`` from there.
ROOT = Path(__file__).resolve().parents[2]
_RESULT = "COMPILEDOPT-BENCH-RESULT:"


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_bytes() -> Optional[int]:
    """This process's resident set (``VmRSS``) in bytes, or ``None`` where it can't be read."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else 1024 * kb


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); ``False`` where that isn't possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory above the level at entry, in bytes (``VmHWM`` after resetting it;
    else the ``ru_maxrss`` high-water mark, which only moves when a new process peak is set)."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.exact = _reset_peak() and _proc_status_kb("VmHWM") is not None
        self.base_kb = _proc_status_kb("VmRSS") if self.exact else None
        self.maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_bytes: Optional[int] = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.exact and self.base_kb is not None:
            self.peak_bytes = 1024 * max(0, (_proc_status_kb("VmHWM") or 0) - self.base_kb)
        else:
            self.peak_bytes = 1024 * max(
                0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss_kb
            )


def dynamo_counts() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for key, value in state.items()
        if key != "step" and isinstance(value, Tensor)
    )


def load_1m() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def time_optimizer(
    make: Callable[[], torch.optim.Optimizer],
    reps: int,
    warmup: int,
    slow_s: float,
    min_timed_s: float = 0.25,
    profile: bool = False,
) -> Dict[str, Any]:
    """Build an optimizer and time ``optimizer.step()``.

    The first step is timed on its own (compilation, graph loading and state creation happen
    there), the second is the first warm-up step; its time ``t`` sets the count: ``warmup - 1``
    more warm-up steps and ``reps`` timed ones, stretched to fill ``min_timed_s`` when steps are
    fast (at most ``10·reps``), cut to 3 and no further warm-up when ``t > slow_s``. With
    ``profile``, one more step runs under ``torch.profiler`` (see :func:`profile_call`).
    """
    before = dynamo_counts()
    with PeakMemory() as memory:
        start = time.perf_counter()
        optimizer = make()
        construct_s = time.perf_counter() - start
        start = time.perf_counter()
        optimizer.step()
        first_s = time.perf_counter() - start
        after_first = dynamo_counts()
        start = time.perf_counter()
        optimizer.step()
        second_s = time.perf_counter() - start
        if second_s > slow_s:
            reps, warmup = min(reps, 3), 1
        elif second_s > 0:
            reps = max(reps, min(10 * reps, math.ceil(min_timed_s / second_s)))
        median_s, times = median_time(optimizer.step, reps, max(0, warmup - 1))
        state_bytes = _state_bytes(optimizer)
    after = dynamo_counts()
    profiled = profile_call(optimizer.step) if profile else None
    del optimizer
    graphs = after["graphs"] - before["graphs"]
    return {
        "profile": profiled,
        "step_ms": 1e3 * median_s,
        "step_ms_runs": [round(1e3 * t, 4) for t in times],
        "reps": len(times),
        "warmup_steps": max(1, warmup),
        "first_step_s": first_s,
        "construct_s": construct_s,
        "graphs": graphs,
        "recompiles": max(0, graphs - 1),
        "graphs_after_first_step": after["graphs"] - after_first["graphs"],
        "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
        "peak_rss_bytes": memory.peak_bytes,
        "peak_rss_exact": memory.exact,
        "state_bytes": state_bytes,
    }


#: What the profiler's tracing library (Kineto, inside libtorch) writes straight to file
#: descriptor 2 at every start and stop: ``USDT:<time> <pid>:<tid> ...] profiler_start``.
_KINETO_MARKER = b"USDT:"


@contextlib.contextmanager
def _without_kineto_markers() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the block, then restore it and write back
    everything except Kineto's ``USDT:`` marker lines (which no log level turns off and which
    land between the progress bars otherwise). Python's ``sys.stderr`` is flushed either side,
    so its writes keep their order."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not line.startswith(_KINETO_MARKER))
            if kept:
                os.write(2, kept)


def profile_call(fn: Callable[[], Any], top: int = 8) -> Dict[str, Any]:
    """One call of ``fn`` under ``torch.profiler`` (CPU): wall time and the ``top`` operators by
    self CPU time (``## Call CompiledFxGraph …`` is Inductor's generated code)."""
    from torch.profiler import ProfilerActivity, profile

    with _without_kineto_markers(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events) or 1.0
    return {
        "wall_ms": 1e3 * wall,
        "ops": [
            {
                "name": " ".join(e.key.split())[:70],
                "self_ms": e.self_cpu_time_total / 1e3,
                "fraction": e.self_cpu_time_total / total_us,
                "calls": e.count,
            }
            for e in events[:top]
        ],
    }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide the warnings every run repeats and that say nothing about speed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        yield


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """torch's intra-op threads for the length of the block (onnxruntime sessions opened by
    ``compiledopt.export.onnx.load`` take the same count)."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)


def json_default(value: Any) -> Any:
    """JSON for what the results hold besides plain data: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (Path, torch.Size)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def in_child(
    entry: str,
    job: Dict[str, Any],
    limit: float,
    env: Optional[Dict[str, str]] = None,
    module: str = "benchmarks.step_speed.runs",
) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Run ``<module>.<entry>()`` in a child process, ``job`` as JSON on its stdin, stopped
    after ``limit`` seconds (its output, the profiler's included, is captured). Returns
    ``(result, None)``, or ``(None, "timeout")``, or ``(None, "child exited N: <last stderr
    lines>")``."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from {module} import {entry}; {entry}()"
    # A session of its own, so that a stopped child takes its compile workers with it.
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(json.dumps(job), timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return None, "timeout"
    for line in stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT) :]), None
    tail = " ".join(stderr.strip().splitlines()[-3:])
    return None, f"child exited {child.returncode}: {tail}"


def child_job() -> Dict[str, Any]:
    """In a child process: the job :func:`in_child` sent."""
    return json.loads(sys.stdin.read())


def child_result(row: Dict[str, Any]) -> None:
    """In a child process: hand ``row`` back to :func:`in_child`."""
    sys.stdout.write(_RESULT + json.dumps(row, default=json_default) + "\n")
