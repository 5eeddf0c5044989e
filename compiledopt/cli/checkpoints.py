"""Reading ``compiledopt train`` checkpoints for the commands.

:func:`load_checkpoint` is :func:`compiledopt.meta.resume.load_checkpoint` (imported when called:
the commands import nothing heavy at import time), which turns a file that is not a checkpoint
into a ``ValueError`` naming the file, which ``compiledopt`` prints as one line. The resume checks
are in :mod:`compiledopt.meta.resume` too.
"""

from typing import Any, Dict

__all__ = ["load_checkpoint"]


def load_checkpoint(path: str, option: str) -> Dict[str, Any]:
    """The checkpoint at ``path``; see :func:`compiledopt.meta.resume.load_checkpoint`."""
    from compiledopt.meta.resume import load_checkpoint as load

    return load(path, option)
