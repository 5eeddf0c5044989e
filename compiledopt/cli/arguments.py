"""Argument types and helpers shared by the ``compiledopt`` commands."""

import argparse
import json
import math
from typing import List

__all__ = ["comma_list", "json_object", "positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """argparse type: a positive integer, or an error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
