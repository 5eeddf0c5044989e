"""Reading ``compiledopt train`` checkpoints for the commands, and checking a resumed run: the
functions of :mod:`compiledopt.meta.resume`, where they are defined.

:func:`load_checkpoint` turns a file that is not a checkpoint into a ``ValueError`` naming the
file, which ``compiledopt`` prints as one line; :data:`SAFE_CHANGES` is
:data:`compiledopt.meta.resume.RESUMABLE_CHANGES`.
"""

from compiledopt.meta.resume import RESUMABLE_CHANGES as SAFE_CHANGES
from compiledopt.meta.resume import check_resume, checkpoint_kind, load_checkpoint, show

__all__ = ["SAFE_CHANGES", "check_resume", "checkpoint_kind", "load_checkpoint", "show"]
