"""Argument types and helpers shared by the ``compiledopt`` commands."""

import argparse
import json
import math
from typing import List

__all__ = ["comma_list", "json_object", "non_negative_int", "positive_float", "positive_int"]


def _integer(text: str, minimum: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer, or an error naming the value."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0, or an error naming the value."""
    return _integer(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a positive finite number, or an error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def json_object(text: str) -> dict:
    """argparse type: a JSON object, or an error naming the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def comma_list(text: str) -> List[str]:
    """The non-empty items of a comma-separated list: ``"onnx,,aoti"`` -> ``["onnx", "aoti"]``."""
    return [item for item in text.split(",") if item]
