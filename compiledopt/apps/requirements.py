"""Optional dependencies of the applications and commands, checked before any work.

An application (or a command) that needs an optional package calls :func:`require` first, so
that a missing package stops it with one error naming the package and the extra that installs it
(``compiledopt`` prints ``compiledopt <command>: <message>`` and exits with status 2) instead of
a traceback halfway through, with files already written.
"""

import importlib
from typing import Optional

__all__ = ["TASK_FAMILY_MODULES", "MissingDependencyError", "require", "require_task_family"]

#: Import names whose installable distribution is called something else.
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}

#: Built-in task families that need an optional package: family -> (import name, extra).
TASK_FAMILY_MODULES = {
    "digits": ("sklearn", "tasks"),
    "mixed": ("sklearn", "tasks"),
    "image-mlp": ("sklearn", "tasks"),
    "mixed-lm": ("sklearn", "tasks"),
}


class MissingDependencyError(ImportError):
    """An optional package that a command needs is not installed."""


def require(module: str, extra: str) -> None:
    """Import ``module``, or raise :class:`MissingDependencyError` naming it and its extra.

    Args:
        module: the import name, e.g. ``"sklearn"`` or ``"matplotlib"``.
        extra: the ``compiledopt`` extra that installs it (``[project.optional-dependencies]``),
            e.g. ``"tasks"`` or ``"bench"``.
    """
    try:
        importlib.import_module(module)
    except ImportError as error:
        package = _DISTRIBUTIONS.get(module, module)
        missing: Optional[str] = getattr(error, "name", None)
        if missing in (None, module):
            detail = "is not installed"
        else:  # installed, but something it imports is missing
            detail = f"cannot be imported ({error})"
        raise MissingDependencyError(
            f"needs {package}, which {detail}: pip install 'compiledopt[{extra}]'", name=module
        ) from error


def require_task_family(family: str) -> None:
    """:func:`require` what the built-in task family ``family`` needs (``digits``: scikit-learn)."""
    if family in TASK_FAMILY_MODULES:
        require(*TASK_FAMILY_MODULES[family])
