"""Atomic file writes: a file is either written whole or not at all, and what was there survives a failure.

Every writer in pumit-seg (weights, converted images, PNGs, JSON, zips, figures) goes through
`atomic_path`: the content is written to a temporary file beside the target, which then replaces the
target in one `os.replace`. The temporary name ends with the target's own name, so writers that pick
the format from the extension (SimpleITK's ``.nii.gz``, matplotlib, PIL) behave as for the target.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["atomic_path", "atomic_folder", "write_json_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write instead of `path`; on success it replaces `path`, else it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A fresh unique name that the writer creates itself, so the file gets the usual permissions
    # (mkstemp's would be private, 0600, and os.replace keeps them).
    tmp = os.path.join(directory, f".tmp_{os.getpid()}_{uuid.uuid4().hex[:8]}_{os.path.basename(path)}")
    try:
        yield tmp
        if os.path.isfile(tmp):
            # some writers (safetensors) create their file private (0600); give it the usual mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, content, indent: int = 2) -> None:
    """Write `content` as JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=indent)


def write_grey_png_atomic(path: str | os.PathLike, grey) -> None:
    """Write a 2D array as an 8-bit grey PNG (CHAOS ground truth and submissions), atomically."""
    import numpy as np
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").save(tmp, format="PNG")


def _hidden_sibling(path: str, tag: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}_{name}")


def _link_or_copy(source: str, target: str) -> None:
    # hard links are free and safe here: every writer replaces files (os.replace), never edits them in place
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def atomic_folder(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[str]:
    """Yield a temporary folder to build instead of the folder `path`; on success it replaces `path`.

    With `keep_existing` the temporary folder starts as a copy of `path` (hard links where possible), for
    tools that update part of a folder (e.g. add test cases to a dataset); otherwise it starts empty and
    nothing of the old folder survives. On an exception the temporary folder is removed and `path` is left
    exactly as it was. The swap is two renames (old aside, new in place) then the old one is deleted; only a
    crash between the two renames can leave `path` missing, with the old folder still beside it.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder")
    created = []  # parent folders made here, removed again on failure (a failed run leaves nothing)
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _hidden_sibling(path, "building")
    try:
        if keep_existing and os.path.isdir(path):
            shutil.copytree(path, tmp, copy_function=_link_or_copy, symlinks=True)
        else:
            os.makedirs(tmp)
        yield tmp
        if os.path.isdir(path):
            old = _hidden_sibling(path, "replaced")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
