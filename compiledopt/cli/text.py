"""What the ``compiledopt`` commands print: the lines several of them print, one function each
(:func:`wrote_artifact`), and how.

An artifact's strings may hold terminal control sequences (a fake "signature valid" line, a
retitled window): a command's whole output goes through
:class:`~compiledopt.apps.text.PrintableWriter`, and ``compiledopt``'s error line through
:func:`~compiledopt.apps.text.printable` (both importable from here as well), which write such
characters as visible escapes.
"""

from typing import Any, Sequence

from compiledopt.apps.text import PrintableWriter, printable

__all__ = ["PrintableWriter", "printable", "wrote_artifact"]


def wrote_artifact(path: Any, backends: Sequence[str], seconds: float) -> str:
    """The line of a command that wrote an artifact: ``wrote PATH (BACKEND, ...) in S s``."""
    return f"wrote {path} ({', '.join(backends)}) in {seconds:.1f} s"
