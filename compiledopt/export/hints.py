"""Whether a JSON value fits a Python type annotation: how a manifest's transform ``kwargs`` are
checked against the catalog constructor's signature without building anything."""

import collections.abc
import types
import typing
from typing import Any, Callable, Dict, Optional, Tuple

from compiledopt._validation import is_int64, is_real

__all__ = ["describe", "hint_problem", "is_real"]


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


#: Whether a JSON value fits a scalar annotation.
_SCALARS: Dict[Any, Callable[[Any], bool]] = {
    bool: lambda value: isinstance(value, bool),
    int: is_int64,  # the ints torch takes, not JSON's any size
    float: lambda value: is_real(value),
    str: lambda value: isinstance(value, str),
    type(None): lambda value: value is None,
}


def hint_problem(
    value: Any, hint: Any, path: str, key_path: Callable[[str, Any], str]
) -> Optional[Tuple[str, Any, str]]:
    """``None`` if the JSON ``value`` fits the annotation ``hint``, else ``(path, value,
    expected)`` of the first part that does not (``key_path(path, key)`` names an object's
    entry). Annotations this does not model pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if any(hint_problem(value, arm, path, key_path) is None for arm in args):
            return None
        return path, value, describe(hint)
    if hint in _SCALARS:
        return None if _SCALARS[hint](value) else (path, value, describe(hint))
    if origin in _SEQUENCES or hint in (list, tuple):
        if not isinstance(value, list):
            return path, value, describe(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return path, value, describe(hint)
            items = args
        else:
            item_hint = args[0] if args else Any
            if item_hint in _SCALARS:  # a list of scalars: one check per item, no path built
                fits = _SCALARS[item_hint]
                for index, item in enumerate(value):
                    if not fits(item):
                        return f"{path}[{index}]", item, describe(item_hint)
                return None
            items = (item_hint,) * len(value)
        for index, (item, item_hint) in enumerate(zip(value, items)):
            problem = hint_problem(item, item_hint, f"{path}[{index}]", key_path)
            if problem is not None:
                return problem
        return None
    if origin in _MAPPINGS or hint is dict:
        if not isinstance(value, dict):
            return path, value, describe(hint)
        item_hint = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            problem = hint_problem(item, item_hint, key_path(path, key), key_path)
            if problem is not None:
                return problem
        return None
    if isinstance(hint, type) and origin is None:
        return None if isinstance(value, hint) else (path, value, describe(hint))
    return None


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(arm) for arm in args)
    names = {bool: "a bool", int: "a 64-bit int", float: "a finite number", str: "a string"}
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "null"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)}: " + ", ".join(describe(arm) for arm in args)
    if origin in _SEQUENCES or hint in (list, tuple):
        return "a list" + (f" (each {describe(args[0])})" if args else "")
    if origin in _MAPPINGS or hint is dict:
        return "a JSON object"
    return f"a {getattr(hint, '__name__', hint)} (which JSON cannot hold)"
