"""CHAOS challenge I/O: DICOM series and PNG stacks in file-name order, grey values, geometry.

See docs/evaluation.md, "CHAOS", and docs/method.md, "Metric conventions".

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

from pumit_seg.data.readers import ImageReadError, dicom_series_geometry, read_png
from pumit_seg.data.readers import read_dicom_series as read_dicom_series_image

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
    """(slices, rows, columns) uint8 stack of the PNGs in `folder` in file-name order, and the names.

    Every PNG is read as grey as the official evaluation code does (``cv2.imread(path, 0)``: palette and
    colour PNGs by their luminance, not their palette indices), through the project's one reader."""
    names = sorted_files(folder, ".png")
    slices = []
    for name in names:
        path = os.path.join(folder, name)
        array = read_png(path, as_grey=True)
        if array.dtype != np.uint8 or array.ndim != 2:
            raise ValueError(f"{path} is not an 8-bit grey PNG (dtype {array.dtype}, shape {array.shape})")
        if slices and array.shape != slices[0].shape:
            raise ValueError(
                f"{path} has size {array.shape}, {names[0]} in the same folder {slices[0].shape}"
            )
        slices.append(array)
    return np.stack(slices), names


@dataclass
class DicomGeometry:
    """Geometry of a DICOM series stacked in file-name order as an array (slice, row, column)."""

    files: list[str]  # file names, slice k = files[k]
    rows: int
    columns: int
    spacing_zyx: tuple[float, float, float]  # (slice step, PixelSpacing[0] = row spacing, PixelSpacing[1])
    origin: tuple[float, float, float]  # ImagePositionPatient of the first file
    direction: tuple[float, ...]  # ITK 3x3 row-major, columns = column, row and slice directions
    # the official CHAOS evaluation's index -> mm map (3x3, columns for slice, row, column index steps):
    # the full inter-slice vector (tilted or not), row index x ImageOrientation[:3] x PixelSpacing[0],
    # column index x ImageOrientation[3:] x PixelSpacing[1], exactly as its transformToRealCoordinates
    chaos_index_to_mm: tuple[float, ...] = ()

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

    def index_to_mm(self) -> np.ndarray:
        return np.asarray(self.chaos_index_to_mm, dtype=float).reshape(3, 3)


def _geometry(folder: str, files: list[str], headers: list, rows: int, columns: int) -> DicomGeometry:
    geometry = dicom_series_geometry(headers, [os.path.join(folder, name) for name in files])
    orientation, pixel_spacing = geometry["orientation"], geometry["pixel_spacing"]
    index_to_mm = np.stack(
        [geometry["slice_vector"], orientation[:3] * pixel_spacing[0], orientation[3:] * pixel_spacing[1]],
        axis=1,
    )
    return DicomGeometry(
        files=files,
        rows=rows,
        columns=columns,
        spacing_zyx=tuple(float(v) for v in geometry["spacing"]),
        origin=tuple(float(v) for v in geometry["origin_xyz"]),
        direction=tuple(float(v) for v in geometry["direction"].ravel()),
        chaos_index_to_mm=tuple(float(v) for v in index_to_mm.ravel()),
    )


def read_dicom_geometry(folder: str) -> DicomGeometry:
    """Geometry of the series in file-name order, CHAOS style, from every file's header: each slice's
    position projected on the slice normal, so a missing slice or uneven spacing is an ImageReadError
    naming the series and the gap (`pumit_seg.data.readers.dicom_series_geometry`), never averaged."""
    files = sorted_files(folder, ".dcm")
    headers = []
    for name in files:
        path = os.path.join(folder, name)
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:  # noqa: BLE001 -- pydicom raises many types for damaged files
            raise ImageReadError(path, "unreadable", f"not a readable DICOM file ({error})") from None
    rows, columns = (int(headers[0].get(tag, 0)) for tag in ("Rows", "Columns"))
    return _geometry(folder, files, headers, rows, columns)


def read_dicom_series(folder: str) -> tuple[np.ndarray, DicomGeometry]:
    """(slices, rows, columns) float32 stack in file-name order with RescaleSlope / Intercept applied.

    Read by `pumit_seg.data.readers.read_dicom_series`: a damaged file is an error naming that file."""
    files = sorted_files(folder, ".dcm")
    image = read_dicom_series_image(folder, files)
    return image.array, read_dicom_geometry(folder)
