"""Notice a stale nnU-Net dataset fingerprint before planning from it.

nnU-Net reuses ``dataset_fingerprint.json`` whenever it exists, even when the raw images changed since;
our planner would then derive ``aniso_d``, the target spacing and the patch from old spacings. Two checks:

* after every fingerprint extraction `record_fingerprint_sources` writes
  ``pumit_fingerprint_sources.json`` beside it: each training case's files with size and modification
  time. A later run compares the raw folder with it (a few ``stat`` calls).
* a fingerprint without that record (written by ``nnUNetv2_extract_fingerprint`` or an older pumit-seg)
  is compared with the raw data itself: the number of training cases, and for images that SimpleITK
  reads (nnU-Net's default reader) each case's spacing from the image header and that the cropped shape
  fits inside the image.

`fingerprint_staleness` returns the reason the fingerprint is stale, or None.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pumit_seg.atomic import write_json_atomic

__all__ = ["SOURCES_FILE", "fingerprint_staleness", "record_fingerprint_sources", "training_case_files"]

SOURCES_FILE = "pumit_fingerprint_sources.json"
FINGERPRINT_FILE = "dataset_fingerprint.json"
SPACING_RELATIVE_TOLERANCE = 1e-4  # header spacings are stored as float32 in NIfTI
SITK_HEADER_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def training_case_files(raw_dataset_folder: str | Path, dataset_json: dict) -> dict[str, list[str]]:
    """Case identifier -> its image and label files, in nnU-Net's order (the fingerprint's order)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    cases = get_filenames_of_train_images_and_targets(str(raw_dataset_folder), dataset_json)
    return {case: [*entry["images"], entry["label"]] for case, entry in cases.items()}


def _signature(files: list[str]) -> list[list]:
    signature = []
    for file in files:
        stat = os.stat(file)
        signature.append([os.path.basename(file), stat.st_size, stat.st_mtime_ns])
    return signature


def record_fingerprint_sources(
    raw_dataset_folder: str | Path, preprocessed_dataset_folder: str | Path
) -> None:
    """Write the record of the raw files the current fingerprint was computed from."""
    dataset_json = json.loads((Path(raw_dataset_folder) / "dataset.json").read_text())
    cases = training_case_files(raw_dataset_folder, dataset_json)
    record = {case: _signature(files) for case, files in cases.items()}
    write_json_atomic(Path(preprocessed_dataset_folder) / SOURCES_FILE, record)


def _header_spacing_and_shape(file: str) -> tuple[list[float], list[int]] | None:
    """(spacing, shape) in nnU-Net's SimpleITKIO axis order (z, y, x), from the header only."""
    if not file.endswith(SITK_HEADER_SUFFIXES):
        return None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f"{file}: cannot read the image header ({error})") from error
    if reader.GetDimension() != 3:
        return None
    return list(reversed(reader.GetSpacing())), list(reversed(reader.GetSize()))


def fingerprint_staleness(
    raw_dataset_folder: str | Path, preprocessed_dataset_folder: str | Path
) -> str | None:
    """Why the fingerprint in `preprocessed_dataset_folder` no longer describes the raw data, or None."""
    preprocessed_dataset_folder = Path(preprocessed_dataset_folder)
    fingerprint_file = preprocessed_dataset_folder / FINGERPRINT_FILE
    if not fingerprint_file.is_file():
        return None
    dataset_json = json.loads((Path(raw_dataset_folder) / "dataset.json").read_text())
    cases = training_case_files(raw_dataset_folder, dataset_json)

    record_file = preprocessed_dataset_folder / SOURCES_FILE
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        added, removed = sorted(set(cases) - set(record)), sorted(set(record) - set(cases))
        if added or removed:
            return (
                f"training cases changed since the fingerprint (added: {added[:5]}, removed: {removed[:5]})"
            )
        for case, files in cases.items():
            if _signature(files) != record[case]:
                return f"the files of case {case} changed (size or modification time) since the fingerprint"
        return None

    fingerprint = json.loads(fingerprint_file.read_text())
    spacings, shapes = fingerprint.get("spacings", []), fingerprint.get("shapes_after_crop", [])
    if len(spacings) != len(cases):
        return f"the fingerprint describes {len(spacings)} training cases, the raw dataset has {len(cases)}"
    for (case, files), spacing, shape in zip(cases.items(), spacings, shapes, strict=True):
        header = _header_spacing_and_shape(files[0])
        if header is None:
            continue
        header_spacing, header_shape = header
        if len(spacing) != 3 or any(
            abs(a - b) > SPACING_RELATIVE_TOLERANCE * max(abs(a), abs(b))
            for a, b in zip(spacing, header_spacing, strict=True)
        ):
            return f"case {case}: spacing {list(spacing)} in the fingerprint, {header_spacing} in {files[0]}"
        if len(shape) != 3 or any(cropped > full for cropped, full in zip(shape, header_shape, strict=True)):
            return f"case {case}: cropped shape {list(shape)} in the fingerprint exceeds the image's {header_shape}"
    return None
