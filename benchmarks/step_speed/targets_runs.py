"""The runs of the production-targets benchmark (:mod:`benchmarks.step_speed.targets`): its
cases, and the child processes that measure them (:func:`child_main`: the job as JSON on stdin,
the result written to the file the job names).

* ``baseline``: the ceilings, ResNet-18's forward + backward and AdamW (fused, foreach) on every
  case; ``frozen``: the default optimizer on one backend, every case; ``memory``: the peak
  resident-memory rise of a step on one parameter; ``gpu``: ResNet-18 and a large case on the GPU.
"""

import gc
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from benchmarks.step_speed import models
from benchmarks.step_speed.measure import (
    PeakMemory,
    child_job,
    json_default,
    load_1m,
    quiet,
    resident_bytes,
    time_optimizer,
)

ADAMW = ("fused", "foreach")
CASES = ("resnet18", "gpt2-tiny", "many", "few", "mixed")
#: float32 values a coordinate that the packaged rule's step reads and writes (its cost model):
#: what the per-case bandwidth of its rows is measured on (AdamW's rows: on its own, smaller
#: traffic, ``compiledopt.bench.ADAMW_STEP_VALUES``).
STEP_VALUES = 9
#: glibc's mmap threshold, fixed in the memory children at its default value (which turns off its
#: dynamic raise): every large temporary of a step is then mapped when allocated and unmapped when
#: freed, and shows in the resident set of every step, not only of the first one.
MMAP_THRESHOLD = 131072


# -- the cases ---------------------------------------------------------------------------------


def case_shapes(case: str, settings: Dict[str, Any]) -> models.Shapes:
    """The parameter list of ``case`` (ResNet-18's from the module, on the meta device)."""
    if case == "resnet18":
        with torch.device("meta"):
            net = models.ResNet18(settings["resnet_width"], settings["classes"])
        return [(name, tuple(p.shape)) for name, p in net.named_parameters()]
    if case == "mixed":
        return models.mixed_shapes(*settings["mixed"], seed=settings["seed"])
    if case == "gpt2-tiny":
        return models.gpt2_tiny_shapes()
    return models.many_shapes(*settings[case])


def resnet_with_grads(settings: Dict[str, Any], device: str = "cpu") -> Tuple[nn.Module, Callable]:
    """ResNet-18 on ``device`` with gradients from one forward + backward, and that
    forward + backward (zero_grad, forward, cross-entropy on fixed random labels, backward)."""
    torch.manual_seed(settings["seed"])
    net = models.ResNet18(settings["resnet_width"], settings["classes"]).to(device)
    x = torch.randn(settings["batch"], device=device)
    y = torch.randint(0, settings["classes"], (settings["batch"][0],), device=device)

    def fwd_bwd() -> None:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()

    fwd_bwd()
    return net, fwd_bwd


def case_params(case: str, settings: Dict[str, Any]) -> List[nn.Parameter]:
    if case == "resnet18":
        return list(resnet_with_grads(settings)[0].parameters())
    return [p for _, p in models.shape_params(case_shapes(case, settings), settings["seed"])]


def frozen(params: Any, backend: str, artifact: str, trust: bool) -> torch.optim.Optimizer:
    """The default optimizer as a user builds it (its own lr), on ``backend``."""
    from compiledopt import FrozenOptimizer

    return FrozenOptimizer(params, artifact, backend=backend, trust_code=trust)


def adamw(params: Any, variant: str) -> torch.optim.Optimizer:
    from compiledopt.bench import ADAMW_WEIGHT_DECAY

    return torch.optim.AdamW(params, lr=1e-3, weight_decay=ADAMW_WEIGHT_DECAY, **{variant: True})


def _timed(make: Callable[[], torch.optim.Optimizer], s: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`time_optimizer`, an error recorded rather than raised, and the backend that the
    optimizer resolved to (``auto``)."""
    built: List[Any] = []

    def build() -> torch.optim.Optimizer:
        built.append(make())
        return built[-1]

    try:
        row = time_optimizer(build, s["reps"], s["warmup"], s["slow_step_s"], s["min_timed_s"])
    except Exception as error:  # recorded in the results, not hidden
        return {"status": "error", "reason": f"{type(error).__name__}: {error}"}
    row.pop("profile", None)
    row["status"] = "ok"
    row["resolved_backend"] = getattr(built[0], "backend", None) if built else None
    return row


# -- the child processes -----------------------------------------------------------------------


def child_main() -> None:
    """Entry point of a child process: the job (JSON) on stdin, the result written to the file
    the job names."""
    job = child_job()
    torch.set_num_threads(job["threads"])
    torch.set_float32_matmul_precision(job["settings"].get("matmul_precision", "highest"))
    load = load_1m()
    with quiet():
        result = CHILDREN[job["kind"]](job)
    result["load_1m_start"], result["load_1m_end"] = load, load_1m()
    Path(job["result"]).write_text(json.dumps(result, default=json_default))


def _baseline_child(job: Dict[str, Any]) -> Dict[str, Any]:
    """Ceilings, ResNet-18's forward + backward, and AdamW on every case."""
    from dataclasses import asdict

    from compiledopt.bench import ADAMW_STEP_VALUES, measure_ceilings, median_time

    s = job["settings"]
    result: Dict[str, Any] = {"ceilings": asdict(measure_ceilings(**s["ceilings"])), "adamw": {}}
    cases = s.get("cases", CASES)
    result["fwd_bwd"] = {"status": "skipped", "reason": "resnet18 not among the cases"}
    if "resnet18" in cases:
        net, fwd_bwd = resnet_with_grads(s)
        median, times = median_time(fwd_bwd, s["reps"], s["warmup"])
        result["fwd_bwd"] = {
            "status": "ok",
            "step_ms": 1e3 * median,
            "step_ms_runs": [round(1e3 * t, 4) for t in times],
            "reps": len(times),
            "warmup_steps": s["warmup"],
        }
    result["bandwidth_by_case"], result["adamw_bandwidth_by_case"] = {}, {}
    for case in cases:
        params = list(net.parameters()) if case == "resnet18" else case_params(case, s)
        result["adamw"][case] = {v: _timed(lambda v=v, p=params: adamw(p, v), s) for v in ADAMW}
        # The bandwidth a step of this case can reach depends on where its arrays live (a large
        # L3 holds a small model's state): measured by kernels moving the step's own traffic
        # (a copy of half of it each way), once for the learned step's values a coordinate and
        # once for AdamW's (which may fit in a cache that the learned step's do not).
        numel = sum(p.numel() for p in params)
        for key, values in (
            ("bandwidth_by_case", STEP_VALUES),
            ("adamw_bandwidth_by_case", ADAMW_STEP_VALUES),
        ):
            copy_mb = max(1.0, values * 4 * numel / 2 / (1 << 20))
            ceilings = measure_ceilings(matmul_n=64, copy_mb=copy_mb, reps=s["ceilings"]["reps"])
            result[key][case] = ceilings.bandwidth_bytes_per_s
    return result


def _frozen_child(job: Dict[str, Any]) -> Dict[str, Any]:
    """The default optimizer on one backend, every case (graphs compiled for an earlier case are
    reused by the later ones: ``first_step_s`` is cold for the first case only)."""
    s = job["settings"]
    cases = {}
    for case in s.get("cases", CASES):
        params = case_params(case, s)
        make = lambda p=params: frozen(p, job["backend"], job["artifact"], True)  # noqa: E731
        cases[case] = _timed(make, s)
    return {"cases": cases}


def _unique_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (``step`` aside), each storage counted once."""
    storages = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (:data:`MMAP_THRESHOLD`); ``False`` where that isn't glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_label(s: Dict[str, Any]) -> str:
    """The parameter of the memory measurement in words: ``10,000,000 params`` (a vector) or
    ``2,000×5,000 matrix``."""
    shape = s.get("memory_shape") or [s["memory_numel"]]
    if len(shape) == 1:
        return f"{shape[0]:,} params"
    return "×".join(f"{x:,}" for x in shape) + " matrix"


def _memory_child(job: Dict[str, Any]) -> Dict[str, Any]:
    """Peak memory of a step on one parameter, state created and warm, beyond the state: what the
    optimizer holds between steps besides its state (a runtime's memory arena, its graphs), read
    against the resident set before the optimizer existed, plus the rise within the step (three
    steps each measured on its own; the largest is the result)."""
    fixed = _fix_mmap_threshold()
    s, name = job["settings"], job["optimizer"]
    generator = torch.Generator().manual_seed(s["seed"])
    shape = s.get("memory_shape") or [s["memory_numel"]]
    param = nn.Parameter(0.02 * torch.randn(*shape, generator=generator))
    param.grad = torch.randn(*shape, generator=generator)
    gc.collect()
    before = resident_bytes()
    if name.startswith("adamw-"):
        optimizer = adamw([param], name.removeprefix("adamw-"))
    else:
        optimizer = frozen([param], name, job["artifact"], True)
    optimizer.step()  # the state
    optimizer.step()  # graphs loaded, caches warm
    state = _unique_state_bytes(optimizer)
    peaks, held, exact = [], [], True
    for _ in range(3):
        gc.collect()
        entry = resident_bytes()
        with PeakMemory() as memory:
            optimizer.step()
        peaks.append(memory.peak_bytes or 0)
        if before is not None and entry is not None:
            held.append(max(0, entry - before - state))
        exact = exact and memory.exact
    beyond = [h + p for h, p in zip(held, peaks)] if held else None
    return {
        "status": "ok",
        "numel": param.numel(),
        "param_bytes": param.nbytes,
        "state_bytes": state,
        "peak_step_bytes": max(peaks),
        "peak_step_bytes_runs": peaks,
        "held_bytes": max(held) if held else None,
        "peak_beyond_state_bytes": max(beyond) if beyond else None,
        "peak_exact": exact,
        "mmap_threshold_fixed": fixed,
        "resolved_backend": getattr(optimizer, "backend", None),
    }


def cuda_time(fn: Callable[[], Any], reps: int, warmup: int) -> Dict[str, Any]:
    """``fn`` timed with CUDA events: the first call alone, ``warmup`` more, then the median of
    ``reps`` (milliseconds)."""
    import statistics

    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return {
        "status": "ok",
        "step_ms": statistics.median(times),
        "step_ms_runs": [round(t, 4) for t in times],
        "reps": reps,
        "warmup_steps": warmup,
        "first_step_s": first,
    }


def _gpu_step(make: Callable[[], torch.optim.Optimizer], s: Dict[str, Any]) -> Dict[str, Any]:
    try:
        optimizer = make()
        optimizer.step()
        torch.cuda.synchronize()
        row = cuda_time(optimizer.step, s["reps"], s["warmup"])
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        optimizer.step()
        torch.cuda.synchronize()
        row["peak_step_bytes"] = torch.cuda.max_memory_allocated() - before
        row["state_bytes"] = _unique_state_bytes(optimizer)
        row["resolved_backend"] = getattr(optimizer, "backend", None)
        return row
    except Exception as error:  # recorded in the results, not hidden
        return {"status": "error", "reason": f"{type(error).__name__}: {error}"}


def _gpu_child(job: Dict[str, Any]) -> Dict[str, Any]:
    """ResNet-18 and the large case on the GPU: forward + backward, AdamW, each backend."""
    s = job["settings"]
    net, fwd_bwd = resnet_with_grads(s, "cuda")
    large = []
    for _, p in models.model_params(s["gpu_large"], s["seed"]):
        large.append(nn.Parameter(p.detach().cuda()))
        large[-1].grad = p.grad.cuda()
    result: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "fwd_bwd": cuda_time(fwd_bwd, s["reps"], s["warmup"]),
        "cases": {},
    }
    fwd_bwd()
    for case, params in (("resnet18", list(net.parameters())), ("large", large)):
        rows = {f"adamw-{v}": _gpu_step(lambda v=v, p=params: adamw(p, v), s) for v in ADAMW}
        for backend in job["backends"]:
            make = lambda b=backend, p=params: frozen(p, b, job["artifact"], True)  # noqa: E731
            rows[backend] = _gpu_step(make, s)
        result["cases"][case] = {
            "params": sum(p.numel() for p in params),
            "tensors": len(params),
            "rows": rows,
        }
    return result


#: What a child process runs, by the job's ``kind``.
CHILDREN: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "baseline": _baseline_child,
    "frozen": _frozen_child,
    "memory": _memory_child,
    "gpu": _gpu_child,
}
