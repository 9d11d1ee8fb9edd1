"""The pre-training image store: one chunked, compressed blosc2 array per image plus one metadata table.

Layout of a store folder (written by ``pumit_pretrain prepare``, `pumit_seg.data.prepare`)::

    STORE/store.json            format, version, the dataset config it was built from
    STORE/table.csv             one row per usable image (see `TABLE_COLUMNS`)
    STORE/report.csv            one row per unusable source file, with its reason
    STORE/images/<dataset>/<name>.<hash of the key>.b2nd    the image, (C, D, H, W), depth first
    STORE/parts/                per-part journals and tables (``--part K --num-parts N``), merged

Images hold values in [0, 1] quantised to integers: 8-bit sources (PNG / JPEG, RGB or grey) exactly as
their bytes (uint8, scale 255), everything else as uint16 (scale 65535, a step of 1.5e-5, far below any
image noise), which halves the size of float32 and compresses better. `PretrainStore.read` returns
float32 in [0, 1].

Arrays are opened memory-mapped (as nnU-Net's ``nnUNetDatasetBlosc2`` does) and sliced, so a random
crop decompresses only the blosc2 blocks it touches. Chunks are about one pre-training crop large and
blocks about 128 KiB (`chunk_and_block_shape`), the access pattern nnU-Net's ``comp_blosc2_params`` is
built for. Compression: ZSTD level 1 by default (see `ChunkConfig`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pumit_seg.atomic import atomic_path
from pumit_seg.models.anisotropy import (
    aniso_d_from_spacing,  # re-exported: the store's table uses the one rule
)

__all__ = [
    "TABLE_COLUMNS",
    "REPORT_COLUMNS",
    "StoreLayout",
    "ChunkConfig",
    "PretrainStore",
    "aniso_d_from_spacing",
    "chunk_and_block_shape",
    "write_image_array",
    "open_image_array",
    "read_table_csv",
]

STORE_FORMAT = "pumit-pretrain-store"
STORE_VERSION = 2  # 2: per-array source identity and settings, hashed array file names

# The CSV columns of table.csv, in order. `PretrainStore.table` adds `shape` (D, H, W) and `spacing`
# (d, h, w mm) tuples built from the per-axis columns.
TABLE_COLUMNS = (
    "key",  # unique name: "<dataset>/<path of the source inside the dataset folder>"
    "source",  # source file (or DICOM folder) as given to prepare
    "dataset",
    "modality",
    "channels",  # 1 (grey) or 3 (RGB); loaders replicate grey to 3 channels
    "shape_d",
    "shape_h",
    "shape_w",
    "spacing_d",  # mm; inf for 2D images (one slice, no neighbour: aniso_d 5)
    "spacing_h",
    "spacing_w",
    "aniso_d",
    "weight",  # sampling weight of the image: the dataset's weight / its number of training images
    "split",  # "train" or "val"
    "file",  # the array, relative to the store root
    "scale",  # integer value that stands for 1.0 (255 or 65535)
    "intensity",  # "percentile" (clipped to [low, high] of the source) or "divide" (by the type's maximum)
    "intensity_low",  # source value mapped to 0
    "intensity_high",  # source value mapped to 1
    "depth_axis",  # the source array axis (numpy z, y, x order) that became depth
    "depth_axis_from",  # "config", "metadata", "spacing" or "2D"
    "crop",  # foreground box in the depth-first source array, "d0:d1,h0:h1,w0:w1"
    "source_shape",  # depth-first source shape "D,H,W" before crop and resize
    "source_size",  # bytes and modification time of the source, to notice a changed file on rerun
    "source_mtime",
    "source_files",  # 1 for a file; "<count>:<hash of the names>" for a DICOM folder
    "settings",  # digest of the preprocessing settings the array was made with (store.json: settings)
)
REPORT_COLUMNS = ("source", "dataset", "reason", "message")


@dataclass(frozen=True)
class ChunkConfig:
    """How arrays are chunked (as nnU-Net: small blocks, chunks sized for the crops) and compressed."""

    crop_in_plane: int = 160  # the largest crop (MIM: 160 in-plane by 5 x (16 >> aniso_d) slices)
    crop_depth_units: int = 5
    patch_stride: int = 16  # tokenizer / ViT stride: crop depth = depth_units * max(16 >> aniso_d, 1)
    max_block_bytes: int = 128 * 1024  # as nnU-Net: small blocks, so a crop decompresses little extra
    max_chunk_bytes: int = 4 * 1024**2
    # ZSTD level 1 rather than nnU-Net's LZ4HC 5: on a CT volume about a third smaller and several times
    # faster to write; reading is somewhat slower but still far more than a loader worker needs besides its
    # augmentation (store read speed: benchmarks/results/store_crops_300x512x512.md)
    codec: str = "ZSTD"
    clevel: int = 1


def chunk_and_block_shape(
    shape_cdhw: tuple[int, int, int, int], aniso_d: int, itemsize: int, config: ChunkConfig = ChunkConfig()
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for a (C, D, H, W) array: a chunk is about one crop, a block at most 128 KiB.

    Channels stay together (a crop always reads all of them). Starting from the crop size clamped to
    the image, the largest axis (in bytes-weighted voxels) is halved until the byte cap holds.
    """
    c, d, h, w = (int(s) for s in shape_cdhw)
    crop_depth = 1 if d == 1 else config.crop_depth_units * max(config.patch_stride >> aniso_d, 1)
    chunk = [min(d, crop_depth), min(h, config.crop_in_plane), min(w, config.crop_in_plane)]

    def shrink(shape: list[int], max_bytes: int) -> list[int]:
        shape = list(shape)
        while c * math.prod(shape) * itemsize > max_bytes and max(shape) > 1:
            axis = int(np.argmax(shape))
            shape[axis] = (shape[axis] + 1) // 2
        return shape

    chunk = shrink(chunk, config.max_chunk_bytes)
    block = shrink(chunk, config.max_block_bytes)
    return (c, *chunk), (c, *block)


def write_image_array(
    path: str, array_cdhw: np.ndarray, aniso_d: int, config: ChunkConfig = ChunkConfig()
) -> None:
    """Write an integer (C, D, H, W) array as a blosc2 file, atomically."""
    import blosc2

    chunks, blocks = chunk_and_block_shape(array_cdhw.shape, aniso_d, array_cdhw.dtype.itemsize, config)
    cparams = {
        "codec": getattr(blosc2.Codec, config.codec),
        "clevel": config.clevel,
        "filters": [blosc2.Filter.SHUFFLE],
        "nthreads": 1,
    }
    with atomic_path(path) as tmp:
        blosc2.asarray(
            np.ascontiguousarray(array_cdhw), urlpath=tmp, chunks=chunks, blocks=blocks, cparams=cparams
        )


def open_image_array(path: str):
    """Open a stored array memory-mapped, read-only (a slice reads only the blocks it touches)."""
    import blosc2

    mmap = {} if os.name == "nt" else {"mmap_mode": "r"}  # nnU-Net: mmap does not work on Windows
    return blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, **mmap)


def read_table_csv(path: str) -> pd.DataFrame:
    """table.csv (or a part table) with compact dtypes: categories for repeated strings, small ints."""
    table = pd.read_csv(
        path,
        dtype={
            "key": str,
            "source": str,
            "file": str,
            "crop": str,
            "source_shape": str,
            "source_files": str,
            "settings": str,
            "channels": np.int8,
            "aniso_d": np.int8,
            "scale": np.int32,
            "depth_axis": np.int8,
        },
        keep_default_na=False,
        na_values=[""],
    )
    for column in ("dataset", "modality", "split", "intensity", "depth_axis_from"):
        if column in table:
            table[column] = table[column].astype("category")
    return table


class StoreLayout:
    """Paths inside a store folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.meta = os.path.join(self.root, "store.json")
        self.table = os.path.join(self.root, "table.csv")
        self.report = os.path.join(self.root, "report.csv")
        self.images = os.path.join(self.root, "images")
        self.parts = os.path.join(self.root, "parts")

    def image_file(self, key: str) -> str:
        """Relative path of an image's array: ``images/<dataset>/<readable name>.<hash of the key>.b2nd``.

        The hash makes names unique whatever characters keys hold and on case-insensitive file systems;
        the readable part keeps only letters, digits, '.', '_' and '-' (and at most 80 of them)."""
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        dataset, _, rest = key.partition("/")
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", rest.rstrip("/").replace("/", "__")).strip("._")[-80:]
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._")[:80] or "_"
        return f"images/{folder}/{readable or 'image'}.{digest}.b2nd"

    def part_stem(self, part: int, num_parts: int) -> str:
        return os.path.join(self.parts, f"part-{part}-of-{num_parts}")


class PretrainStore:
    """Read access to a store written by ``pumit_pretrain prepare``.

    `.table` is a DataFrame with one row per image (`TABLE_COLUMNS` plus `shape` and `spacing`
    tuples); `.read(key, slices)` returns float32 (C, d, h, w) in [0, 1] reading only the blocks the
    crop touches. Open arrays are cached per process (at most `max_open`), and the cache is dropped in
    a forked worker so no file handle is shared across processes.
    """

    def __init__(self, root: str | os.PathLike, max_open: int = 64):
        self.layout = StoreLayout(root)
        self.root = self.layout.root
        if not os.path.isfile(self.layout.table):
            raise FileNotFoundError(
                f"{self.layout.table}: no store table here; build the store with `pumit_pretrain prepare` "
                "(and `--merge` when it was built in parts)"
            )
        table = read_table_csv(self.layout.table)
        missing = [c for c in ("key", "shape_d", "spacing_d", "aniso_d", "split") if c not in table]
        if missing:
            raise ValueError(f"{self.layout.table}: not a store table, columns {missing} are missing")
        table["shape"] = list(zip(table.shape_d, table.shape_h, table.shape_w, strict=True))
        table["spacing"] = list(zip(table.spacing_d, table.spacing_h, table.spacing_w, strict=True))
        self.table = table.set_index("key", drop=False)
        self.max_open = max_open
        self._open: OrderedDict[str, object] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self):  # a store travels to DataLoader workers without its open arrays
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _array(self, key: str):
        if self._pid != os.getpid():
            self._open.clear()
            self._pid = os.getpid()
        array = self._open.get(key)
        if array is None:
            path = os.path.join(self.root, self.table.at[key, "file"])
            try:
                array = open_image_array(path)
            except Exception as error:  # noqa: BLE001 -- blosc2 raises several types for bad files
                raise OSError(f"{path}: cannot open the stored array of {key!r} ({error})") from error
            self._open[key] = array
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return array

    def read(self, key: str, slices: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Float32 (C, d, h, w) in [0, 1]: the crop `slices` (depth, height, width) of image `key`."""
        array = self._array(key)
        index = (slice(None),) + tuple(slices if slices is not None else (slice(None),) * 3)
        values = np.asarray(array[index])
        return values.astype(np.float32) / np.float32(self.table.at[key, "scale"])

    def keys(self, split: str | None = None) -> list[str]:
        table = self.table if split is None else self.table[self.table.split == split]
        return table.key.tolist()
