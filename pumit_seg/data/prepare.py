"""`pumit_pretrain prepare`: folders of images -> a pre-training store (docs/store_format.md).

    pumit_pretrain prepare datasets.json -o STORE [--num-workers 8]
    pumit_pretrain prepare datasets.json -o STORE --part K --num-parts N    # one of N cluster jobs
    pumit_pretrain prepare datasets.json -o STORE --merge                  # after all parts

The dataset config (JSON) lists the datasets, images only, never labels::

    {"datasets": [
        {"name": "btcv", "path": "/data/BTCV/img", "modality": "CT", "weight": 1.0},
        {"name": "chest", "path": "xray", "modality": "XR", "include": ["**/*.png"]},
        {"name": "prostate", "path": "mr", "modality": "MR", "depth_axis": "z"}
    ]}

Per dataset: `name` (the key prefix), `path` (a folder, relative to the config file), `modality`
(a label; CT and MR are clipped to percentiles, see `intensity`), `weight` (sampling weight of the
whole dataset, default 1), optional `include` / `exclude` (glob patterns relative to `path`;
default: every image file), `exclude_dirs` (folder names never entered, compared in any case;
default: label folders such as labelsTr, labels, Ground, masks, Segmentation, gt), `depth_axis` ("x", "y" or "z": the file's axis that is the scan
direction, when the dataset's description says so) and `intensity` ("percentile" or "divide";
default: "divide" for 8-bit images, "percentile" for the rest).

Image files: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, ``.mgz``, ``.mgh``,
``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``; a folder holding DICOM files (``*.dcm``,
or files starting with the DICOM marker) is a DICOM folder, one image per series in it (slices ordered
by position along the slice normal; a missing slice or uneven spacing is reported, never averaged) and
one per multi-frame file. Label folders are not entered, files of no image type not taken, and images
whose voxels take only a few integer values (label maps) not stored: all of them are listed in the
report. A dataset that yields no image file is an error; one whose images are all unusable is named in
the summary.

Keys are ``<dataset>/<path inside the dataset folder>`` (a DICOM folder's images add
``series-<SeriesInstanceUID>`` or the multi-frame file's name), unique for any config; arrays are stored
under names made of a readable part and a hash of the key (`StoreLayout.image_file`).

Per image (docs/store_format.md, "Preprocessing of one image"): read (`pumit_seg.data.readers`: truncated, non-finite, 4D, no spacing refused);
depth axis from the config, else the metadata (DICOM: the slice stack; NIfTI: ``slice_dim``), else
the axis whose spacing differs most from the other two; moved first; crop to the box above 0
("divide") or above the 0.5 percentile ("percentile"); shorter in-plane side above 512 resized to 512
by area interpolation; intensities clipped to [p0.5, p99.5] and scaled to [0, 1], or divided by the
type's maximum. 2D images get depth spacing inf, hence aniso_d 5.

Work is journaled per part (``parts/part-K-of-N.jsonl``), each record naming its source (path, size,
modification time, files of a DICOM folder) and the settings it was prepared with, so a rerun skips every
source already done, prepares again a source that changed, and a killed run continues. A rerun with
other settings (store.json's, or a dataset's modality / depth_axis / intensity) is refused with the
differences named, unless ``--reprocess``, which prepares those arrays again; parts prepared with
different settings are never merged. When every part has finished, the table
(``table.csv``), the report of what is not in the table (``report.csv``) and a picture of the store
(``overview.png``: one slice per dataset, images per aniso_d) are merged, the held-out images
chosen (one per dataset and modality, by a hash of the key, for datasets of at least two images) and
the sampling weights set (the dataset's weight shared by its images).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.cli_checks import check_output_path
from pumit_seg.data.store import (
    REPORT_COLUMNS,
    STORE_FORMAT,
    STORE_VERSION,
    TABLE_COLUMNS,
    ChunkConfig,
    StoreLayout,
    write_image_array,
)
from pumit_seg.models.anisotropy import aniso_d_from_spacing

__all__ = [
    "DatasetSpec",
    "PrepareConfig",
    "SourceItem",
    "PreparedImage",
    "UnusableImage",
    "load_dataset_config",
    "discover_items",
    "preprocess_array",
    "prepare_store",
    "merge_parts",
    "write_overview",
    "add_arguments",
    "run",
]

SITK_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSION = ".dcm"
# folders of label maps, never images (compared case-insensitively): nnU-Net, CHAOS, common layouts
DEFAULT_EXCLUDE_DIRS = (
    "labelsTr",
    "labelsTs",
    "labels",
    "label",
    "Ground",
    "GroundTruth",
    "ground_truth",
    "gt",
    "masks",
    "mask",
    "segmentation",
    "segmentations",
    "seg",
    "segs",
    "annotations",
)
# an image whose voxels take at most this many distinct integer values is a label map, not an image
LABEL_MAP_MAX_VALUES = 16
LABEL_MAP_SAMPLE = 200_000  # voxels looked at first: more distinct values there rules a label map out
# bump when a change of the processing makes arrays prepared before it differ: they are then redone
PREPARE_VERSION = 2
# settings of PrepareConfig that shape a stored array, and the flags that set them
SETTING_FLAGS = {
    "foreground_percentile": "--foreground-percentile",
    "clip_percentiles": "--clip-percentiles",
    "max_in_plane": "--max-in-plane",
    "min_in_plane": "--min-in-plane",
    "isotropic_tolerance": "isotropic_tolerance",
    "chunks": "--codec / --clevel",
    "prepare_version": "the pumit-seg version's preprocessing",
}
DATASET_SETTINGS = ("modality", "depth_axis", "intensity")  # per dataset, from the config file
AXIS_NAMES = {"x": 2, "y": 1, "z": 0}  # file axis name -> numpy axis (SimpleITK's z, y, x array order)
INTENSITY_MODES = ("percentile", "divide")


class ConfigError(ValueError):
    """A dataset config that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the config file (see the module doc)."""

    name: str
    path: str
    modality: str
    weight: float = 1.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS
    depth_axis: str | None = None
    intensity: str | None = None


@dataclass
class PrepareConfig:
    """Preprocessing numbers of docs/store_format.md (each one a flag of `pumit_pretrain prepare`)."""

    foreground_percentile: float = 0.5  # non-8-bit images: crop to the box above this percentile
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # intensity window of "percentile" images
    max_in_plane: int = 512  # the shorter in-plane side is resized to this when larger (area)
    min_in_plane: int = 16  # images whose shorter in-plane side is smaller after the crop are unusable
    isotropic_tolerance: float = 1.05  # spacings within this ratio: no axis stands out, keep the file's z
    val_per_dataset: int = 1  # held-out images per dataset and modality (datasets of >= 2 images)
    chunks: ChunkConfig = field(default_factory=ChunkConfig)


@dataclass(frozen=True)
class SourceItem:
    """One source: an image file, or a DICOM folder (which may hold several series).

    Its key, ``<dataset>/<relative>``, is unique in a config: dataset names are unique and hold no "/",
    an image file's relative path ends in its image extension, a DICOM folder's in "/" (``<dataset>/``
    for the dataset folder itself), and the images of a DICOM folder add ``series-<SeriesInstanceUID>``
    (no extension) or the name of a multi-frame file (``.dcm``, never an image extension of a file key)."""

    dataset: str
    path: str  # absolute
    relative: str  # inside the dataset folder, "/"-separated; DICOM folders end in "/" ("" at the top)
    kind: str  # "sitk", "pil" or "dicom"
    files: tuple[str, ...] = ()  # DICOM folders: the DICOM file names in it

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.relative}"


@dataclass(frozen=True)
class SkippedSource:
    """A path the discovery saw and did not take as an image: it goes to the report with its reason."""

    dataset: str
    path: str
    reason: str  # "label folder" or "not an image file"
    message: str


@dataclass
class PreparedImage:
    array: np.ndarray  # (C, D, H, W) uint8 or uint16
    spacing: tuple[float, float, float]
    scale: int
    intensity: str
    intensity_low: float
    intensity_high: float
    depth_axis: int
    depth_axis_from: str
    crop: tuple[tuple[int, int], ...]
    source_shape: tuple[int, int, int]


class UnusableImage(ValueError):
    """An image that cannot go into the store; `reason` is a short keyword for the report."""

    def __init__(self, path: str, reason: str, problem: str):
        self.path, self.reason, self.problem = path, reason, problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.problem))


# --------------------------------------------------------------------------------------- config


def load_dataset_config(path: str) -> list[DatasetSpec]:
    """Parse and check the dataset config; every error names the file and the dataset entry."""
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: dataset config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    entries = content.get("datasets") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{path}: expected {{"datasets": [ ... ]}} with at least one dataset')
    base = os.path.dirname(os.path.abspath(path))
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    specs, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not an object")
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
        for required in ("name", "path", "modality"):
            if not isinstance(entry.get(required), str) or not entry[required]:
                raise ConfigError(f"{where}: {required!r} (a non-empty string) is required")
        name = entry["name"]
        where = f"{path}: dataset {name!r}"
        if name in names:
            raise ConfigError(f"{where}: the name is used twice")
        if "/" in name or name.startswith("."):
            raise ConfigError(f"{where}: the name must not contain '/' or start with '.'")
        names.add(name)
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}: weight must be a positive number, got {weight!r}")
        depth_axis = entry.get("depth_axis")
        if depth_axis is not None and depth_axis not in AXIS_NAMES:
            raise ConfigError(f"{where}: depth_axis must be one of {sorted(AXIS_NAMES)}, got {depth_axis!r}")
        intensity = entry.get("intensity")
        if intensity is not None and intensity not in INTENSITY_MODES:
            raise ConfigError(f"{where}: intensity must be one of {INTENSITY_MODES}, got {intensity!r}")
        folder = os.path.join(base, os.path.expanduser(entry["path"]))
        if not os.path.isdir(folder):
            raise ConfigError(f"{where}: folder {folder} does not exist")
        patterns = {}
        for key in ("include", "exclude", "exclude_dirs"):
            value = entry.get(key, DEFAULT_EXCLUDE_DIRS if key == "exclude_dirs" else ())
            if isinstance(value, str):
                value = [value]
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key} must be a list of strings")
            patterns[key] = tuple(value)
        specs.append(
            DatasetSpec(
                name=name,
                path=os.path.normpath(folder),
                modality=entry["modality"],
                weight=float(weight),
                depth_axis=depth_axis,
                intensity=intensity,
                **patterns,
            )
        )
    return specs


def _kind_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(SITK_EXTENSIONS):
        return "sitk"
    if lower.endswith(PIL_EXTENSIONS):
        return "pil"
    return None


def _is_label_folder(name: str, exclude_dirs: tuple[str, ...]) -> bool:
    return name.casefold() in {d.casefold() for d in exclude_dirs}


def discover_items(spec: DatasetSpec, skipped: list[SkippedSource] | None = None) -> list[SourceItem]:
    """Every image file and DICOM folder of a dataset, sorted (the order parts are assigned in).

    Label folders (`DatasetSpec.exclude_dirs`, any case) are not entered, and files of no image type are
    not taken; both are appended to `skipped` (for the report). Hidden files and folders are ignored, and
    so are files the dataset's include / exclude patterns leave out. A file without an image extension
    that starts like DICOM (the "DICM" marker) counts as a DICOM file of its folder."""
    from pumit_seg.data.readers import is_dicom_file

    items = []
    skipped = [] if skipped is None else skipped
    for folder, dirs, files in os.walk(spec.path):
        entered = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            if _is_label_folder(d, spec.exclude_dirs):
                skipped.append(
                    SkippedSource(
                        spec.name,
                        os.path.join(folder, d),
                        "label folder",
                        f"{os.path.join(folder, d)}: a folder of label maps (named {d!r}), not images: not entered",
                    )
                )
            else:
                entered.append(d)
        dirs[:] = entered
        relative_folder = os.path.relpath(folder, spec.path).replace(os.sep, "/")
        relative_folder = "" if relative_folder == "." else relative_folder + "/"
        dicom_files = []
        # a DICOM series is one image: its files are selected by their folder's path, other files by their own
        folder_selected = _selected(spec, relative_folder.rstrip("/") or ".")
        for name in sorted(files):
            if name.startswith("."):
                continue
            relative = relative_folder + name
            kind = _kind_of(name)
            if kind:
                if _selected(spec, relative):
                    items.append(SourceItem(spec.name, os.path.join(folder, name), relative, kind))
            elif name.lower().endswith(DICOM_EXTENSION) or is_dicom_file(os.path.join(folder, name)):
                if folder_selected:
                    dicom_files.append(name)
            elif _selected(spec, relative):
                skipped.append(
                    SkippedSource(
                        spec.name,
                        os.path.join(folder, name),
                        "not an image file",
                        f"{os.path.join(folder, name)}: not an image file (no known image extension, "
                        "not DICOM): left out",
                    )
                )
        if dicom_files:
            items.append(SourceItem(spec.name, folder, relative_folder, "dicom", tuple(dicom_files)))
    return sorted(items, key=lambda item: item.relative)


def _selected(spec: DatasetSpec, relative: str) -> bool:
    def matches(patterns):
        # "**/" also matches no folder at all, as in glob's recursive patterns
        return any(
            fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(relative, p.replace("**/", "")) for p in patterns
        )

    return (not spec.include or matches(spec.include)) and not matches(spec.exclude)


# ------------------------------------------------------------------------------------- reading


@dataclass
class _Source:
    array: np.ndarray  # (C, z, y, x) in the file's numpy axis order; 2D as (C, 1, y, x)
    spacing: tuple[float, float, float]  # per array axis; inf for the depth of 2D images
    two_d: bool
    metadata_depth_axis: int | None  # what the file's metadata says the scan axis is
    eight_bit: bool
    path: str


def _as_channels_first(array: np.ndarray, num_channels: int, path: str) -> np.ndarray:
    """Spatial (+ trailing channels) -> (C, ...); RGBA and grey+alpha lose alpha, other counts refused."""
    if num_channels == 1:
        return array[None]
    if num_channels in (2, 4):  # grey + alpha, RGBA: the alpha channel is not image content
        array = array[..., : num_channels - 1]
        num_channels -= 1
    if num_channels == 1:
        return np.moveaxis(array, -1, 0)
    if num_channels != 3:
        raise UnusableImage(
            path, "unsupported channels", f"{num_channels} channels per pixel; grey or RGB expected"
        )
    return np.moveaxis(array, -1, 0)


def _nifti_slice_axis(image) -> int | None:
    """The numpy axis NIfTI's ``dim_info`` names as the slice direction (slice_dim 1..3 = i, j, k)."""
    try:
        dim_info = int(image.GetMetaData("dim_info"))
    except (RuntimeError, ValueError):
        return None
    slice_dim = (dim_info >> 4) & 3
    return 3 - slice_dim if slice_dim else None


def _read_file(item: SourceItem) -> _Source:
    from pumit_seg.data.readers import read_image, read_png

    if item.kind == "pil":
        array = read_png(item.path)
        channels = array.shape[2] if array.ndim == 3 else 1
        return _Source(
            _as_channels_first(array, channels, item.path)[:, None],
            (math.inf, 1.0, 1.0),
            True,
            None,
            array.dtype == np.uint8,
            item.path,
        )
    image = read_image(item.path)
    spatial = len(image.spacing)
    array = _as_channels_first(image.array, image.num_channels, item.path)
    spacing = tuple(float(s) for s in image.spacing)
    if spatial == 2:
        array, spacing = array[:, None], (math.inf, *spacing)
    metadata_axis = (
        _nifti_slice_axis(image.sitk_image) if item.path.lower().endswith((".nii", ".nii.gz")) else None
    )
    two_d = min(array.shape[1:]) == 1  # a single slice (in any axis) is a 2D image
    return _Source(array, spacing, two_d, metadata_axis, image.array.dtype == np.uint8, item.path)


def _series_token(uid: str) -> str:
    """The key part of a DICOM series: ``series-<UID>`` (a UID is digits and dots), else a hash of it."""
    if uid and len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid):
        return f"series-{uid}"
    return f"series-h{hashlib.sha1(uid.encode()).hexdigest()[:16]}"


def _dicom_images(item: SourceItem) -> list[tuple[str, list[str]]]:
    """(key, files) per image of a DICOM folder: one per series of one-slice files (ordered along the
    slice normal), one per multi-frame file."""
    from pumit_seg.data.readers import dicom_folder_series

    images = []
    for series in dicom_folder_series(item.path, list(item.files)):
        suffix = series.files[0] if series.multiframe else _series_token(series.uid)
        images.append((item.key + suffix, series.files))
    return images


def _read_dicom(folder: str, files: list[str]) -> _Source:
    from pumit_seg.data.readers import read_dicom_series

    image = read_dicom_series(folder, files)
    two_d = image.array.shape[0] == 1
    spacing = (math.inf, *image.spacing[1:]) if two_d else tuple(image.spacing)
    return _Source(image.array[None], spacing, two_d, 0, False, folder)


def _check_not_label_map(source: _Source) -> None:
    """Refuse an image whose voxels take only a few distinct integer values: a label map, not an image."""
    array = source.array
    if not (
        np.issubdtype(array.dtype, np.integer) or np.array_equal(array[..., :1], np.rint(array[..., :1]))
    ):
        return
    flat = array.reshape(-1)
    if flat.size > LABEL_MAP_SAMPLE:
        sample = flat[np.random.default_rng(0).integers(0, flat.size, LABEL_MAP_SAMPLE)]
        if len(np.unique(sample)) > LABEL_MAP_MAX_VALUES:
            return
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(flat, np.rint(flat)):
        return
    values = np.unique(flat)
    if 2 <= len(values) <= LABEL_MAP_MAX_VALUES:
        shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (", ..." if len(values) > 8 else "")
        raise UnusableImage(
            source.path,
            "label map",
            f"looks like a label map, not an image: only {len(values)} distinct integer values ({shown}); "
            "keep label maps out of the dataset folder (or in a folder named labels / masks / segmentation)",
        )


# --------------------------------------------------------------------------------- preprocessing


def _depth_axis(source: _Source, given: str | None, tolerance: float) -> tuple[int, str]:
    if source.two_d:
        return int(np.argmin(source.array.shape[1:])), "2D"
    if given is not None:
        return AXIS_NAMES[given], "config"
    if source.metadata_depth_axis is not None:
        return source.metadata_depth_axis, "metadata"
    log_spacing = np.log(np.asarray(source.spacing, dtype=float))
    if log_spacing.max() - log_spacing.min() <= math.log(tolerance):
        return 0, "spacing"  # isotropic: nothing stands out, keep the file's own slice axis
    others = [(log_spacing.sum() - s) / 2 for s in log_spacing]
    return int(np.argmax(np.abs(log_spacing - others))), "spacing"


def _area_resize(array: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(C, D, H, W) float32 -> (C, D, h, w) by area interpolation (each output pixel the mean of its area)."""
    import torch
    import torch.nn.functional as F

    c, d = array.shape[:2]
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(
            c * d, 1, *array.shape[2:]
        )
        resized = F.interpolate(tensor, size=size_hw, mode="area")
    return resized.reshape(c, d, *size_hw).numpy()


def preprocess_array(
    source: _Source, config: PrepareConfig, depth_axis_given: str | None = None, intensity: str | None = None
) -> PreparedImage:
    """Preprocess one read image: depth first, foreground crop, in-plane downsizing, intensity scaling."""
    path = source.path
    axis, axis_from = _depth_axis(source, depth_axis_given, config.isotropic_tolerance)
    array = np.moveaxis(source.array, 1 + axis, 1)
    spacing = list(source.spacing)
    spacing.insert(0, spacing.pop(axis))
    if source.two_d:
        spacing[0] = math.inf  # one slice has no depth neighbour: aniso_d 5 whatever the slice thickness
    source_shape = tuple(int(s) for s in array.shape[1:])
    mode = intensity or ("divide" if source.eight_bit else "percentile")
    if mode == "divide" and not np.issubdtype(array.dtype, np.integer):
        raise UnusableImage(
            path, "unsupported type", f"intensity 'divide' needs integer pixels, got {array.dtype}"
        )

    threshold = 0 if mode == "divide" else np.percentile(array, config.foreground_percentile)
    foreground = (array > threshold).any(axis=0)
    if not foreground.any():
        raise UnusableImage(
            path, "empty after crop", f"no voxel above {threshold:g}: nothing left after the foreground crop"
        )
    crop = []
    for ax in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != ax)))
        crop.append((int(present[0]), int(present[-1]) + 1))
    array = array[(slice(None), *(slice(a, b) for a, b in crop))]
    height, width = array.shape[2:]
    if min(height, width) < config.min_in_plane:
        raise UnusableImage(
            path,
            "too small",
            f"{height}x{width} pixels in-plane after the foreground crop; at least {config.min_in_plane} needed",
        )

    short = min(height, width)
    if short > config.max_in_plane:
        factor = config.max_in_plane / short
        size = (max(round(height * factor), 1), max(round(width * factor), 1))
        spacing[1] *= height / size[0]
        spacing[2] *= width / size[1]
        array = _area_resize(array, size)

    if mode == "divide":
        maximum = 255 if source.eight_bit else int(np.iinfo(source.array.dtype).max)
        low, high = 0.0, float(maximum)
        if source.eight_bit:
            stored, scale = np.clip(np.round(array), 0, 255).astype(np.uint8), 255
        else:
            stored, scale = _quantise(np.asarray(array, np.float32) / np.float32(maximum)), 65535
    else:
        low, high = (float(v) for v in np.percentile(array, config.clip_percentiles))
        if not high > low:
            raise UnusableImage(
                path, "constant", f"intensity window [{low:g}, {high:g}] is empty: the image is constant"
            )
        stored, scale = (
            _quantise((np.asarray(array, np.float32) - np.float32(low)) / np.float32(high - low)),
            65535,
        )
    return PreparedImage(
        array=stored,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        scale=scale,
        intensity=mode,
        intensity_low=low,
        intensity_high=high,
        depth_axis=axis,
        depth_axis_from=axis_from,
        crop=tuple(crop),
        source_shape=source_shape,
    )


def _quantise(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 65535).astype(np.uint16)


# ----------------------------------------------------------------------------------------- work


def _source_stamp(item: SourceItem) -> dict:
    """Identity of a source as prepared: bytes, modification time and number of files (summed / the
    latest over a DICOM folder's files, whose names are hashed in too)."""
    if item.kind == "dicom":
        stats = [os.stat(os.path.join(item.path, n)) for n in item.files]
        names = hashlib.sha1("\n".join(item.files).encode()).hexdigest()[:16]
        return {
            "source_size": sum(s.st_size for s in stats),
            "source_mtime": max((s.st_mtime for s in stats), default=0.0),
            "source_files": f"{len(stats)}:{names}",
        }
    stat = os.stat(item.path)
    return {"source_size": stat.st_size, "source_mtime": stat.st_mtime, "source_files": "1"}


def store_settings(config: PrepareConfig) -> dict:
    """The settings of a run that shape every stored array (store.json's ``settings``)."""
    return {
        "prepare_version": PREPARE_VERSION,
        "foreground_percentile": float(config.foreground_percentile),
        "clip_percentiles": [float(v) for v in config.clip_percentiles],
        "max_in_plane": int(config.max_in_plane),
        "min_in_plane": int(config.min_in_plane),
        "isotropic_tolerance": float(config.isotropic_tolerance),
        "chunks": dataclasses.asdict(config.chunks),
    }


def image_settings(settings: dict, spec: DatasetSpec) -> dict:
    """The settings one stored array was prepared with: the run's and its dataset's (modality, axes)."""
    return settings | {name: getattr(spec, name) for name in DATASET_SETTINGS}


def settings_digest(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _describe_differences(old: dict | None, new: dict) -> str:
    if not old:
        return "settings not recorded (prepared by an older pumit-seg)"
    changes = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            flag = SETTING_FLAGS.get(name, f"dataset {name}")
            changes.append(f"{flag}: {old.get(name)!r} then, {new.get(name)!r} now")
    return "; ".join(changes)


def process_item(
    item: SourceItem, spec: DatasetSpec, root: str, config: PrepareConfig, settings: dict | None = None
) -> list[dict]:
    """Read, preprocess and store one source; one journal record per image (or one failure).

    Every record names its source (path, size, modification time) and the settings it was prepared with."""
    from pumit_seg.data.readers import ImageReadError

    settings = image_settings(settings or store_settings(config), spec)
    stamp = {
        "item": item.key,
        "source": item.path,
        "dataset": item.dataset,
        **_source_stamp(item),
        "settings": settings_digest(settings),
        "settings_used": settings,
    }
    layout = StoreLayout(root)

    def failure(error: Exception, key: str) -> dict:
        if isinstance(error, ImageReadError | UnusableImage):
            reason, message = error.reason, str(error)
        else:  # one bad file must not stop the rest: report it
            reason, message = "unreadable", f"{item.path}: {type(error).__name__}: {error}"
        return stamp | {"type": "failure", "key": key, "reason": reason, "message": message}

    def image_record(key: str, load) -> dict:
        source = load()
        _check_not_label_map(source)
        prepared = preprocess_array(source, config, spec.depth_axis, spec.intensity)
        aniso_d = aniso_d_from_spacing(prepared.spacing)
        file = layout.image_file(key)
        write_image_array(os.path.join(root, file), prepared.array, aniso_d, config.chunks)
        c, d, h, w = prepared.array.shape
        return stamp | {
            "type": "image",
            "key": key,
            "modality": spec.modality,
            "channels": c,
            "shape_d": d,
            "shape_h": h,
            "shape_w": w,
            "spacing_d": prepared.spacing[0],
            "spacing_h": prepared.spacing[1],
            "spacing_w": prepared.spacing[2],
            "aniso_d": aniso_d,
            "file": file,
            "scale": prepared.scale,
            "intensity": prepared.intensity,
            "intensity_low": prepared.intensity_low,
            "intensity_high": prepared.intensity_high,
            "depth_axis": prepared.depth_axis,
            "depth_axis_from": prepared.depth_axis_from,
            "crop": ",".join(f"{a}:{b}" for a, b in prepared.crop),
            "source_shape": ",".join(str(s) for s in prepared.source_shape),
        }

    try:
        if item.kind == "dicom":
            loads = [
                (key, lambda files=files: _read_dicom(item.path, files)) for key, files in _dicom_images(item)
            ]
        else:
            loads = [(item.key, lambda: _read_file(item))]
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 -- the folder's headers: reported, the rest goes on
        return [failure(error, item.key)]
    # each image of a folder on its own: a bad series (a scout, a gap) does not lose the good ones
    records = []
    for key, load in loads:
        try:
            records.append(image_record(key, load))
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 -- reported in report.csv with its reason
            records.append(failure(error, key))
    return records


def _read_journals(layout: StoreLayout) -> dict[str, list[dict]]:
    """source key -> its records (the latest run of it), from every part journal (any --num-parts); a
    torn last line is ignored. Records of an older store without a source key are filed by path."""
    by_source: dict[str, list[dict]] = {}
    if not os.path.isdir(layout.parts):
        return by_source
    for name in sorted(os.listdir(layout.parts)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(layout.parts, name)) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                batch = record.get("batch")
                if isinstance(batch, list) and batch:
                    first = batch[0]
                    by_source[first.get("item", "path:" + str(first.get("source")))] = batch
    return by_source


def _state(
    records: list[dict] | None, item: SourceItem, root: str, expected: dict, retry_failed: bool
) -> str:
    """ "done", "new" (never prepared), "changed" (the source changed since), "settings" (prepared with
    other settings), "retry" (a failure to try again) or "lost" (an array file is missing)."""
    if not records:
        return "new"
    first = records[0]
    stamp = _source_stamp(item)
    if any(first.get(k) != v for k, v in stamp.items()):
        return "changed"
    if first.get("settings_used") != expected:
        return "settings"
    images = [r for r in records if r["type"] == "image"]
    if not all(os.path.isfile(os.path.join(root, r["file"])) for r in images):
        return "lost"
    if len(images) < len(records):
        return "retry" if retry_failed else "done"
    return "done"


def _read_meta(layout: StoreLayout) -> dict | None:
    if not os.path.isfile(layout.meta):
        return None
    with open(layout.meta) as f:
        return json.load(f)


def _check_store_folder(layout: StoreLayout) -> None:
    if os.path.isdir(layout.root) and os.listdir(layout.root) and not os.path.isfile(layout.meta):
        raise ConfigError(
            f"{layout.root}: the output folder is not empty and is not a pre-training store (no store.json); "
            "choose an empty or new folder"
        )
    if os.path.isfile(layout.meta):
        try:
            meta = _read_meta(layout)
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"{layout.meta}: unreadable store description ({error})") from None
        if meta.get("format") != STORE_FORMAT:
            raise ConfigError(f"{layout.meta}: not a {STORE_FORMAT} (format {meta.get('format')!r})")


def _all_items(specs: list[DatasetSpec], skipped: list[SkippedSource] | None = None) -> list[SourceItem]:
    """Every source of the config; a dataset that yields none is a ConfigError (what was seen is named)."""
    items = []
    for spec in specs:
        seen: list[SkippedSource] = []
        found = discover_items(spec, seen)
        if not found:
            what = "; ".join(
                f"{sum(s.reason == r for s in seen)} {r}(s)" for r in sorted({s.reason for s in seen})
            )
            raise ConfigError(
                f"dataset {spec.name!r}: no image file in {spec.path}"
                + (f" ({what}, e.g. {seen[0].path})" if seen else " (the folder holds no file it may use)")
                + "; fix its path / include patterns or remove the dataset from the config"
            )
        items += found
        if skipped is not None:
            skipped += seen
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):  # cannot happen by construction; refuse rather than overwrite
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"sources with the same key: {duplicated[:5]}")
    return items


def prepare_store(
    config_path: str,
    output: str,
    *,
    config: PrepareConfig | None = None,
    part: int = 0,
    num_parts: int = 1,
    num_workers: int = 0,
    retry_failed: bool = False,
    reprocess: bool = False,
    merge: bool = True,
    progress: bool = True,
) -> dict:
    """Process part `part` of `num_parts` of the sources in `config_path` into the store `output`.

    Sources already done (journaled with this run's settings, unchanged, array present) are skipped; a
    source that changed since (size, modification time, files of a DICOM folder) is prepared again. A
    store prepared with other settings (store.json, or any of this part's arrays) is refused with a
    ConfigError naming the differences, before anything is written, unless `reprocess`: then every
    array of other settings is prepared again. With `merge`, the table and the report are merged as soon
    as every part has finished. Returns a summary dict.
    """
    from tqdm.auto import tqdm

    config = config or PrepareConfig()
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in 0..{num_parts - 1} (--num-parts {num_parts}), got {part}")
    specs = load_dataset_config(config_path)
    layout = StoreLayout(output)
    _check_store_folder(layout)
    items = _all_items(specs)
    settings = store_settings(config)
    meta = _read_meta(layout)
    if meta is not None and meta.get("settings") != settings and not reprocess:
        raise ConfigError(
            f"{layout.root}: the store was prepared with other settings "
            f"({_describe_differences(meta.get('settings'), settings)}); prepare into a new folder, or pass "
            "--reprocess to prepare every image again with this run's settings"
        )
    by_name = {s.name: s for s in specs}
    mine = [item for i, item in enumerate(items) if i % num_parts == part]
    journal = _read_journals(layout)
    states = {
        item.key: _state(
            journal.get(item.key),
            item,
            layout.root,
            image_settings(settings, by_name[item.dataset]),
            retry_failed,
        )
        for item in mine
    }
    other = [item for item in mine if states[item.key] == "settings"]
    if other and not reprocess:
        first = other[0]
        raise ConfigError(
            f"{layout.root}: {len(other)} source(s) were prepared with other settings (first: {first.key}: "
            + _describe_differences(
                journal[first.key][0].get("settings_used"), image_settings(settings, by_name[first.dataset])
            )
            + "); prepare into a new folder, or pass --reprocess to prepare them again"
        )
    os.makedirs(layout.parts, exist_ok=True)
    write_json_atomic(
        layout.meta,
        {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "dataset_config": os.path.abspath(config_path),
            "datasets": [dataclasses.asdict(s) for s in specs],
            "prepare": dataclasses.asdict(config),
            "settings": settings,
        },
    )
    todo = [item for item in mine if states[item.key] != "done"]
    stem = layout.part_stem(part, num_parts)
    if os.path.exists(stem + ".done.json"):
        os.remove(stem + ".done.json")
    failures = 0
    with (
        open(stem + ".jsonl", "a") as journal_file,
        tqdm(
            total=len(todo), desc=f"prepare part {part}/{num_parts}", unit="img", disable=not progress
        ) as bar,
    ):

        def record(records: list[dict]) -> None:
            nonlocal failures
            failures += any(r["type"] == "failure" for r in records)
            journal_file.write(json.dumps({"batch": records}) + "\n")
            journal_file.flush()
            bar.update(1)
            bar.set_postfix(unusable=failures)

        if num_workers > 0 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                futures = [
                    pool.submit(process_item, item, by_name[item.dataset], layout.root, config, settings)
                    for item in todo
                ]
                for future in as_completed(futures):
                    record(future.result())
        else:
            for item in todo:
                record(process_item(item, by_name[item.dataset], layout.root, config, settings))
    write_json_atomic(stem + ".done.json", {"part": part, "num_parts": num_parts, "sources": len(mine)})
    counts = {state: sum(s == state for s in states.values()) for state in ("changed", "settings", "lost")}
    summary = {
        "sources": len(mine),
        "processed": len(todo),
        "skipped": len(mine) - len(todo),
        "changed_sources": counts["changed"],
        "reprocessed_settings": counts["settings"],
        "unusable_new": failures,
    }
    done_parts = [
        p for p in range(num_parts) if os.path.exists(layout.part_stem(p, num_parts) + ".done.json")
    ]
    summary["merged"] = False
    if merge and len(done_parts) == num_parts:
        summary |= merge_parts(config_path, output, config=config)
        summary["merged"] = True
    return summary


def _held_out(keys: list[str], count: int) -> set[str]:
    """`count` keys chosen by a hash of the key: stable whatever order or part they came from."""
    if len(keys) < count + 1:
        return set()
    return set(sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())[:count])


def merge_parts(
    config_path: str,
    output: str,
    *,
    config: PrepareConfig | None = None,
    val_per_dataset: int | None = None,
) -> dict:
    """Build table.csv and report.csv from the journals for every source of the config.

    Every array must have been prepared with the store's settings (store.json; `config`, when given,
    must match them): parts prepared with other settings are refused, never merged. Raises when a source
    has not been processed yet (its part has not run, or files were added or changed). The report lists
    the unusable images and what the discovery left out (label folders, files of no image type)."""
    specs = load_dataset_config(config_path)
    layout = StoreLayout(output)
    meta = _read_meta(layout)
    if meta is None:
        raise RuntimeError(
            f"{layout.root}: no store here (no store.json): the sources are not processed yet; run prepare first"
        )
    settings = meta.get("settings")
    if config is not None and store_settings(config) != settings:
        raise ConfigError(
            f"{layout.root}: the store was prepared with other settings "
            f"({_describe_differences(settings, store_settings(config))}); merge with the store's settings"
        )
    if val_per_dataset is None:
        val_per_dataset = (
            config.val_per_dataset if config else meta.get("prepare", {}).get("val_per_dataset", 1)
        )
    skipped: list[SkippedSource] = []
    items = _all_items(specs, skipped)
    by_name = {s.name: s for s in specs}
    journal = _read_journals(layout)
    rows, failures, missing, other = [], [], [], []
    for item in items:
        records = journal.get(item.key)
        expected = image_settings(settings or {}, by_name[item.dataset])
        state = _state(records, item, layout.root, expected, retry_failed=False)
        if state == "settings":
            other.append((item, records))
        elif state != "done":
            missing.append(item.path)
        else:
            for record in records:
                (rows if record["type"] == "image" else failures).append(record)
    if other:
        item, records = other[0]
        raise RuntimeError(
            f"{len(other)} source(s) were prepared with other settings than the store's (first: {item.key}: "
            f"{_describe_differences(records[0].get('settings_used'), image_settings(settings or {}, by_name[item.dataset]))}); "
            "parts prepared with different settings are not merged: prepare them again with the store's "
            "settings and --reprocess"
        )
    if missing:
        raise RuntimeError(
            f"{len(missing)} source(s) not processed yet (first: {missing[0]}); run the missing parts "
            "(or prepare without --part) before merging"
        )
    failures += [
        {"source": s.path, "dataset": s.dataset, "reason": s.reason, "message": s.message} for s in skipped
    ]
    weights = {s.name: s.weight for s in specs}
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c not in ("weight", "split")])
    table["split"] = "train"
    for (_, _), group in table.groupby(["dataset", "modality"], sort=False):
        table.loc[table.key.isin(_held_out(group.key.tolist(), val_per_dataset)), "split"] = "val"
    counts = table.groupby(["dataset", "split"]).key.transform("count")
    table["weight"] = table.dataset.map(weights) / counts
    table = table[list(TABLE_COLUMNS)].sort_values("key").reset_index(drop=True)
    if table.key.duplicated().any():
        raise RuntimeError(f"duplicate keys in the store: {table.key[table.key.duplicated()].tolist()[:5]}")
    report = pd.DataFrame(failures, columns=list(REPORT_COLUMNS)).sort_values("source").reset_index(drop=True)
    with atomic_path(layout.table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(layout.report) as tmp:
        report.to_csv(tmp, index=False)
    overview = os.path.join(layout.root, "overview.png")
    if len(table):
        write_overview(layout.root, overview)
    empty = sorted(set(by_name) - set(table.dataset))
    return {
        "images": len(table),
        "unusable": len(report),
        "datasets_without_images": empty,
        "table": layout.table,
        "report": layout.report,
        "overview": overview,
    }


def write_overview(root: str, path: str, max_datasets: int = 24) -> None:
    """A PNG to look at: per dataset its first image's middle slice (as stored, in [0, 1]) with its
    shape, spacing and aniso_d, and the number of images per aniso_d and split."""
    from pumit_seg.plotting import pyplot, save_figure

    plt = pyplot()

    from pumit_seg.data.store import PretrainStore

    store = PretrainStore(root)
    table = store.table
    firsts = table.groupby("dataset", observed=True).head(1).head(max_datasets)
    columns = min(6, len(firsts) + 1)
    rows = -(-(len(firsts) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax, row in zip(axes.flat, firsts.itertuples(), strict=False):
        depth = row.shape_d // 2
        image = store.read(row.key, (slice(depth, depth + 1), slice(None), slice(None)))[:, 0]
        ax.imshow(image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0], cmap="gray", vmin=0, vmax=1)
        spacing = (
            "2D" if row.shape_d == 1 else f"{row.spacing_d:.2g}x{row.spacing_h:.2g}x{row.spacing_w:.2g} mm"
        )
        ax.set_title(
            f"{row.dataset} ({row.modality})\n{row.shape_d}x{row.shape_h}x{row.shape_w}, {spacing}, "
            f"aniso_d {row.aniso_d}",
            fontsize=7,
        )
        ax.axis("off")
    ax = axes.flat[len(firsts)]
    counts = table.groupby(["aniso_d", "split"], observed=True).size().unstack(fill_value=0)
    counts.plot.bar(ax=ax, stacked=True, fontsize=7)
    ax.set_title(f"{len(table)} images by aniso_d", fontsize=8)
    ax.set_xlabel("aniso_d (5: 2D or very thick)", fontsize=7)
    for ax in axes.flat[len(firsts) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# ------------------------------------------------------------------------------------------- CLI


def _percentile(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"a percentile must be in [0, 100], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PrepareConfig()
    parser.add_argument("config", help="dataset config (JSON; see `pydoc pumit_seg.data.prepare`)")
    parser.add_argument("-o", "--output", required=True, help="store folder (created, or continued)")
    parser.add_argument(
        "--part", type=_non_negative_int, default=0, help="this job's part, 0-based (default: 0)"
    )
    parser.add_argument("--num-parts", type=_positive_int, default=1, help="number of parts (default: 1)")
    parser.add_argument("--merge", action="store_true", help="only merge the finished parts into table.csv")
    parser.add_argument(
        "--no-merge", action="store_true", help="do not merge even when every part has finished"
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="try again the files reported unusable before"
    )
    parser.add_argument(
        "--reprocess",
        action="store_true",
        help="prepare again every image of a store prepared with other settings (without it such a run is "
        "refused)",
    )
    parser.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=min(8, os.cpu_count() or 1),
        help="worker processes (0: none)",
    )
    parser.add_argument(
        "--foreground-percentile",
        type=_percentile,
        default=defaults.foreground_percentile,
        help="crop non-8-bit images to the box above this percentile (default: %(default)s)",
    )
    parser.add_argument(
        "--clip-percentiles",
        type=_percentile,
        nargs=2,
        default=list(defaults.clip_percentiles),
        metavar=("LOW", "HIGH"),
        help="intensity window of CT/MR-like images (default: %(default)s)",
    )
    parser.add_argument(
        "--max-in-plane",
        type=_positive_int,
        default=defaults.max_in_plane,
        help="shorter side limit (default: 512)",
    )
    parser.add_argument(
        "--min-in-plane",
        type=_positive_int,
        default=defaults.min_in_plane,
        help="smaller images after the crop are unusable (default: %(default)s)",
    )
    parser.add_argument(
        "--val-per-dataset",
        type=_non_negative_int,
        default=defaults.val_per_dataset,
        help="held-out images per dataset and modality (default: %(default)s)",
    )
    parser.add_argument(
        "--codec",
        default=defaults.chunks.codec,
        choices=("ZSTD", "LZ4HC", "LZ4", "ZLIB", "BLOSCLZ"),
        help="blosc2 codec of the stored arrays (default: %(default)s)",
    )
    parser.add_argument(
        "--clevel",
        type=int,
        choices=range(0, 10),
        default=defaults.chunks.clevel,
        metavar="0..9",
        help="blosc2 compression level (default: %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    low, high = args.clip_percentiles
    if not low < high:
        print(
            f"pumit_pretrain prepare: --clip-percentiles LOW must be below HIGH, got {low} {high}",
            file=sys.stderr,
        )
        return 2
    if args.part >= args.num_parts:
        print(
            f"pumit_pretrain prepare: --part must be in 0..{args.num_parts - 1}, got {args.part}",
            file=sys.stderr,
        )
        return 2
    config = PrepareConfig(
        foreground_percentile=args.foreground_percentile,
        clip_percentiles=(low, high),
        max_in_plane=args.max_in_plane,
        min_in_plane=args.min_in_plane,
        val_per_dataset=args.val_per_dataset,
        chunks=ChunkConfig(codec=args.codec, clevel=args.clevel),
    )
    try:
        # the store is created or continued; a path that cannot be written is refused before any work
        check_output_path(
            args.output, is_dir=True, overwrite=True, inputs=[args.config], option="-o/--output"
        )
        if args.merge:
            # the arrays' settings are the store's (store.json); the settings flags are not needed here
            summary = merge_parts(args.config, args.output, val_per_dataset=args.val_per_dataset)
        else:
            summary = prepare_store(
                args.config,
                args.output,
                config=config,
                part=args.part,
                num_parts=args.num_parts,
                num_workers=args.num_workers,
                retry_failed=args.retry_failed,
                reprocess=args.reprocess,
                merge=not args.no_merge,
                progress=not args.quiet,
            )
    except (ConfigError, RuntimeError, ValueError) as error:
        print(f"pumit_pretrain prepare: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    if summary.get("unusable"):
        print(
            f"{summary['unusable']} source(s) not in the table (unusable images, label folders, files of no "
            f"image type), reasons in {summary['report']}",
            file=sys.stderr,
        )
    for name in summary.get("datasets_without_images", []):
        print(
            f"dataset {name!r}: no usable image, none in the table (see {summary['report']})", file=sys.stderr
        )
    return 0
