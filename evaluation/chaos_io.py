"""CHAOS challenge I/O: DICOM series and PNG stacks in file-name order, grey values, geometry (SPEC 10).

The CHAOS rule is that slice k of a ground-truth (or result) PNG stack belongs to DICOM file k in sorted
file-name order. ITK-style readers sort by slice position instead, which reverses some series, so nothing
here sorts by position: every stack is read in file-name order (``sorted`` of the names, as the official
code's ``glob`` + ``sort``), and the converted NIfTI keeps that order with a geometry (possibly a
left-handed direction matrix) that still places every slice at its true position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image

from pumit_seg.atomic import atomic_path

# organ: (label, lowest grey, highest grey, grey written in submissions), from the CHAOS data description
MR_ORGANS = {
    "liver": (1, 55, 70, 63),
    "right_kidney": (2, 110, 135, 126),
    "left_kidney": (3, 175, 200, 189),
    "spleen": (4, 240, 255, 252),
}
CT_ORGANS = {"liver": (1, 1, 255, 255)}  # CT ground truths: any non-zero pixel is liver
MR_SEQUENCES = ("T1DUAL", "T2SPIR")
T1DUAL_PHASES = ("InPhase", "OutPhase")  # channels _0000 and _0001


def organs_of(modality: str) -> dict:
    if modality == "CT":
        return CT_ORGANS
    if modality == "MR":
        return MR_ORGANS
    raise ValueError(f"unknown CHAOS modality {modality!r} (CT or MR)")


def sorted_files(folder: str, suffix: str) -> list[str]:
    """File names in `folder` ending in `suffix` (case-insensitive), in sorted file-name order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CHAOS folder {folder} does not exist")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(suffix) and not n.startswith("."))
    if not names:
        raise FileNotFoundError(f"no *{suffix} files in {folder}")
    return names


def grey_to_labels(grey: np.ndarray, modality: str) -> np.ndarray:
    """Label map (uint8) from CHAOS grey values by the organ ranges; other grey values are background."""
    labels = np.zeros(grey.shape, dtype=np.uint8)
    for label, low, high, _ in organs_of(modality).values():
        labels[(grey >= low) & (grey <= high)] = label
    return labels


def labels_to_grey(labels: np.ndarray, modality: str, liver_only: bool = False) -> np.ndarray:
    """Submission grey values (uint8) from a label map; with `liver_only` every other organ is dropped."""
    grey = np.zeros(labels.shape, dtype=np.uint8)
    for organ, (label, _, _, value) in organs_of(modality).items():
        if liver_only and organ != "liver":
            continue
        grey[labels == label] = value
    return grey


def read_png_stack(folder: str) -> tuple[np.ndarray, list[str]]:
    """(slices, rows, columns) uint8 stack of the PNGs in `folder` in file-name order, and the names."""
    names = sorted_files(folder, ".png")
    slices = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            array = np.asarray(image.convert("L") if image.mode not in ("L", "P") else image)
        if array.dtype != np.uint8:
            raise ValueError(f"{os.path.join(folder, name)} is not an 8-bit grey PNG (mode {image.mode})")
        if slices and array.shape != slices[0].shape:
            raise ValueError(
                f"{os.path.join(folder, name)} has size {array.shape}, {names[0]} in the same folder {slices[0].shape}"
            )
        slices.append(array)
    return np.stack(slices), names


def write_png(path: str, grey: np.ndarray) -> None:
    """8-bit grey PNG, written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").save(tmp, format="PNG")


@dataclass
class DicomGeometry:
    """Geometry of a DICOM series stacked in file-name order as an array (slice, row, column)."""

    files: list[str]  # file names, slice k = files[k]
    rows: int
    columns: int
    spacing_zyx: tuple[float, float, float]  # (slice step, PixelSpacing[0] = row spacing, PixelSpacing[1])
    origin: tuple[float, float, float]  # ImagePositionPatient of the first file
    direction: tuple[float, ...]  # ITK 3x3 row-major, columns = column, row and slice directions

    def to_json(self) -> dict:
        return {
            "dicom_files": self.files,
            "rows": self.rows,
            "columns": self.columns,
            "num_slices": len(self.files),
            "spacing_zyx": list(self.spacing_zyx),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


def _floats(value, path: str, tag: str, count: int) -> np.ndarray:
    if value is None:
        raise ValueError(f"{path} has no {tag}")
    array = np.asarray([float(v) for v in value])
    if array.size != count:
        raise ValueError(f"{path}: {tag} has {array.size} values, expected {count}")
    return array


def read_dicom_geometry(folder: str, headers: list | None = None) -> DicomGeometry:
    """Geometry from the headers, CHAOS style: PixelSpacing, and the ImagePositionPatient step between the
    first and last file in file-name order (never SliceThickness)."""
    files = sorted_files(folder, ".dcm")
    if headers is None:
        headers = [
            pydicom.dcmread(os.path.join(folder, f), stop_before_pixels=True) for f in (files[0], files[-1])
        ]
    first, last = headers[0], headers[-1]
    first_path, last_path = os.path.join(folder, files[0]), os.path.join(folder, files[-1])
    pixel_spacing = _floats(first.get("PixelSpacing"), first_path, "PixelSpacing", 2)
    orientation = _floats(first.get("ImageOrientationPatient"), first_path, "ImageOrientationPatient", 6)
    position_first = _floats(first.get("ImagePositionPatient"), first_path, "ImagePositionPatient", 3)
    position_last = _floats(last.get("ImagePositionPatient"), last_path, "ImagePositionPatient", 3)
    column_direction, row_direction = orientation[:3], orientation[3:]  # along a row, along a column
    normal = np.cross(column_direction, row_direction)
    if len(files) > 1:
        offset = position_last - position_first
        step = float(np.linalg.norm(offset)) / (len(files) - 1)
        if step == 0:
            raise ValueError(f"{folder}: first and last DICOM files lie at the same position")
        # keep the slice axis orthogonal to the image plane; its sign follows the file-name order
        slice_direction = normal if np.dot(offset, normal) >= 0 else -normal
    else:
        step, slice_direction = 1.0, normal  # a single slice: the step is never used for distances
    direction = np.stack([column_direction, row_direction, slice_direction], axis=1)
    return DicomGeometry(
        files=files,
        rows=int(first.Rows),
        columns=int(first.Columns),
        spacing_zyx=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in position_first),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def read_dicom_series(folder: str) -> tuple[np.ndarray, DicomGeometry]:
    """(slices, rows, columns) float32 stack in file-name order with RescaleSlope / Intercept applied."""
    files = sorted_files(folder, ".dcm")
    slices, headers = [], []
    for name in files:
        path = os.path.join(folder, name)
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float32)
        if pixels.ndim != 2:
            raise ValueError(
                f"{path} holds a {pixels.ndim}D pixel array; CHAOS series have one slice per file"
            )
        if slices and pixels.shape != slices[0].shape:
            raise ValueError(
                f"{path} has {pixels.shape} pixels, {files[0]} in the same series {slices[0].shape}"
            )
        slope = float(dataset.get("RescaleSlope", 1.0))
        intercept = float(dataset.get("RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
        headers.append(dataset)
    geometry = read_dicom_geometry(folder, headers=[headers[0], headers[-1]])
    return np.stack(slices), geometry
