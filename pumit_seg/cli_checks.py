"""Command-line checks shared by every pumit tool: numeric options validated at parse time, clean errors.

``type=int_in_range(1, 64)`` makes argparse refuse ``-np 0`` with ``argument -np: must be an integer in
[1, 64], got 0`` (the option and the allowed range named, exit code 2) before any work starts.
`exit_on_bad_input` turns the errors that bad input raises (a damaged file, a missing case, a used output
folder) into one ``PROG: error: MESSAGE`` line and exit code 1 instead of a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BAD_INPUT_ERRORS", "exit_on_bad_input", "float_in_range", "int_in_range", "check_allocation"]

# errors that mean "the input or the options are wrong", not "the program is wrong"
BAD_INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
BAD_INPUT_EXIT_CODE = 1


def _range_text(low, high, low_open: bool = False) -> str:
    right = f"{high}]" if high is not None else "inf)"
    return f"{'(' if low_open else '['}{low}, {right}"


def int_in_range(low: int, high: int | None = None):
    """argparse `type` accepting integers in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer in {_range_text(low, high)}, got {text!r}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer in {_range_text(low, high)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in_range(low: float, high: float | None = None, low_open: bool = False):
    """argparse `type` accepting finite floats in [low, high] ((low, high] with `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in {_range_text(low, high, low_open)}, got {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def check_allocation(num_bytes: int, limit_bytes: int, what: str, option: str) -> None:
    """Refuse (ValueError naming `option`) before allocating `num_bytes` when it exceeds `limit_bytes`."""
    if num_bytes > limit_bytes:
        raise ValueError(
            f"{what} would need {num_bytes / 2**30:.1f} GiB, more than the {limit_bytes / 2**30:.1f} GiB "
            f"allowed; reduce {option}"
        )


@contextmanager
def exit_on_bad_input(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Print ``PROG: error: MESSAGE`` and exit with code 1 on a `BAD_INPUT_ERRORS` error (no traceback)."""
    try:
        yield
    except BAD_INPUT_ERRORS as error:
        sys.stderr.write(f"{parser.prog}: error: {error}\n")
        sys.exit(BAD_INPUT_EXIT_CODE)
