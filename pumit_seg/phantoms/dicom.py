"""The project's DICOM writer: single-frame slices and series, and enhanced multi-frame files.

Used by the CHAOS-layout phantom trees, the pre-training phantom corpus and the tests of the DICOM
readers; every file is written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from pumit_seg.atomic import atomic_path

__all__ = [
    "DICOM_ORIENTATION",
    "MISLEADING_SLICE_THICKNESS",
    "write_dicom_multiframe",
    "write_dicom_series",
    "write_dicom_slice",
]

DICOM_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # axial: rows along x, columns along y
# Readers must take the slice step from the positions, never from SliceThickness: test series carry a
# thickness far from their step, so a reader that used it would fail.
MISLEADING_SLICE_THICKNESS = 99.0


def write_dicom_slice(
    path: str,
    pixels: np.ndarray,
    position,
    series_uid: str,
    instance_number: int,
    modality: str = "MR",
    pixel_spacing=(0.9, 0.8),
    orientation=DICOM_ORIENTATION,
    intercept: float = 0.0,
    slice_thickness: float | None = MISLEADING_SLICE_THICKNESS,
) -> None:
    """One uint16 DICOM slice (CT or MR image storage, explicit VR little endian), written atomically.

    It carries the tags CHAOS-style readers use (geometry, RescaleSlope / Intercept) and the series' UID
    and instance number; SliceThickness is left out when `slice_thickness` is None."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = modality
    dataset.SeriesInstanceUID = series_uid
    dataset.InstanceNumber = instance_number
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelSpacing = [float(s) for s in pixel_spacing]
    dataset.ImagePositionPatient = [float(p) for p in position]
    dataset.ImageOrientationPatient = [float(o) for o in orientation]
    if slice_thickness is not None:
        dataset.SliceThickness = float(slice_thickness)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1.0, float(intercept)
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)


def write_dicom_series(folder: str, volume: np.ndarray, positions, names: list[str], **slice_options) -> None:
    """`volume[k]` as `folder/names[k]` at `positions[k]`, instance number k + 1, one new SeriesInstanceUID.

    `slice_options` are the further options of `write_dicom_slice` (modality, pixel spacing, ...)."""
    from pydicom.uid import generate_uid

    os.makedirs(folder, exist_ok=True)
    series_uid = generate_uid()
    for number, (pixels, position, name) in enumerate(zip(volume, positions, names, strict=True), start=1):
        write_dicom_slice(os.path.join(folder, name), pixels, position, series_uid, number, **slice_options)


def write_dicom_multiframe(
    path: str,
    volume: np.ndarray,
    positions,
    pixel_spacing=(0.9, 0.8),
    orientation=DICOM_ORIENTATION,
    slice_thickness: float | None = MISLEADING_SLICE_THICKNESS,
    with_positions: bool = True,
    mosaic: bool = False,
) -> None:
    """`volume` (frames, rows, columns) as one Enhanced MR multi-frame file, frame k at `positions[k]`.

    Geometry in the functional groups as scanners write it: PixelMeasuresSequence and
    PlaneOrientationSequence shared, PlanePositionSequence per frame (left out with `with_positions`
    False); `mosaic` marks it a Siemens mosaic (ImageType MOSAIC), for readers that must refuse it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = EnhancedMRImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.SeriesInstanceUID = "MR", generate_uid()
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC" if mosaic else "NONE"]
    dataset.NumberOfFrames = int(volume.shape[0])
    dataset.Rows, dataset.Columns = volume.shape[1:]
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in pixel_spacing]
    if slice_thickness is not None:
        measures.SliceThickness = float(slice_thickness)
    plane = Dataset()
    plane.ImageOrientationPatient = [float(v) for v in orientation]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    dataset.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for position in positions:
        frame = Dataset()
        if with_positions:
            where = Dataset()
            where.ImagePositionPatient = [float(v) for v in position]
            frame.PlanePositionSequence = Sequence([where])
        frames.append(frame)
    dataset.PerFrameFunctionalGroupsSequence = Sequence(frames)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.PixelData = np.ascontiguousarray(volume, dtype=np.uint16).tobytes()
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
