"""What the ``compiledopt`` commands print, made safe for a terminal, and the lines several of them
print.

An artifact's strings may hold terminal control sequences (a fake "signature valid" line, a
retitled window): :class:`PrintableWriter` writes a command's whole output, and ``compiledopt``'s
error line, through :func:`~compiledopt.apps.text.printable`, which writes such characters as
visible escapes. The lines several commands print are written by one function each
(:func:`wrote_artifact`).
"""

from typing import Any, Sequence, TextIO

from compiledopt.apps.text import is_unsafe, printable

__all__ = ["PrintableWriter", "is_unsafe", "printable", "wrote_artifact"]


class PrintableWriter:
    """A text stream that writes to ``stream`` what it is given through :func:`printable`
    (newlines kept): commands that print from an artifact write through it, so no string of
    theirs reaches the terminal raw, whichever code path printed it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable(text, keep_newlines=True))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def wrote_artifact(path: Any, backends: Sequence[str], seconds: float) -> str:
    """The line of a command that wrote an artifact: ``wrote PATH (BACKEND, ...) in S s``."""
    return f"wrote {path} ({', '.join(backends)}) in {seconds:.1f} s"
