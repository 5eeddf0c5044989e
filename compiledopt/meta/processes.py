"""Run a meta-training function in several processes joined by ``torch.distributed``.

``gloo`` on the CPU, ``nccl`` when the device is CUDA (one GPU per rank). The processes meet
through a file in a fresh temporary folder (no port to pick) and each gets
``cpu_count // processes`` threads. Results travel through files the target writes (the
meta-trainer's checkpoint), not through return values.
"""

import os
import tempfile
from typing import Any, Callable, Tuple

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
        mp.spawn(_worker, args=(processes, backend, init_file, target, args), nprocs=processes)
