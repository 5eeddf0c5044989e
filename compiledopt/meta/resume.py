"""Resuming a meta-training run: the settings that may change, reading a checkpoint, and checking
a resumed run's settings against the checkpoint's.

A setting has one name everywhere: its field of :class:`~compiledopt.meta.MetaConfig`, its
option in ``compiledopt train`` (``meta_steps`` for ``--meta-steps``) and its key in a
``--config`` file. :data:`RESUMABLE_CHANGES` is the one table of the settings a resumed run may
change without asking, read by :class:`~compiledopt.meta.MetaLoop` and by ``compiledopt train``.

:func:`load_checkpoint` reads a checkpoint (``weights_only``: it never unpickles arbitrary
objects) and turns a file that is not one — random bytes, a JSON file, an empty file — into a
``ValueError`` naming the file. :func:`check_resume` compares the settings a checkpoint was
trained with to the ones a resumed run asks for, and refuses a difference unless the setting may
safely change (:data:`RESUMABLE_CHANGES`) or the user allowed it by name.
"""

import json
import os
from typing import Any, Dict, Iterable, List, Sequence

__all__ = ["RESUMABLE_CHANGES", "check_resume", "load_checkpoint", "show"]

#: Settings a resumed run may change without asking: how long it runs and how it is monitored.
RESUMABLE_CHANGES = ("meta_steps", "eval_every", "checkpoint_every")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 120 else line[:117] + "..."


def load_checkpoint(path: str, option: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` (a dict of tensors, numbers and strings).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: ``path`` is not a readable file.
        ValueError: the file is not a checkpoint (the message names ``option`` and the file).
    """
    import pickle

    import torch

    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path}: is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path}: No such file or directory")
    not_one = f"{option} {path}: not a checkpoint written by `compiledopt train`"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{not_one} (not a torch.save file, or one holding more than tensors and values)"
        ) from None
    except EOFError:
        raise ValueError(f"{not_one} (empty or truncated)") from None
    except Exception as error:
        # Arbitrary bytes make torch's weights-only unpickler raise assorted errors (RuntimeError,
        # UnicodeDecodeError, IndexError, KeyError, struct.error, ...): each means "not ours".
        raise ValueError(f"{not_one} ({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{not_one} (it holds a {type(state).__name__}, not a dict)")
    return state


def show(value: Any) -> str:
    """A setting's value as the messages print it (JSON: ``0.001``, ``"coordinate-mlp"``)."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def check_resume(
    recorded: Dict[str, Any],
    requested: Dict[str, Any],
    allowed: Iterable[str] = (),
    fixed: Sequence[str] = (),
) -> List[Dict[str, Any]]:
    """The settings that change from ``recorded`` (the checkpoint's) to ``requested`` (this
    run's), each as ``{"setting", "from", "to"}``; refuses any that is neither in
    :data:`RESUMABLE_CHANGES` nor in ``allowed``.

    Settings absent from either side are not compared (an older checkpoint may not record one).

    Raises:
        ValueError: ``allowed`` names a setting that is not compared, or one of ``fixed`` (that a
            resumed run cannot change at all); or a setting changes without permission. The
            message names each refused setting with both values.
    """
    allowed = list(allowed)
    unknown = [name for name in allowed if name not in recorded and name not in requested]
    if unknown:
        raise ValueError(
            f"--allow-changes: unknown setting {unknown[0]!r} (one of {', '.join(recorded)})"
        )
    frozen = [name for name in allowed if name in fixed]
    if frozen:
        raise ValueError(
            f"--allow-changes: {frozen[0]} cannot change when a run is resumed "
            f"(fixed: {', '.join(fixed)})"
        )
    changes = [
        {"setting": name, "from": recorded[name], "to": requested[name]}
        for name in recorded
        if name in requested and recorded[name] != requested[name]
    ]
    refused = [c for c in changes if c["setting"] not in RESUMABLE_CHANGES + tuple(allowed)]
    if refused:
        listed = "; ".join(
            f"{c['setting']} is {show(c['from'])} in the checkpoint, {show(c['to'])} now"
            for c in refused
        )
        names = [c["setting"] for c in refused]
        if any(name in fixed for name in names):
            hint = "start a new run (another --output) to change " + ", ".join(
                name for name in names if name in fixed
            )
        else:
            hint = f"pass --allow-changes {','.join(names)} to change them deliberately"
        raise ValueError(f"--resume: {listed} ({hint})")
    return changes
