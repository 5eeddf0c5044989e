"""Text from an artifact made safe to print on a terminal.

An artifact's manifest is written by whoever made the artifact: its strings (parameter names,
state names, producer versions, training provenance, ...) may hold terminal control sequences.
Printed raw, ``\\x1b[2K\\r`` erases the line, ``\\x1b]...`` retitles the window, and a
right-to-left override reorders what follows, so an artifact could print a fake "signature
valid" line. :func:`printable` is the one place that turns such characters into visible
escapes: the summary of a manifest (:mod:`compiledopt.apps.inspect`) prints every string of the
artifact through it, and :class:`PrintableWriter` applies it to a whole output stream (the
``compiledopt`` command's).
"""

from typing import Any, TextIO

__all__ = ["PrintableWriter", "is_unsafe", "printable"]

#: Unicode "format" characters that change how the text around them is displayed: the bidi
#: embeddings, overrides and isolates, the directional marks, and the line/paragraph separators.
_FORMATTING = frozenset(
    [
        0x061C,
        0x200E,
        0x200F,
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),  # LRE, RLE, PDF, LRO, RLO
        *range(0x2066, 0x206A),  # LRI, RLI, FSI, PDI
    ]
)


def is_unsafe(character: str) -> bool:
    """Whether ``character`` (one code point) must not reach a terminal as it is: a C0 control
    (ESC, CR, LF, TAB, ...), DEL, a C1 control (U+0080 to U+009F, CSI among them), or a bidi or
    line-separating format character."""
    code = ord(character)
    return code < 0x20 or 0x7F <= code <= 0x9F or code in _FORMATTING


def _escape(character: str) -> str:
    code = ord(character)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(value: Any, keep_newlines: bool = False) -> str:
    """``str(value)`` with every unsafe character (:func:`is_unsafe`) written as a visible
    escape (``\\x1b``, ``\\x0d``, ``\\u202e``); with ``keep_newlines``, ``"\\n"`` is kept (for
    text of several lines). A backslash is left as it is: the result is for people to read, not
    to be parsed back."""
    text = value if isinstance(value, str) else str(value)
    if not any(is_unsafe(c) for c in text):
        return text
    return "".join(
        _escape(c) if is_unsafe(c) and not (keep_newlines and c == "\n") else c for c in text
    )


class PrintableWriter:
    """A text stream that writes to ``stream`` what it is given through :func:`printable`
    (newlines kept): the ``compiledopt`` commands write their whole output through it, so no
    string from an artifact reaches the terminal raw, whichever code path printed it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable(text, keep_newlines=True))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
