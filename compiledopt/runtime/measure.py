"""Timing one optimizer step of every backend an artifact can run, for ``backend="auto"``.

:func:`measure_backends` steps a ``FrozenOptimizer`` on each backend and records the medians
(:func:`compiledopt.runtime.autotune.record_timings`), which ``auto`` then reads to try the
backends fastest first (see :mod:`compiledopt.runtime.autotune`).
"""

import logging
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from compiledopt.runtime.autotune import DEFAULT_SHAPES, default_order, record_timings
from compiledopt.runtime.frozen_optimizer import FrozenOptimizer

__all__ = ["measure_backends"]

logger = logging.getLogger("compiledopt")


def _default_params(device: torch.device) -> List[nn.Parameter]:
    """A small mixed model's parameters: matrices, a convolution kernel and many vectors."""
    generator = torch.Generator().manual_seed(0)
    shapes = DEFAULT_SHAPES
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
    ``record``) their recording for ``auto`` on this device type, thread count and size class of
    ``params`` (:func:`size_class`; ``auto`` reads it only for parameters of the same class).

    Args:
        artifact (Artifact): the loaded artifact (trusted, to time its code backends).
        backends (sequence of str, optional): which to time (default: every runtime backend
            registered now, in :func:`default_order`, eager included; those the artifact cannot
            run here are left out).
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
    candidates = list(backends) if backends is not None else list(default_order())
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
        record_timings(artifact, device, sum(p.numel() for p in params), timings)
    return timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
