"""Settings read from a JSON file (``--config``) under those given directly: what
``compiledopt train`` does with its ``--config`` file and its options.

A file holds one JSON object whose keys are the settings' names (and an optional ``"comment"``,
ignored); its values are checked by the caller's ``check``. Layered over the defaults, a value
given directly wins over the file's, and the file's over the default (:func:`layered`).
"""

from typing import Any, Callable, Collection, Dict, FrozenSet, Mapping, Set, Tuple

from compiledopt._validation import strict_json

__all__ = ["layered", "read_config"]


def read_config(
    path: str, known: Collection[str], check: Callable[[str, Any, str], Any]
) -> Dict[str, Any]:
    """The settings of the JSON file ``path``, each value ``check(key, value, source)``; a file
    that cannot be read, is not a JSON object, or has a key out of ``known`` is refused with a
    ``ValueError`` naming ``--config <path>`` (the ``source`` passed to ``check``)."""
    source = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = strict_json(handle.read(), constants=True)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: No such file or directory") from None
    except IsADirectoryError:
        raise ValueError(f"{source}: is a directory, not a JSON file") from None
    except OSError as error:  # a name too long, a folder that cannot be read...
        raise ValueError(f"{source}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not JSON (not UTF-8 text)") from None
    except ValueError as error:  # json.JSONDecodeError, a key given twice
        raise ValueError(f"{source}: not JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(loaded).__name__}")
    unknown = sorted(set(loaded) - set(known) - {"comment"})
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} (known: {', '.join(known)})")
    return {k: check(k, v, source) for k, v in loaded.items() if k != "comment"}


def layered(
    defaults: Mapping[str, Any], *layers: Mapping[str, Any]
) -> Tuple[Dict[str, Any], FrozenSet[str]]:
    """``defaults`` with the values of each layer in turn over those below (a ``None`` or a
    name out of ``defaults`` leaves them as they are), and the names that a layer set."""
    values = dict(defaults)
    given: Set[str] = set()
    for layer in layers:
        for key, value in layer.items():
            if key in values and value is not None:
                values[key] = value
                given.add(key)
    return values, frozenset(given)
