"""The package's version (the one ``pyproject.toml`` declares), importable from any layer, and
the digest of the code that version is installed as."""

import functools
import hashlib
from pathlib import Path

__all__ = ["VERSION", "source_digest"]

#: ``compiledopt.__version__``.
VERSION = "0.1.0"


#: This package's folder, the default of :func:`source_digest`.
PACKAGE = Path(__file__).resolve().parent


@functools.cache
def source_digest(root: Path = PACKAGE) -> str:
    """The SHA-256 of every ``.py`` file under ``root`` (by default this package), their paths
    relative to it included: what a compiled rule kept across processes was built from. The
    version alone does not say it (a checkout edited, or installed again without a new
    version, keeps its number); read once per process (about 150 files, a few milliseconds)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        try:
            data = path.read_bytes()
        except OSError as error:  # unreadable: its name and the error stand for its bytes
            data = f"unreadable: {type(error).__name__}".encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()
