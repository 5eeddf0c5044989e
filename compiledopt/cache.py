"""The folder of compiledopt's caches (backend timings, copies of Hub artifacts): safe to delete.

``$COMPILEDOPT_CACHE`` if set, else ``$XDG_CACHE_HOME/compiledopt`` (an absolute
``XDG_CACHE_HOME`` only), else ``~/.cache/compiledopt``.
"""

import os
from pathlib import Path

__all__ = ["CACHE_VARIABLE", "cache_root"]

#: The environment variable naming the cache folder.
CACHE_VARIABLE = "COMPILEDOPT_CACHE"


def cache_root() -> Path:
    """The cache folder (not created here), read from the environment at each call."""
    root = os.environ.get(CACHE_VARIABLE, "")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = os.path.join(xdg, "compiledopt") if os.path.isabs(xdg) else ""
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "compiledopt")
    return Path(root).expanduser()
