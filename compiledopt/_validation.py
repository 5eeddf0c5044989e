"""Argument checks shared by the public constructors: ``ValueError("Invalid <name>: <value>")``."""

import json
import math
import numbers
import re
from typing import Any, SupportsInt, cast


def is_int64(value: object) -> bool:
    """An int, not a bool, that torch can hold (a size, a seed): from ``-2**63`` to
    ``2**63 - 1`` (JSON's ints have any size)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 63


def is_real(value: object) -> bool:
    """A finite int or float, not a bool (ints too large for a float are not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_real(
    value: object,
    what: str,
    low: float = -math.inf,
    high: float = math.inf,
    include_low: bool = True,
    include_high: bool = False,
) -> float:
    """``value`` as a float, or ``ValueError(f"Invalid {what}: {value!r} (...)")`` unless it is a
    finite real number (not a bool) in the interval from ``low`` to ``high``."""
    lower = "[" if include_low else "("
    upper = "]" if include_high else ")"
    expected = f"expected a finite number in {lower}{low:g}, {high:g}{upper}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {what}: {value!r} ({expected})")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        bits = int(cast(SupportsInt, value)).bit_length()
        raise ValueError(f"Invalid {what}: an int of {bits} bits ({expected})") from None
    above = number >= low if include_low else number > low
    below = number <= high if include_high else number < high
    if not (math.isfinite(number) and above and below):
        raise ValueError(f"Invalid {what}: {value!r} ({expected})")
    return number


def check_positive(value: object, what: str) -> float:
    """A finite number > 0."""
    return check_real(value, what, 0.0, include_low=False)


def check_int(value: object, what: str, minimum: int = 0) -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {what}: {value!r} (expected an integer >= {minimum})")
    return value


def check_fields(
    config: object,
    positive_ints: "tuple[str, ...]" = (),
    non_negative_ints: "tuple[str, ...]" = (),
    positive_numbers: "tuple[str, ...]" = (),
) -> None:
    """Check the named attributes of a settings object (each error names the field)."""
    for name in positive_ints:
        check_int(getattr(config, name), name, 1)
    for name in non_negative_ints:
        check_int(getattr(config, name), name, 0)
    for name in positive_numbers:
        check_positive(getattr(config, name), name)


def check_sizes(value: object, what: str) -> "list[int]":
    """A non-empty list or tuple of ints (not bools) ``>= 1``, as a list."""
    sizes = list(value) if isinstance(value, (list, tuple)) else None
    if not sizes or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sizes):
        raise ValueError(f"Invalid {what}: {value!r} (needs a non-empty sequence of ints >= 1)")
    return sizes


def check_flag(value: object, what: str) -> bool:
    """A bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {what}: {value!r} (expected a bool)")
    return value


def check_lr(lr: object, owner: str) -> float:
    """Return ``lr`` as a float, or raise ``ValueError`` unless it is a finite number > 0."""
    try:
        return check_positive(lr, "lr")
    except ValueError:
        raise ValueError(f"Invalid lr: {lr!r} ({owner} needs a positive finite number)") from None


def strict_json(data: "str | bytes", constants: bool = False) -> Any:
    """``data`` parsed as strict JSON (RFC 8259), or a ``ValueError`` naming what breaks it:
    bytes must be UTF-8 without a byte-order mark (not UTF-16 or UTF-32, which ``json.loads``
    would guess), ``NaN`` and ``Infinity`` are refused (unless ``constants``: settings whose
    checks name the key that holds one), and so is an object that names a key twice
    (``json.loads`` keeps the last value and drops the others without a word; a reader in
    another language may keep the first), and so is a string holding half of a UTF-16
    surrogate pair (``"\\ud800"``: an escape can write one, but it is no Unicode text, and
    printing or encoding the string fails wherever it goes next)."""

    def refuse_constant(constant: str) -> float:
        if constants:
            return float(constant)
        raise ValueError(f"{constant} is not JSON")

    def refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:80]!r} in an object")
            seen[key] = value
        return seen

    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError
    if text.startswith("\ufeff"):
        raise ValueError("it starts with a byte-order mark (JSON is UTF-8 without one)")
    try:
        parsed = json.loads(
            text, parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # only an escape writes one (UTF-8 cannot)
        _refuse_surrogates(parsed)
    return parsed


#: A ``\u`` escape of a UTF-16 surrogate (paired or not), case-insensitive.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_surrogates(value: Any) -> None:
    """Raise ``ValueError`` quoting the first string (a key or a value) anywhere in the parsed
    JSON ``value`` that holds an unpaired surrogate (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"the string {item[:80]!r} holds an unpaired surrogate (not Unicode text)"
                ) from None
