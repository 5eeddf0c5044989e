"""Compiled packages built in a child process after a run that ran eager, for the runs after it.

``backend="auto"`` runs the eager rule until its compiled one is ready, and compiles only once a
run has lasted about what the compile costs (:mod:`~compiledopt.runtime.warming`): a short run
never compiles. Since a package is built once per machine (:mod:`~compiledopt.runtime.packages`)
and every later run loads it in milliseconds, ``auto`` notes the calls that found no package
(:data:`BUILDER`), and as the process exits (or at :meth:`Builder.start`) one child process
builds them and stores them for the next run. The child outlives the run; it is scheduled only
on CPU time nothing else wants (``SCHED_IDLE``, else ``nice`` 19), computes on one thread, and
compiles without a pool of workers. It does not start during the run: on a 2-core machine even
an idle-priority build, sharing caches and memory bandwidth, made the training loop's steps 2-3
times slower. Children of several processes build one at a time (a lock in the store);
:func:`wait_for_builders` waits for them.

The child gets the frozen rule (pickled with :func:`torch.save` into a private temporary
folder, read back by the child alone, which removes it) and, of each call, the inputs' shapes
and dtypes (small integer inputs with their values); it builds what the store lacks and exits.
Its output goes to ``$COMPILEDOPT_CACHE/packages/builder.log``; a build that fails leaves its
calls to ``auto``'s patience, as before.
"""

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from compiledopt.runtime.packages import PackagedCompile, found_more, mode, signature, store

__all__ = ["BUILDER", "Builder", "main", "wait_for_builders"]

logger = logging.getLogger("compiledopt")

#: Integer inputs with at most this many elements are sent with their values (steps, seeds, the
#: sides of padded members); every other input as its shape and dtype.
SMALL = 1 << 16
#: The builder's log is started afresh once it is this large.
MAX_LOG_BYTES = 1 << 20


class Builder:
    """Collects the calls whose packages are missing, and builds them in one child process
    (see the module doc): :meth:`start` runs it, as the process exits if not before."""

    def __init__(self) -> None:
        self._pending: List[Tuple[nn.Module, tuple, dict, str]] = []
        self._asked: Set[Tuple[int, tuple]] = set()
        self._child: Optional[subprocess.Popen] = None
        self._at_exit = False

    def request(self, module: nn.Module, args: tuple, options: dict, what: str) -> None:
        """Note that a call of ``module`` on ``args`` found no package (once per call
        signature): built when :meth:`start` runs, at the latest as this process exits."""
        if mode() != "build":
            return
        key = (id(module), signature(tree_leaves(args)))
        if key in self._asked:
            return
        self._asked.add(key)
        self._pending.append((module, tree_map(_describe, args), dict(options), what))
        if not self._at_exit:
            self._at_exit = True
            atexit.register(self.start)

    def cancel(self) -> int:
        """Drop the calls noted and not yet handed to a child; how many there were."""
        count, self._pending = len(self._pending), []
        return count

    def start(self) -> Optional[int]:
        """Start the child on the calls noted so far (none: nothing); its process id."""
        if not self._pending or mode() != "build":
            return None
        jobs, self._pending = self._pending, []
        folder = tempfile.mkdtemp(prefix="compiledopt-build-")  # this user's only
        torch.save({"jobs": jobs, "threads": torch.get_num_threads()}, Path(folder) / "job")
        root = str(Path(__file__).resolve().parents[2])  # the folder compiledopt is in
        env = dict(os.environ, COMPILEDOPT_PACKAGES="build")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        log = store() / "builder.log"
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keep = log.exists() and log.stat().st_size < MAX_LOG_BYTES  # else start it afresh
        with open(log, "ab" if keep else "wb") as output:
            self._child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, folder],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=env,
                start_new_session=True,  # outlives this process, and its Ctrl-C
            )
        # Until the child holds the store's lock, this marker tells wait_for_builders of it.
        (store() / f"builder-{self._child.pid}.starting").touch()
        logger.info(
            "building %d compiled package(s) for later runs in a background process (pid %d, "
            "output in %s)",
            len(jobs),
            self._child.pid,
            log,
        )
        return self._child.pid

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the child started last; ``True`` once it has ended (its packages are then
        found by the calls that lacked them)."""
        if self._child is None:
            return True
        try:
            code = self._child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._child = None
        found_more()
        if code != 0:
            logger.warning("building compiled packages failed (exit %s)", code)
        return True


def wait_for_builders(timeout: float = 3600.0) -> bool:
    """Wait until no child of any process builds packages into this store or is about to (they
    hold its lock, or have a marker until they do); ``True`` if none does within ``timeout``
    seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with _lock(blocking=False) as held:
            if held and not _starting():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _starting() -> List[int]:
    """The children started here that do not hold the store's lock yet (live ones only)."""
    alive = []
    for marker in store().glob("builder-*.starting"):
        try:
            pid = int(marker.name.split("-")[1].split(".")[0])
            os.kill(pid, 0)  # (signal 0: whether it exists)
            alive.append(pid)
        except (ValueError, ProcessLookupError):
            marker.unlink(missing_ok=True)  # a child that ended before it took the lock
        except PermissionError:  # another user's process with that id: not ours
            marker.unlink(missing_ok=True)
    return alive


@contextlib.contextmanager
def _lock(blocking: bool) -> Iterator[bool]:
    """The store's builder lock (one child builds at a time): whether it was taken."""
    path = store() / "builder.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as file:
        try:
            import fcntl

            fcntl.flock(file, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except ImportError:  # no flock on this platform: builds are not serialised
            yield True
            return
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


#: The child's program (``python -m`` would import this module twice: the package imports it).
_CHILD = (
    "import sys; from compiledopt.runtime.package_builder import main; sys.exit(main(sys.argv[1]))"
)


class _Described:
    """A tensor input the child makes again: its shape and dtype (tracing reads no values)."""

    def __init__(self, value: Tensor) -> None:
        self.shape, self.dtype = tuple(value.shape), value.dtype


def _describe(value: Any) -> Any:
    if not isinstance(value, Tensor):
        return value
    if not value.is_floating_point() and value.numel() <= SMALL:
        return value.detach().cpu().clone()
    return _Described(value)


def _make(value: Any) -> Any:
    return torch.zeros(value.shape, dtype=value.dtype) if isinstance(value, _Described) else value


def _lowest_priority() -> None:
    """Run only on CPU time nothing else wants: ``SCHED_IDLE`` where Linux has it (inherited by
    the compiler processes), else ``nice`` 19. Under ``nice`` alone a busy child still takes
    time slices of milliseconds from the training process's OpenMP threads, each of whose
    parallel regions then waits for the one that lost its core (a 23 ms step took 290 ms)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
    except (AttributeError, OSError):  # neither: the same priority, still another process
        pass


#: The builder of this process.
BUILDER = Builder()


def main(folder: str) -> int:
    """The child: build the packages of the jobs in ``folder`` (see the module doc)."""
    _lowest_priority()
    job = torch.load(Path(folder) / "job", weights_only=False)  # written by our parent, to us
    shutil.rmtree(folder, ignore_errors=True)
    # Computing on one thread (the packages are for the parent's count: part of their key) and
    # compiling without a pool of workers: one core at most, and only when nothing else wants it.
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    with _lock(blocking=True):
        (store() / f"builder-{os.getpid()}.starting").unlink(missing_ok=True)
        for module, described, options, what in job["jobs"]:
            args = tree_map(_make, described)
            rule = PackagedCompile(module, lambda *_: None, options, what, job["threads"])
            with torch.no_grad():
                rule(*args)
    return 0
