"""A compiled rule that never makes a step wait for its compile.

``backend="auto"`` picks the compiled backend where nothing faster was measured, but compiling a
rule takes seconds to a minute on a small CPU, and every new process pays it again. A
:class:`Warming` rule answers with the eager rule until the compiled one is ready: the first call
of each kind (each graph the compiled rule will need: a rank, a small-vector formulation, a
batched bucket) starts its compile in a background thread on copies of that call's tensors, and
later calls of that kind run compiled once it has finished. The optimizer's state is the same
tensors either way, so the hand-over is exact up to the rounding by which eager and compiled
arithmetic differ (a few float32 ulps a step).

A compile costs one to four minutes of CPU on two cores, and while it traces it holds the
interpreter lock the training loop needs too, so it only starts once it can pay off: when the
eager rule has run for as long as its compile will take (an :class:`EagerClock` shared by a
rule's forms), as one would rent until the rent reaches the price. The price is what the rule's
compiles took the last time on this machine (recorded per rule, artifact, device, instruction
set and torch version: :func:`~compiledopt.runtime.timings.compile_key`; a later process finds
Inductor's caches warm and compiles in a fraction of the first time), else :data:`PATIENCE_S`
seconds, which is also the most it waits. A run shorter than that never compiles and runs as
fast as the eager backend; a longer one compiles once its eager steps have cost about what the
compile will.

A compiled rule kept as packages (:mod:`~compiledopt.runtime.packages`) needs no patience where
this machine has stored them: every call whose sizes a stored package serves runs it from the
first step on (a package loads in milliseconds). A call that finds none is noted, and the
packages a run lacked are built after it ends, in a background process
(:mod:`~compiledopt.runtime.package_builder`), so the next run starts compiled.

A compile that fails leaves that kind on the eager rule, with one WARNING. :func:`wait` blocks
until every compile started so far has finished (for tests and benchmarks that want the
compiled rule from a known step on).
"""

import logging
import threading
import time
from typing import Any, Callable, Hashable, List, Optional, Set

import torch
from torch.utils._pytree import tree_map

from compiledopt.runtime.compiled import COMPILE_LOCK
from compiledopt.runtime.timings import record_compile, recorded_compile

__all__ = ["PATIENCE_S", "EagerClock", "Warming", "compiles_started", "wait"]

#: Seconds of eager rule time before the background compiles start where no compile of the rule
#: was recorded on this machine, and the most it waits otherwise (see the module doc).
PATIENCE_S = 120.0

logger = logging.getLogger("compiledopt")

_THREADS: List[threading.Thread] = []
#: How many background compiles this process has started (see :func:`compiles_started`).
_STARTED = [0]


def compiles_started() -> int:
    """How many background compiles this process has started: 0 for a run whose rules never
    reached their patience (they ran eager throughout; :func:`wait` is then trivially true)."""
    return _STARTED[0]


def wait(timeout: "float | None" = None) -> bool:
    """Wait for every background compile started so far; ``True`` when all have finished
    (``False``: ``timeout`` seconds passed first)."""
    if not _joined(list(_THREADS), timeout):
        return False
    _THREADS[:] = [t for t in _THREADS if t.is_alive()]
    return True


def _joined(threads: List[threading.Thread], timeout: "float | None") -> bool:
    """Join ``threads`` in turn, each for at most ``timeout`` seconds; ``True`` when all ended."""
    for thread in threads:
        thread.join(timeout)
        if thread.is_alive():
            return False
    return True


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class EagerClock:
    """The time the eager forms of one rule have run, against ``patience`` seconds.

    Args:
        patience (float, optional): the seconds; default: the compile time recorded for
            ``key`` on this machine, at most :data:`PATIENCE_S` (read when the clock is made),
            or :data:`PATIENCE_S` where none was recorded.
        key (str, optional): the rule's :func:`~compiledopt.runtime.timings.compile_key`:
            the compile times the clock is told of (:meth:`paid`) are recorded under it.
    """

    def __init__(self, patience: "float | None" = None, key: Optional[str] = None) -> None:
        if patience is None:
            price = None if key is None else recorded_compile(key)
            patience = PATIENCE_S if price is None else min(price, PATIENCE_S)
        self.patience = float(patience)
        self.key = key
        self.spent = 0.0
        self.compile_s = 0.0
        self._paying = threading.Lock()

    def paid(self, seconds: float) -> None:
        """One of the rule's compiles finished after ``seconds``: the rule's compile time so far
        is recorded under :attr:`key` (when given) for later processes' patience. Compiles of
        several kinds finish on their own threads: the sum and its record are taken under one
        lock, so a later total is never overwritten by an earlier one."""
        with self._paying:
            self.compile_s += seconds
            if self.key is None:
                return
            try:
                record_compile(self.key, self.compile_s)
            except OSError as error:  # a read-only cache costs later runs patience, nothing more
                logger.info("compile time not recorded: %s", error)

    @property
    def due(self) -> bool:
        """Whether the compiles may start."""
        return self.spent >= self.patience


class Warming:
    """``compiled`` once it is ready for a call's kind, ``eager`` until then.

    Args:
        eager (callable): the eager rule.
        compiled (callable): the compiled rule, same signature and results up to rounding.
        kind (callable): ``kind(*args) -> hashable``, the graph a call needs (calls of one kind
            never recompile once one of them has compiled).
        what (str): the rule, for log lines.
        clock (EagerClock, optional): the eager time that starts the compiles, shared by an
            optimizer's rules (default: a clock of no patience: the first call of a kind starts
            its compile).
    """

    def __init__(
        self,
        eager: Callable,
        compiled: Callable,
        kind: Callable[..., Hashable],
        what: str,
        clock: Optional[EagerClock] = None,
    ) -> None:
        self.eager = eager
        self.compiled = compiled
        self.kind = kind
        self.what = what
        self.clock = EagerClock(0.0) if clock is None else clock
        self._started: Set[Hashable] = set()
        self._ready: Set[Hashable] = set()
        self._threads: List[threading.Thread] = []
        self._stored: Set[Hashable] = set()  # kinds a stored package has served
        # A compiled rule kept as packages (see runtime.packages): a call whose package is
        # stored runs it at once, and one whose package is not has it built in the background.
        self._packaged = hasattr(compiled, "stored") and hasattr(compiled, "prebuild")

    def __call__(self, *args: Any) -> Any:
        kind = self.kind(*args)
        # A compile running in the background holds the lock (its settings are global): this
        # call then runs eager rather than wait for it.
        if kind in self._ready and COMPILE_LOCK.acquire(blocking=False):
            try:
                return self.compiled(*args)
            finally:
                COMPILE_LOCK.release()
        if self._packaged and kind not in self._ready and COMPILE_LOCK.acquire(False):
            try:  # a call whose sizes a stored package serves runs it (a dict look-up)
                if self.compiled.stored(*args):  # type: ignore[attr-defined]
                    self._announce(kind)
                    return self.compiled(*args)
                self.compiled.prebuild(*args)  # type: ignore[attr-defined]
            finally:
                COMPILE_LOCK.release()
        if kind not in self._started and self.clock.due:
            self._started.add(kind)
            example = tree_map(_copy, args)
            thread = threading.Thread(
                target=self._warm, args=(kind, example), name="compiledopt-compile", daemon=True
            )
            _THREADS.append(thread)
            _STARTED[0] += 1
            self._threads.append(thread)
            logger.info(
                "%s: compiling %s in the background; the eager rule runs until it is ready",
                self.what,
                kind,
            )
            thread.start()
        began = time.perf_counter()
        try:
            return self.eager(*args)
        finally:
            self.clock.spent += time.perf_counter() - began

    def _announce(self, kind: Hashable) -> None:
        if kind not in self._stored:
            self._stored.add(kind)
            logger.info("%s: compiled %s was stored on this machine; it runs now", self.what, kind)

    def wait(self, timeout: "float | None" = None) -> bool:
        """Wait for this rule's compiles started so far (not other rules'); ``True`` when all
        have finished (``False``: ``timeout`` seconds passed first, each)."""
        return _joined(self._threads, timeout)

    def _warm(self, kind: Hashable, example: tuple) -> None:
        try:
            with COMPILE_LOCK, torch.no_grad():
                began = time.perf_counter()
                self.compiled(*example)
                seconds = time.perf_counter() - began
        except Exception as error:  # the eager rule keeps running that kind
            logger.warning(
                "%s: compiling %s failed, its parameters keep the eager rule: %s",
                self.what,
                kind,
                error,
            )
            return
        self._ready.add(kind)
        self.clock.paid(seconds)
        logger.info(
            "%s: compiled %s is ready after %.1f s; later steps run it", self.what, kind, seconds
        )
