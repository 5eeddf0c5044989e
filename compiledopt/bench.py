"""How fast is a frozen learned optimizer on *your* model? One optimizer step, timed per backend.

:func:`benchmark` applies an artifact with :class:`~compiledopt.FrozenOptimizer` to copies of the
given parameters (the model is never touched) on each backend, and ``torch.optim.AdamW``
(``foreach`` and ``fused``) on the same copies; it times ``optimizer.step()`` (the median of
repeated steps after warm-up) on one thread and on all cores, and compares each step with
AdamW's and with the rule's roofline floor, ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``: the
FLOPs and bytes from the rule's own cost model (:meth:`Transform.cost
<compiledopt.transforms.Transform.cost>`), the peak (a large matmul) and the bandwidth (a copy
as large as the step's traffic: a small model's state stays in cache, where a copy of DRAM size
would understate the bandwidth the step sees and put AdamW above its roofline) measured in the
same run. ``compiledopt bench ARTIFACT`` runs it on a built-in model.

Example:
    >>> import tempfile, torch
    >>> from compiledopt import bench
    >>> from compiledopt.export import build_shape_agnostic, export_shape_agnostic
    >>> spec = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {}}
    >>> artifact = export_shape_agnostic(
    ...     tempfile.mkdtemp() + "/opt", spec, build_shape_agnostic(spec), backends=["torchscript"]
    ... )
    >>> result = bench.benchmark(artifact, torch.nn.Linear(256, 256), repeats=5)
    >>> print(result)  # a table: backend, threads, step ms, ratios to AdamW, roofline %
    >>> frozen = [row for row in result.rows if not row.backend.startswith("adamw-")]
    >>> fastest = min(frozen, key=lambda row: row.step_ms)
"""

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from compiledopt.transforms.base import Cost, Transform

__all__ = [
    "ADAMW",
    "BenchResult",
    "Ceilings",
    "StepTiming",
    "available_backends",
    "benchmark",
    "example_model",
    "frozen_options",
    "measure_ceilings",
    "median_time",
    "step_cost",
]

#: The ``torch.optim.AdamW`` variants every benchmark runs: ``adamw-foreach``, ``adamw-fused``.
ADAMW = ("foreach", "fused")
#: ``torch.optim.AdamW``'s default weight decay, used by the AdamW rows and their cost model.
ADAMW_WEIGHT_DECAY = 0.01
#: float32 values a coordinate that a fused AdamW step reads and writes (the parameter, its
#: gradient and two moments read; the parameter and the moments written).
ADAMW_STEP_VALUES = 7
#: A backend name that is the ``compiled`` backend with bfloat16 state (see ``frozen_options``).
COMPILED_BF16 = "compiled-bf16"


@dataclass
class Ceilings:
    """The machine's roofs at one thread count, measured by :func:`measure_ceilings`."""

    peak_flops: float  #: FLOP/s of a float32 ``matmul_n``³ matmul
    matmul_n: int
    matmul_ms: float
    #: the fastest of a copy (read + write bytes per second), an in-place update and a fused
    #: AdamW step, each moving the same bytes
    bandwidth_bytes_per_s: float
    copy_bytes: int
    copy_ms: float
    reps: int
    #: bytes an in-place ``a += b`` moves (two reads, one write; the copy's bytes)
    update_bytes: int = 0
    update_ms: float = 0.0
    #: bytes a fused ``torch.optim.AdamW`` step moves (seven values a coordinate; about the
    #: copy's bytes), 0 where fused AdamW is not available
    adamw_bytes: int = 0
    adamw_ms: float = 0.0

    def floor_s(self, cost: Cost, eager: bool = False) -> float:
        """The roofline floor of ``cost`` in seconds: ``max(FLOPs / peak, bytes / bandwidth)``,
        with the ``eager_flops`` of an eager call if ``eager``."""
        flops = cost.eager_flops if eager else cost.flops
        return max(flops / self.peak_flops, cost.bytes / self.bandwidth_bytes_per_s)


@dataclass
class StepTiming:
    """One optimizer on one thread count: a row of :class:`BenchResult`."""

    backend: str  #: a FrozenOptimizer backend, or ``adamw-foreach`` / ``adamw-fused``
    threads: int
    step_ms: float  #: median of the timed steps
    runs_ms: List[float]
    first_step_s: float  #: the first step alone (compile or graph load included)
    ratio_vs_adamw_fused: float  #: this step's time ÷ fused AdamW's (above 1: slower)
    ratio_vs_adamw_foreach: float
    floor_ms: Optional[float]  #: roofline floor; ``None`` where the rule has no cost model
    roofline_fraction: Optional[float]  #: floor ÷ step (1.0: at the roofline)


@dataclass
class BenchResult:
    """What :func:`benchmark` measured; ``str()`` is a table, :meth:`to_dict` plain JSON data."""

    artifact: str
    rule: str
    params: int
    tensors: int
    ceilings: Dict[int, Ceilings]  #: per thread count
    rows: List[StepTiming] = field(default_factory=list)
    cost_note: Optional[str] = None  #: why the rule's rows have no floor, if they don't

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.artifact} ({self.rule}): {self.params:,} parameters, {self.tensors} tensors"
        ]
        lines += [
            f"  {n} thread(s): peak {c.peak_flops / 1e9:.1f} GFLOP/s, "
            f"bandwidth {c.bandwidth_bytes_per_s / 1e9:.1f} GB/s"
            for n, c in self.ceilings.items()
        ]
        lines += [f"  no roofline for the rule: {self.cost_note}"] if self.cost_note else []
        table = [_HEADER, *map(_cells, self.rows)]
        widths = [max(len(row[i]) for row in table) for i in range(len(_HEADER))]
        for row in table:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            lines.append("  " + "  ".join(cells))
        lines.append(
            "  (/ fused, / foreach: over torch.optim.AdamW's step; roofline: floor / step)"
        )
        return "\n".join(lines)


_HEADER = ("backend", "threads", "step ms", "/ fused", "/ foreach", "floor ms", "roofline")


def _cells(r: StepTiming) -> Tuple[str, ...]:
    floor = "-" if r.floor_ms is None else f"{r.floor_ms:.3g}"
    fraction = "-" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.3g}%"
    fused, foreach = f"{r.ratio_vs_adamw_fused:.3g}x", f"{r.ratio_vs_adamw_foreach:.3g}x"
    return (r.backend, str(r.threads), f"{r.step_ms:.3g}", fused, foreach, floor, fraction)


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> Tuple[float, List[float]]:
    """Call ``fn`` ``warmup`` times, then time ``reps`` calls: ``(median seconds, all times)``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure_ceilings(matmul_n: int = 2048, copy_mb: float = 256, reps: int = 5) -> Ceilings:
    """Peak float32 FLOP/s (an ``n³`` matmul) and bandwidth, medians of ``reps`` runs at torch's
    current thread count.

    The bandwidth is the fastest of three kernels moving the same bytes: a copy between two
    ``copy_mb`` MiB tensors (read + write bytes over its time), an in-place update ``a += b``
    (two reads and one write, the access pattern of an optimizer's step) on tensors of two thirds
    of that size, and a fused ``torch.optim.AdamW`` step (four reads, three writes a coordinate)
    on parameters of a seventh of it. A copy alone understates what a step can reach: the lines
    it writes are first read for ownership, traffic its byte count leaves out (on the 2-core Xeon
    this was measured on, fused AdamW ran at 1.4x a copy-based "roofline"); and on one core the
    update reached about 25 GB/s where fused AdamW's loop over four streams reached 31-33, so a
    roof from the simple kernels alone put AdamW above 100% of it."""
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    out = torch.empty(matmul_n, matmul_n)
    matmul_s, _ = median_time(lambda: torch.mm(a, b, out=out), reps)
    copied, copy_s, updated, update_s = _copy_and_update_probes(copy_mb, reps)
    adamw_bytes, adamw_s = _adamw_probe(copied // (4 * ADAMW_STEP_VALUES), reps)
    peak = 2 * matmul_n**3 / matmul_s
    bandwidth = max(copied / copy_s, updated / update_s)
    if adamw_bytes:  # 0 where this torch has no fused AdamW on the CPU
        bandwidth = max(bandwidth, adamw_bytes / adamw_s)
    return Ceilings(
        peak,
        matmul_n,
        1e3 * matmul_s,
        bandwidth,
        copied,
        1e3 * copy_s,
        reps,
        updated,
        1e3 * update_s,
        adamw_bytes,
        1e3 * adamw_s,
    )


def _copy_and_update_probes(copy_mb: float, reps: int) -> Tuple[int, float, int, float]:
    """Bytes moved and median seconds of a copy between two ``copy_mb`` MiB float32 tensors and
    of an in-place ``a += b`` on two thirds of them (the same bytes)."""
    src = torch.empty(max(3, int(copy_mb * (1 << 20)) // 4)).normal_()
    dst = torch.empty_like(src).normal_()
    copy_s, _ = median_time(lambda: dst.copy_(src), reps)
    third = 2 * src.numel() // 3
    into, added = dst[:third], src[:third]
    # A tiny alpha keeps the values finite over any number of repetitions.
    update_s, _ = median_time(lambda: into.add_(added, alpha=1e-30), reps)
    return 2 * src.nbytes, copy_s, 3 * added.nbytes, update_s


def _adamw_probe(numel: int, reps: int) -> Tuple[int, float]:
    """Bytes moved and median seconds of a fused ``torch.optim.AdamW`` step on a float32
    parameter of ``numel`` elements, or ``(0, 0.0)`` where this torch has no fused AdamW on the
    CPU (it then counts for nothing)."""
    param = torch.nn.Parameter(torch.zeros(max(1, numel)))
    param.grad = torch.full_like(param, 1e-3)
    try:
        optimizer = torch.optim.AdamW([param], lr=1e-30, fused=True)
        seconds, _ = median_time(optimizer.step, reps)
    except RuntimeError:
        return 0, 0.0
    return ADAMW_STEP_VALUES * param.nbytes, seconds


def step_cost(transforms: Sequence[Transform], shapes: Sequence[Sequence[int]]) -> Cost:
    """The cost of one step over parameters of ``shapes``, ``transforms[i]`` updating the i-th:
    the sum of :meth:`Transform.cost`. Raises ``NotImplementedError`` for a rule without a cost
    model (never counts it as free)."""
    flops = nbytes = eager = 0.0
    for transform, shape in zip(transforms, shapes, strict=True):
        cost = transform.cost(tuple(shape))
        flops, nbytes, eager = flops + cost.flops, nbytes + cost.bytes, eager + cost.eager_flops
    return Cost(flops, nbytes, eager)


def available_backends(artifact: Any) -> List[str]:
    """``eager``, ``compiled`` and the artifact's exported backends that it may load (graphs
    that are code only from a trusted artifact), in the export registry's order
    (:func:`compiledopt.export.backend.names`, read now: a backend registered after import is
    listed)."""
    from compiledopt.export.backend import names
    from compiledopt.runtime.backends import BUILT_IN_BACKENDS

    exported = [b for b in names() if b in artifact.backends and artifact.may_load(b)]
    return [*BUILT_IN_BACKENDS, *exported]


def frozen_options(backend: str) -> Dict[str, Any]:
    """FrozenOptimizer keyword arguments for ``backend``; ``compiled-bf16`` is the compiled
    backend with ``state_dtype=torch.bfloat16``."""
    if backend == COMPILED_BF16:
        return {"backend": "compiled", "state_dtype": torch.bfloat16}
    return {"backend": backend}


def example_model(name: str) -> nn.Module:
    """A built-in model: ``mlp`` (784-128-64-10, 0.1M parameters), ``convnet`` (4 conv 3x3
    64-128-256-320 with batchnorm and a linear head, 1.1M) or ``transformer``
    (``nn.TransformerEncoderLayer(512, 8, dim_feedforward=3072)``, 4.2M)."""
    if name == "mlp":
        dims = ((784, 128), (128, 64), (64, 10))
        return nn.Sequential(*[m for d in dims for m in (nn.Linear(*d), nn.ReLU())][:-1])
    if name == "convnet":
        layers: List[nn.Module] = []
        for cin, cout in ((3, 64), (64, 128), (128, 256), (256, 320)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(320, 10))
    if name == "transformer":
        return nn.TransformerEncoderLayer(512, 8, dim_feedforward=3072)
    raise ValueError(f"Unknown model: {name!r} (one of mlp, convnet, transformer)")


def _copies(params: Union[nn.Module, Iterable[Tensor]], seed: int) -> List[Tuple[Any, ...]]:
    """``(name or None, values, gradient)`` of each parameter: its own gradient if it has one,
    else a fixed random one."""
    generator = torch.Generator().manual_seed(seed)
    named = (
        params.named_parameters() if isinstance(params, nn.Module) else ((None, p) for p in params)
    )
    copies = []
    for name, p in named:
        grad = p.grad if p.grad is not None else torch.randn(p.shape, generator=generator)
        copies.append((name, p.detach().clone(), grad.detach().to(p.dtype).clone()))
    if not copies:
        raise ValueError("benchmark needs at least one parameter")
    return copies


def _time_steps(optimizer: torch.optim.Optimizer, repeats: int, warmup: int) -> Tuple[Any, ...]:
    """``(first step s, median s, all timed s)``."""
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    return (first, *median_time(optimizer.step, repeats, warmup))


def benchmark(
    artifact: Any,
    params: Union[nn.Module, Iterable[Tensor]],
    backends: Optional[Sequence[str]] = None,
    threads: Optional[Sequence[int]] = None,
    repeats: int = 20,
    warmup: int = 3,
    lr: float = 1e-4,
    seed: int = 0,
    matmul_n: int = 2048,
    copy_mb: Optional[float] = None,
    *,
    trust_code: bool = False,
    trusted_keys: Optional[Sequence[Any]] = None,
) -> BenchResult:
    """Time one step of ``artifact``'s FrozenOptimizer on ``params`` per backend, against AdamW.

    Args:
        artifact (str, PathLike or Artifact): an artifact directory (shape-agnostic, or bound to
            exactly these parameters).
        params (nn.Module or iterable of tensors): the model or its parameters; they are copied,
            with their gradients where they have one (else fixed random gradients).
        backends (sequence of str, optional): FrozenOptimizer backends, or ``compiled-bf16``.
            (default: ``eager``, ``compiled`` and every backend the artifact has)
        threads (sequence of int, optional): torch thread counts to run at (restored after).
            (default: 1 and all the cores this process may use)
        repeats (int): timed steps per optimizer; the median is reported. (default: 20)
        warmup (int): untimed steps after the first one (which is timed alone, compile or graph
            load included, as ``first_step_s``). (default: 3)
        lr (float): every optimizer's learning rate; the step's time does not depend on it.
        seed (int): seed of the random gradients.
        matmul_n, copy_mb: sizes of the ceiling measurements (see :func:`measure_ceilings`);
            ``copy_mb=None``: the copy reads and writes as many bytes as the step moves (the
            larger of the rule's and AdamW's cost model, at least 1 MiB), so that both fit in
            the same level of the memory hierarchy.
        trust_code, trusted_keys: how far ``artifact`` (a path or name) is trusted, as for
            :func:`compiledopt.export.load_artifact`: its graphs that are code (TorchScript,
            AOTInductor) are timed only when trusted.

    Returns:
        BenchResult: a :class:`StepTiming` row per backend and thread count, AdamW's included.

    Raises:
        ValueError: a backend the artifact does not have, or (``ArtifactError``) a bound artifact
            that does not fit ``params``.
    """
    from compiledopt.export import Artifact
    from compiledopt.pretrained import open_artifact
    from compiledopt.runtime import FrozenOptimizer
    from compiledopt.transforms import AdamW

    if isinstance(artifact, Artifact):
        loaded = artifact.trusting() if trust_code else artifact
    else:
        loaded = open_artifact(artifact, trust_code=trust_code, trusted_keys=trusted_keys)
    available = [*available_backends(loaded), COMPILED_BF16]
    backends = list(backends) if backends is not None else available_backends(loaded)
    if any(b not in available for b in backends):
        raise ValueError(f"{loaded.path} has no backend in {backends} (available: {available})")
    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = sorted({1, cores or 1})
    copies = _copies(params, seed)
    named = None not in [name for name, _, _ in copies]
    shapes = [tuple(values.shape) for _, values, _ in copies]
    loaded.check_bindings(
        [(n or f"params[{i}]", v) for i, (n, v, _) in enumerate(copies)], False, named
    )
    rule = loaded.transforms() * (1 if loaded.kind == "bound" else len(shapes))
    adamw = AdamW(weight_decay=ADAMW_WEIGHT_DECAY)
    costs: Dict[str, Optional[Cost]] = {"adamw": step_cost([adamw] * len(shapes), shapes)}
    rule_name = f"{loaded.kind} {loaded.spec.get('name', loaded.spec['kind'])}"
    result = BenchResult(str(loaded.path), rule_name, sum(map(math.prod, shapes)), len(shapes), {})
    try:
        costs["rule"] = step_cost(rule, shapes)
    except NotImplementedError as error:  # its rows get no floor: never a free rule
        costs["rule"], result.cost_note = None, str(error)

    def make(backend: str) -> torch.optim.Optimizer:
        params = []
        for name, values, grad in copies:
            params.append((name, nn.Parameter(values.clone())))
            params[-1][1].grad = grad.clone()
        if backend.startswith("adamw-"):
            variant: Dict[str, Any] = {backend.removeprefix("adamw-"): True}
            weights = [p for _, p in params]
            return torch.optim.AdamW(weights, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY, **variant)
        group = params if named else [p for _, p in params]
        return FrozenOptimizer(group, loaded, lr=lr, **frozen_options(backend))

    if copy_mb is None:
        traffic = max(c.bytes for c in costs.values() if c is not None)
        copy_mb = max(1.0, traffic / 2 / (1 << 20))  # the copy reads and writes copy_mb each
    saved = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(int(count))
            ceilings = result.ceilings[int(count)] = measure_ceilings(matmul_n, copy_mb)
            timed = {
                backend: _time_steps(make(backend), repeats, warmup)
                for backend in [*backends, *(f"adamw-{v}" for v in ADAMW)]
            }
            for backend, (first, median, times) in timed.items():
                cost = costs["adamw" if backend.startswith("adamw-") else "rule"]
                floor = ceilings.floor_s(cost, eager=backend == "eager") if cost else None
                result.rows.append(
                    StepTiming(
                        backend=backend,
                        threads=int(count),
                        step_ms=1e3 * median,
                        runs_ms=[1e3 * t for t in times],
                        first_step_s=first,
                        ratio_vs_adamw_fused=median / timed["adamw-fused"][1],
                        ratio_vs_adamw_foreach=median / timed["adamw-foreach"][1],
                        floor_ms=None if floor is None else 1e3 * floor,
                        roofline_fraction=None if floor is None else floor / median,
                    )
                )
    finally:
        torch.set_num_threads(saved)
    return result
