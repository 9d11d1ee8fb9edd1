"""Atomic file writes: a file is either written whole or not at all, and what was there survives a failure.

Every writer in pumit-seg (weights, converted images, PNGs, JSON, zips, figures) goes through
`atomic_path`: the content is written to a temporary file beside the target, which then replaces the
target in one `os.replace`. The temporary name ends with the target's own name, so writers that pick
the format from the extension (SimpleITK's ``.nii.gz``, matplotlib, PIL) behave as for the target.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["atomic_path", "write_json_atomic"]


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, content, indent: int = 2) -> None:
    """Write `content` as JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=indent)
