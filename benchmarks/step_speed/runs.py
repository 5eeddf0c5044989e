"""The runs: export an artifact, time a FrozenOptimizer or AdamW (in this process or in a child
one), the cold whole-model compile, and where the frozen CoordinateMLP step goes.

The functions whose names end in ``_child`` are the entry points of the child processes that
:func:`benchmarks.step_speed.measure.in_child` starts.
"""

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.step_speed.measure import (
    PeakMemory,
    child_job,
    child_result,
    dynamo_counts,
    in_child,
    profile_call,
    quiet,
    thread_count,
    time_optimizer,
)
from benchmarks.step_speed.models import model_params
from benchmarks.step_speed.plan import EXPORTED, FAMILIES
from benchmarks.step_speed.roofline import FLOAT_BYTES, rule_cost
from compiledopt.bench import ADAMW_WEIGHT_DECAY, Ceilings, frozen_options, median_time

Named = List[Tuple[str, nn.Parameter]]
#: Every frozen optimizer's learning rate (the step's time does not depend on it).
LR = 1e-4


def export(
    family: str, backend: str, directory: Path, named: Optional[Named], ranks: Sequence[int]
) -> Tuple[Path, float]:
    """Export ``family`` with ``backend``'s graph (none for ``eager``/``compiled``: the weights
    only) into ``directory``: a shape-agnostic artifact for ``ranks``, or one bound to
    ``named``. Returns the directory and the seconds it took."""
    from compiledopt.export import (
        build_bound,
        build_shape_agnostic,
        export_bound,
        export_shape_agnostic,
    )

    spec = FAMILIES[family]
    backends = (backend,) if backend in EXPORTED else ()
    torch.manual_seed(0)
    start = time.perf_counter()
    with quiet():
        if spec["kind"] == "shape_agnostic":
            transform = build_shape_agnostic(spec)
            export_shape_agnostic(directory, spec, transform, backends=backends, ranks=ranks)
        else:
            assert named is not None
            transforms = build_bound(spec, [p.shape for _, p in named])
            params = [(n, p.detach()) for n, p in named]
            export_bound(directory, spec, transforms, params, backends=backends)
    return directory, time.perf_counter() - start


def run_frozen(
    named: Named, artifact: Path, backend: str, settings: Dict[str, Any], profile: bool = False
) -> Dict[str, Any]:
    """Time ``FrozenOptimizer(named, artifact)`` on ``backend`` (see ``time_optimizer``)."""
    from compiledopt import FrozenOptimizer

    options = frozen_options(backend)
    if options["backend"] == "compiled":
        torch._dynamo.reset()  # a cold Dynamo cache per configuration: honest compile times

    def make() -> torch.optim.Optimizer:
        # The benchmark exported these artifacts itself: their code graphs are trusted.
        return FrozenOptimizer(named, artifact, lr=LR, trust_code=True, **options)

    with quiet():
        return time_optimizer(
            make, settings["reps"], settings["warmup"], settings["slow_step_s"], profile=profile
        )


def run_adamw(named: Named, variant: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Time ``torch.optim.AdamW`` (``variant``: ``foreach`` or ``fused``) on ``named``."""
    params = [p for _, p in named]

    def make() -> torch.optim.Optimizer:
        options = {variant: True, "weight_decay": ADAMW_WEIGHT_DECAY}
        return torch.optim.AdamW(params, lr=LR, **options)

    return time_optimizer(make, settings["reps"], settings["warmup"], settings["slow_step_s"])


def run_isolated(
    model: str, artifact: Path, backend: str, settings: Dict[str, Any], profile: bool
) -> Dict[str, Any]:
    """:func:`run_frozen` in a child process (fresh Dynamo state, and a time limit:
    ``settings["compile_timeout_s"]``); a run past the limit is stopped and recorded as such."""
    job = {
        "model": model,
        "artifact": str(artifact),
        "backend": backend,
        "profile": profile,
        "settings": {k: settings[k] for k in ("reps", "warmup", "slow_step_s", "threads", "seed")},
    }
    limit = settings["compile_timeout_s"]
    row, failure = in_child("run_frozen_child", job, limit)
    if failure == "timeout":
        return {
            "status": "timeout",
            "reason": f"timeout: stopped after {limit:.0f} s, before the first step had finished "
            "(compile included)",
            "timeout_s": limit,
        }
    if failure is not None:
        return {"status": "error", "reason": f"error: {failure}"}
    assert row is not None
    return row


def run_frozen_child() -> None:
    """Entry point of :func:`run_isolated`'s child."""
    job = child_job()
    settings = job["settings"]
    with thread_count(settings["threads"]):
        named = model_params(job["model"], settings["seed"])
        row = run_frozen(named, Path(job["artifact"]), job["backend"], settings, job["profile"])
    row["isolated"] = True
    child_result(row)


def whole_model_compile(named: Named) -> Dict[str, Any]:
    """Cold compile of the compiled backend's CoordinateMLP rule on every tensor of ``named``.

    :class:`~compiledopt.runtime.compiled.CompiledTensorRule` is called once on every tensor (what
    the first ``optimizer.step()`` does), then once more: the first pass is the compile (Dynamo
    tracing and Inductor's C++ build of each graph), the second the step without it. Run it in a
    fresh process with an empty Inductor cache (:func:`run_whole_model`) for a cold number.
    """
    from compiledopt.export import build_shape_agnostic
    from compiledopt.runtime.compiled import CompiledTensorRule

    torch._dynamo.reset()
    transform = build_shape_agnostic(FAMILIES["coordinate-mlp"])
    rule = CompiledTensorRule(transform)
    tensors = [(p.grad, p.detach(), transform.init_state(p.detach())) for _, p in named]
    before = dynamo_counts()

    def one_pass(step: int) -> float:
        start = time.perf_counter()
        for grad, param, state in tensors:
            rule(grad, param, state, torch.tensor(step))
        return time.perf_counter() - start

    with torch.no_grad(), PeakMemory() as memory:
        compile_s = one_pass(0)
        call_s = one_pass(1)
    return {
        "family": "coordinate-mlp",
        "what": "the compiled backend's first step with an empty Inductor cache: "
        "CompiledTensorRule (dynamic sizes) over every tensor",
        "tensors": len(tensors),
        "compile_s": compile_s,
        "second_call_ms": 1e3 * call_s,
        "graphs": dynamo_counts()["graphs"] - before["graphs"],
        "peak_rss_bytes": memory.peak_bytes,
    }


def run_whole_model(settings: Dict[str, Any], model: str = "resnet18") -> Dict[str, Any]:
    """:func:`whole_model_compile` in a child process with an empty Inductor cache."""
    job = {"model": model, "settings": {k: settings[k] for k in ("threads", "seed")}}
    limit = settings["compile_timeout_s"]
    with tempfile.TemporaryDirectory(prefix="compiledopt-cold-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        row, failure = in_child("whole_model_child", job, limit, env)
    if failure == "timeout":
        return {"status": "timeout", "compile_s": limit, "reason": f"stopped after {limit} s"}
    if failure is not None:
        return {"error": failure}
    assert row is not None
    return row


def whole_model_child() -> None:
    """Entry point of :func:`run_whole_model`'s child."""
    job = child_job()
    with thread_count(job["settings"]["threads"]), quiet():
        named = model_params(job["model"], job["settings"]["seed"])
        child_result(whole_model_compile(named))


def bottleneck(named: Named, ceilings: Ceilings, reps: int) -> Dict[str, Any]:
    """Where the frozen CoordinateMLP step goes, on one model.

    * per tensor: the compiled per-tensor rule (``torch.compile(TensorRule)``, the graph the
      exported backends run once per tensor) timed on the smallest and the largest parameter:
      the smallest one's time is the per-call overhead, the slope between the two the cost per
      coordinate, next to the roofline floor per coordinate;
    * the operators of one call on the largest tensor (:func:`profile_call`);
    * the ``(n, hidden)`` intermediate: a ReLU over an ``(n, hidden)`` tensor out of place (a
      fresh output each call, as a graph that materialises the hidden layer allocates it:
      allocation, page faults, memory traffic) and in place, against the bandwidth floor of
      reading and writing it once.
    """
    from compiledopt.export import build_shape_agnostic
    from compiledopt.runtime.compiled import CompiledTensorRule

    torch._dynamo.reset()
    transform = build_shape_agnostic(FAMILIES["coordinate-mlp"])
    rule = CompiledTensorRule(transform)  # what the compiled backend runs per tensor
    step = torch.tensor(3)
    tensors = []
    by_size = sorted(named, key=lambda item: item[1].numel())
    with torch.no_grad():
        for name, p in (by_size[0], by_size[-1]):
            grad, param = p.grad, p.detach()
            state = transform.init_state(param)
            rule(grad, param, state, step)  # compile / warm up

            def call(grad=grad, param=param, state=state) -> Any:
                return rule(grad, param, state, step)

            median, _ = median_time(call, reps, warmup=1)
            tensors.append({"name": name, "numel": p.numel(), "ms": 1e3 * median})
        small = min(tensors, key=lambda t: t["numel"])
        large = max(tensors, key=lambda t: t["numel"])
        largest = dict(named)[large["name"]]
        state = transform.init_state(largest.detach())
        kernels = profile_call(lambda: rule(largest.grad, largest.detach(), state, step))
        hidden = transform.hidden_sizes[0]
        n = largest.numel()
        x = torch.randn(n, hidden)
        fresh_s, _ = median_time(lambda: torch.relu(x), reps)
        inplace_s, _ = median_time(lambda: torch.relu_(x), reps)
    cost = rule_cost("coordinate-mlp", [largest.shape])
    span = large["numel"] - small["numel"]
    return {
        "rule": "CompiledTensorRule(CoordinateMLP()): torch.compile, fused, dynamic sizes",
        "tensors": tensors,
        "smallest_tensor": small,
        "per_call_overhead_us": 1e3 * small["ms"],
        "per_coordinate_ns": 1e6 * (large["ms"] - small["ms"]) / span if span else None,
        "floor_per_coordinate_ns": 1e9 * ceilings.floor_s(cost) / n,
        "largest_tensor": large,
        "largest_tensor_profile": kernels,
        "hidden_intermediate": {
            "shape": [n, hidden],
            "relu_fresh_ms": 1e3 * fresh_s,
            "relu_inplace_ms": 1e3 * inplace_s,
            "bandwidth_floor_ms": 2e3 * n * hidden * FLOAT_BYTES / ceilings.bandwidth_bytes_per_s,
        },
    }
