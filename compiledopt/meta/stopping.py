"""Stop a long run cleanly when asked: ``SIGTERM`` or ``SIGINT`` (Ctrl-C) ends it at the next
meta-step boundary, with a checkpoint that ``--resume`` continues, instead of losing the
meta-steps since the last periodic checkpoint.

:class:`StopRequest` is a context manager that catches those signals while it is open and a
callable that says whether one arrived. It catches them in the main thread only, and not one the
process ignores (``nohup``, a background job); elsewhere it never asks to stop. The first signal
only sets the request and logs a WARNING; the next one does what it would have done without the
handler (``SIGINT`` raises ``KeyboardInterrupt``, ``SIGTERM`` ends the process), for a run that
must end at once.
"""

import logging
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional, Sequence

__all__ = ["StopRequest"]

logger = logging.getLogger(__name__)

#: The signals a run stops on by default.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Catches ``signals`` while open; calling it says whether one has arrived.

    Args:
        signals (sequence of signal.Signals, optional): what to catch. (default: ``SIGTERM``
            and ``SIGINT``)

    Attributes:
        received (str or None): the first signal's name (``"SIGTERM"``), or ``None``.

    Example:
        >>> with StopRequest() as stop:
        ...     while not done and not stop():
        ...         work()
    """

    def __init__(self, signals: Sequence[signal.Signals] = SIGNALS) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.received: Optional[str] = None
        self._previous: Dict[signal.Signals, Any] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                if signal.getsignal(number) is not signal.SIG_IGN:  # (nohup, a background job)
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(number).name
        if self.received is not None:  # asked twice: what the signal does without us
            self._restore()
            signal.raise_signal(number)
            return
        self.received = name
        logger.warning(
            "%s received: stopping after this meta-step, with a checkpoint that --resume "
            "continues (send it again to stop at once)",
            name,
        )
