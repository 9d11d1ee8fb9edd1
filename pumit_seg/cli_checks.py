"""Command-line checks shared by every pumit tool: numeric options validated at parse time, clean errors.

``type=int_in_range(1, 64)`` makes argparse refuse ``-np 0`` with ``argument -np: must be an integer in
[1, 64], got 0`` (the option and the allowed range named, exit code 2) before any work starts.
`exit_on_bad_input` turns the errors that bad input raises (a damaged file, a missing case, a used output
folder) into one ``PROG: error: MESSAGE`` line and exit code 1 instead of a traceback.
`check_output_path` is what every command calls on its output paths before any work: an output that would
replace one of the command's inputs or a training run's own file, an existing output without ``--overwrite``,
and a path that cannot be written (under a regular file, in a read-only folder) are refused, naming the path.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "BAD_INPUT_ERRORS",
    "exit_on_bad_input",
    "float_in_range",
    "int_in_range",
    "check_allocation",
    "OutputPathError",
    "check_output_path",
    "RUN_FOLDER_MARKERS",
    "RUN_FILES",
]

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


class OutputPathError(ValueError):
    """An output path that must not or cannot be written (a ValueError: every command reports it in one line)."""


# A folder holding one of these is a training run's folder (pumit_pretrain tokenizer / mim, pumit_classify
# train, nnU-Net): another command's output must not take the name of one of the run's own files there, or
# the run could no longer resume, be scored or be exported.
RUN_FOLDER_MARKERS = (
    "checkpoint_last.pt",
    "checkpoint_state.pt",
    "checkpoint_last.safetensors",
    "checkpoint_final.pth",
    "checkpoint_latest.pth",
    "checkpoint_best.pth",
)
RUN_FILES = frozenset(
    {
        *RUN_FOLDER_MARKERS,
        "config.json",
        "log.csv",
        "val.csv",
        "loss_curves.png",
        "curves.png",
        "best_model.safetensors",
        "results.json",
        "tokenizer.safetensors",
        "encoder.safetensors",
        "model.safetensors",
        "debug.json",
        "progress.png",
        "plans.json",
        "dataset.json",
        "dataset_fingerprint.json",
    }
)


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner != outer and outer in inner.parents


def _existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists (as a file or a folder)."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def check_output_path(
    path: str | os.PathLike | None,
    *,
    is_dir: bool = False,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "-o",
    replaced: bool = False,
) -> Path:
    """Refuse (`OutputPathError`, naming `option` and `path`) an output that must not or cannot be written.

    Call it on every output path before any work is done. It refuses:

    * an output that is one of `inputs` (the same file or folder, links resolved), and with `is_dir` and
      `replaced` (a folder rebuilt as a whole) an output folder holding one of the inputs;
    * a file named like a training run's own file (`RUN_FILES`) in a run folder (`RUN_FOLDER_MARKERS`),
      whatever `overwrite` says;
    * a file where a folder is wanted and the other way round;
    * an existing file (or, with `is_dir`, a non-empty folder) unless `overwrite`; commands that continue
      their output folder (runs, stores) pass ``overwrite=True`` for it and check its content themselves;
    * a path that cannot be written: one lying under a regular file, or whose nearest existing folder (the
      parent of a file, or of a `replaced` folder, too) the user may not write.

    Returns the absolute path.
    """
    if path is None or os.fspath(path) == "":
        raise OutputPathError(f"{option}: no output path given")
    shown = f"{option} {os.fspath(path)}"
    target = Path(os.path.abspath(os.fspath(path)))
    for source in inputs:
        if source is None or os.fspath(source) == "":
            continue
        source = Path(os.path.abspath(os.fspath(source)))
        if _same_path(target, source):
            raise OutputPathError(f"{shown} is also an input of this command ({source}); choose another output")
        if is_dir and replaced and _inside(source, target):
            raise OutputPathError(
                f"{shown} would be replaced as a whole but holds the input {source}; choose another output"
            )
    if not is_dir and target.name in RUN_FILES:
        markers = [m for m in RUN_FOLDER_MARKERS if (target.parent / m).is_file()]
        if markers:
            raise OutputPathError(
                f"{shown} is a file of the training run in {target.parent} (it holds {markers[0]}); "
                "write the output elsewhere"
            )
    if os.path.lexists(target):
        if is_dir and not target.is_dir():
            raise OutputPathError(f"{shown} exists and is not a folder")
        if not is_dir and target.is_dir():
            raise OutputPathError(f"{shown} is a folder, not a file")
        if not overwrite:
            if not is_dir:
                raise OutputPathError(f"{shown} exists: pass --overwrite to replace it")
            if any(target.iterdir()):
                raise OutputPathError(f"{shown} exists and is not empty: pass --overwrite to replace it")
    folders = [_existing_ancestor(target if is_dir else target.parent)]
    if replaced or not is_dir:
        folders.append(_existing_ancestor(target.parent))
    for folder in folders:
        if not folder.is_dir():
            raise OutputPathError(f"{shown} cannot be created: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"{shown} cannot be written: the folder {folder} is not writable")
    return target


@contextmanager
def exit_on_bad_input(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Print ``PROG: error: MESSAGE`` and exit with code 1 on a `BAD_INPUT_ERRORS` error (no traceback)."""
    try:
        yield
    except BAD_INPUT_ERRORS as error:
        sys.stderr.write(f"{parser.prog}: error: {error}\n")
        sys.exit(BAD_INPUT_EXIT_CODE)
