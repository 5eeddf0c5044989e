"""Run a meta-training function in several processes joined by ``torch.distributed``.

``gloo`` on the CPU, ``nccl`` when the device is CUDA (one GPU per rank). The processes meet
through a file in a fresh temporary folder (no port to pick) and each gets
``cpu_count // processes`` threads. Results travel through files the target writes (the
meta-trainer's checkpoint), not through return values. The ranks run in a process group of
their own; ``SIGTERM``, ``SIGINT`` and ``SIGHUP`` sent to the launching process are forwarded to
each (meta-training then stops at a step boundary: :mod:`compiledopt.meta.stopping`).
"""

import contextlib
import os
import signal
import tempfile
import threading
from types import FrameType
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def distributed() -> bool:
    """Whether this process is one rank of an initialised ``torch.distributed`` group."""
    return dist.is_available() and dist.is_initialized()


def _worker(
    rank: int,
    world: int,
    backend: str,
    init_file: str,
    target: Callable[..., Any],
    args: Tuple[Any, ...],
) -> None:
    # Its own process group: a terminal's Ctrl-C reaches the parent alone, which forwards it
    # once to every rank (see _forwarding).
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        target(*args)
    finally:
        dist.destroy_process_group()


def run_processes(
    processes: int, target: Callable[..., Any], *args: Any, device: str = "cpu"
) -> None:
    """``target(*args)`` in ``processes`` ranks (1: in this process).

    ``target`` and ``args`` must be picklable (a module-level function). Any rank's exception
    propagates as ``torch.multiprocessing.ProcessRaisedException``.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"Invalid processes: {processes!r} (a positive integer)")
    if processes == 1:
        target(*args)
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    with tempfile.TemporaryDirectory(prefix="compiledopt-dist-") as folder:
        init_file = os.path.join(folder, "init")
        context = mp.start_processes(
            _worker,
            args=(processes, backend, init_file, target, args),
            nprocs=processes,
            join=False,
            start_method="spawn",
        )
        assert context is not None  # join=False returns the processes' context
        with _forwarding([p.pid for p in context.processes]):
            while not context.join():
                pass


@contextlib.contextmanager
def _forwarding(pids: List[int]) -> Iterator[None]:
    """While open (in the main thread), ``SIGTERM`` and ``SIGINT`` sent to this process are
    sent on to ``pids``, the ranks, whose meta-training stops at its next step boundary
    (:class:`~compiledopt.meta.stopping.StopRequest`), instead of ending this process alone;
    ``SIGHUP`` too (a closed terminal ends the ranks, which are in a process group of their
    own, as it ends this process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(number: int, frame: Optional[FrameType]) -> None:
        for pid in pids:
            try:
                os.kill(pid, number)
            except ProcessLookupError:  # that rank has already ended
                pass

    numbers = [signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)]  # no SIGHUP: Windows
    previous = {n: signal.signal(n, forward) for n in numbers if n is not None}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
