"""Spawning the processes of a multi-process test (tests/fsdp_worker.py)."""

import time

import pytest
import torch.multiprocessing as mp


def spawn(fn, args, nprocs: int, timeout: float) -> None:
    """``mp.spawn`` that fails the test (killing the workers) instead of hanging past
    ``timeout`` seconds, e.g. when one rank waits in a collective another never reaches."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {nprocs} FSDP workers did not finish within {timeout} s")
