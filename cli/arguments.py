"""argparse types shared by the commands of every part: a bad number is a usage error (exit 2) at parse time,
before any slow work. Imports nothing but argparse and math, so the device side may use it."""
from __future__ import annotations

import argparse
import math


def number(text: str, kind=float):
    """``text`` as an int or a finite float, else the usage error that says which was expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a finite number'}")
    return value


def _int_at_least(text: str, low: int) -> int:
    value = number(text, int)
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is less than {low}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    return _int_at_least(text, 0)


def map_level(text: str) -> float:
    """A level of the anomaly map, in (0, 1]."""
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1] (the map's range)")
    return value


def positive_float(text: str) -> float:
    """A finite number greater than 0."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not greater than 0")
    return value
