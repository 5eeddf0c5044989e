"""The order in which ``backend="auto"`` tries the backends: measured, per machine.

Which backend is fastest depends on the rule, the device, the thread count and the model: on two
CPU cores the compiled backend beats AOTInductor on a ResNet-18 while onnxruntime wins on some
small bound rules. :func:`measure_backends` times one optimizer step of every backend an artifact
can run, on a parameter list the caller gives (by default a small mixed model) and records the
medians in a cache file; ``auto`` then tries the backends fastest first for that artifact, device
type and thread count. Without a recording it uses :data:`DEFAULT_ORDER`, measured on two-core
x86 machines with the packaged optimizer.

The cache is ``$COMPILEDOPT_CACHE/backend-timings.json`` (default
``$XDG_CACHE_HOME/compiledopt`` or ``~/.cache/compiledopt``): a cache, safe to delete; an
unreadable or malformed file is ignored (and replaced by the next recording).
"""

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "CACHE_VARIABLE",
    "DEFAULT_ORDER",
    "cache_file",
    "digest",
    "measure_backends",
    "measured_order",
]

logger = logging.getLogger("compiledopt")

#: The environment variable naming the cache folder.
CACHE_VARIABLE = "COMPILEDOPT_CACHE"
#: ``auto``'s order where nothing was measured (fastest first, ``eager`` always last): the
#: compiled backend batches small tensors and fuses each rule into one loop; AOTInductor runs one
#: exported graph per tensor; onnxruntime and TorchScript do not fuse on the CPU.
DEFAULT_ORDER = ("compiled", "aoti", "onnx", "torchscript", "eager")


def cache_file() -> Path:
    """The file that holds the recorded timings (not created here)."""
    root = os.environ.get(CACHE_VARIABLE, "")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = os.path.join(xdg, "compiledopt") if os.path.isabs(xdg) else ""
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "compiledopt")
    return Path(root).expanduser() / "backend-timings.json"


def digest(artifact) -> str:
    """An artifact's identity in the cache: the SHA-256 of its manifest (which lists every file's
    own SHA-256), so a changed weight or graph is a new artifact."""
    text = json.dumps(artifact.manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _key(artifact, device: torch.device, threads: int) -> str:
    """One recording's key: the artifact, the device type, the thread count and the torch
    version (a new torch may change every timing)."""
    return f"{digest(artifact)}|{torch.device(device).type}|{threads}|{torch.__version__}"


def _read() -> Dict[str, Dict[str, float]]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    timings = {}
    for key, value in data.items():
        if isinstance(value, dict):  # keep only well-formed entries
            valid = {b: float(t) for b, t in value.items() if isinstance(t, (int, float))}
            if valid:
                timings[key] = valid
    return timings


def _write(key: str, timings: Dict[str, float]) -> None:
    """Record ``timings`` under ``key``: written to a temporary file and renamed into place, so
    a concurrent reader sees the old file or the new one."""
    path = cache_file()
    data = _read()
    data[key] = timings
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".timings-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=1, sort_keys=True)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def measured_order(
    artifact, device: "torch.device | str", threads: Optional[int] = None
) -> Tuple[str, ...]:
    """The backends in ``auto``'s order for ``artifact`` on
    ``device`` with ``threads`` threads (default: torch's current count): those recorded by
    :func:`measure_backends`, fastest first, then the others in :data:`DEFAULT_ORDER`;
    ``eager``, which always runs, last."""
    threads = torch.get_num_threads() if threads is None else threads
    timings = _read().get(_key(artifact, torch.device(device), threads), {})
    measured = sorted((t, b) for b, t in timings.items() if b in DEFAULT_ORDER and b != "eager")
    order = [b for _, b in measured]
    return (*order, *(b for b in DEFAULT_ORDER if b not in order and b != "eager"), "eager")


def _default_params(device: torch.device) -> List[nn.Parameter]:
    """A small mixed model's parameters: matrices, a convolution kernel and many vectors."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(256, 256)] * 4 + [(64, 32, 3, 3)] * 2 + [(256,)] * 24 + [(1 << 18,)]
    return [
        nn.Parameter(torch.randn(s, generator=generator).to(device), requires_grad=True)
        for s in shapes
    ]


def measure_backends(
    artifact,
    backends: Optional[Sequence[str]] = None,
    params: Optional[Sequence[torch.Tensor]] = None,
    *,
    reps: int = 5,
    record: bool = True,
    make_optimizer: Optional[Callable] = None,
) -> Dict[str, float]:
    """Median seconds of one ``FrozenOptimizer`` step of ``artifact`` on each backend, and (with
    ``record``) their recording for ``auto`` on this device type and thread count.

    Args:
        artifact (Artifact): the loaded artifact (trusted, to time its code backends).
        backends (sequence of str, optional): which to time (default: every backend the
            artifact can run here, eager included).
        params (sequence of Tensor, optional): the parameters to step, their gradients set
            once (default: a small mixed model on the CPU; give your model's to tune for it).
        reps (int): timed steps per backend after two warm-up steps (compiles included in
            those). (default: 5)
        record (bool): write the timings to :func:`cache_file`. (default: True)
        make_optimizer (callable, optional): ``make_optimizer(params, artifact, backend)``, the
            optimizer to time (default: ``FrozenOptimizer(params, artifact, backend=backend)``).

    The parameters are stepped, and their values and gradients restored after each backend.
    A backend that raises while it is built or stepped is left out, with a log line.
    """
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise ValueError(f"Invalid reps: {reps!r} (an integer >= 1)")
    if make_optimizer is None:
        from compiledopt.runtime.frozen_optimizer import FrozenOptimizer

        def make_optimizer(ps, art, backend):
            return FrozenOptimizer(ps, art, backend=backend)

    params = list(params) if params is not None else _default_params(torch.device("cpu"))
    if not params:
        raise ValueError("measure_backends needs at least one parameter")
    device = params[0].device
    generator = torch.Generator().manual_seed(1)
    originals = [p.detach().clone() for p in params]
    gradients = [p.grad for p in params]  # the caller's, given back at the end
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device=device, dtype=p.dtype)
    candidates = list(backends) if backends is not None else list(DEFAULT_ORDER)
    timings: Dict[str, float] = {}
    for backend in candidates:
        try:
            optimizer = make_optimizer(params, artifact, backend)
            optimizer.step()
            optimizer.step()
            times = []
            for _ in range(reps):
                _synchronize(device)
                start = time.perf_counter()
                optimizer.step()
                _synchronize(device)
                times.append(time.perf_counter() - start)
        except Exception as error:  # a backend that cannot run here is not a candidate
            logger.info("measure_backends: %s left out: %s", backend, error)
            continue
        finally:
            with torch.no_grad():
                for p, value in zip(params, originals):
                    p.copy_(value)
        timings[backend] = statistics.median(times)
    for p, grad in zip(params, gradients):
        p.grad = grad
    if record and timings:
        _write(_key(artifact, device, torch.get_num_threads()), timings)
    return timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
