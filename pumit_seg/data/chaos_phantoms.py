"""Synthetic CHAOS-layout MR sets: DICOM series and ground-truth PNG stacks (SPEC section 10).

The abdomen phantoms of `pumit_seg.data.synthetic` (MR contrast, smooth bias field) written the way the
CHAOS challenge distributes its data, so ``pumit_chaos convert / export / score`` run on them exactly as
on the download::

    ROOT/Train_Sets/MR/<id>/T1DUAL/DICOM_anon/InPhase/*.dcm   (and OutPhase/)
    ROOT/Train_Sets/MR/<id>/T1DUAL/Ground/*.png               one ground truth for both phases
    ROOT/Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm
    ROOT/Train_Sets/MR/<id>/T2SPIR/Ground/*.png
    ROOT/Test_Sets/MR/<id>/...                                the same without Ground folders
    ROOT/Test_Sets_reference/MR/<id>/...                      the test cases with Ground, for a local score

Ground truths use the CHAOS grey values (liver 63, right kidney 126, left kidney 189, spleen 252); the
phantom's aorta is left unlabelled, as CHAOS labels no vessels. The patient's right is on the image left
(columns run to the patient's left), so the liver and the right kidney lie at low column indices.
Like some real CHAOS series, every other T1DUAL series has file names that run against the slice
position, which readers that sort by position would reverse.

Each series is written into a temporary sibling folder and renamed into place; a series already
present is kept (the generator is seeded, so it would be written identically).

    python -m pumit_seg.data.chaos_phantoms OUT --num_train 4 --num_test 2
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pumit_seg.atomic import atomic_path
from pumit_seg.data.synthetic import LABELS, PhantomConfig, make_phantom

SEQUENCES = ("T1DUAL", "T2SPIR")
# CHAOS ground-truth grey values (SPEC 10)
GREY = {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}
# Out-of-phase T1 darkens voxels holding both fat and water; the phantom's liver plays the fatty organ.
OUT_PHASE_FACTOR = {"liver": 0.6, "default": 0.9}
IMAGE_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # axial slices: rows along x, columns along y


@dataclass
class ChaosPhantomConfig:
    """Geometry of the synthetic CHAOS series. Shapes (slices, rows, columns), spacing mm.

    CHAOS MR series have 26-50 slices of 256 x 256 pixels at 5.5-9 x 1.4-1.9 mm; the defaults keep the
    anisotropy (aniso_d 2) at a size that trains in minutes on a CPU.
    """

    shape: tuple[int, int, int] = (20, 72, 72)
    spacing: tuple[float, float, float] = (8.0, 1.62, 1.62)
    sequences: tuple[str, ...] = SEQUENCES

    def __post_init__(self):
        unknown = set(self.sequences) - set(SEQUENCES)
        if unknown or not self.sequences:
            raise ValueError(f"sequences must be a non-empty subset of {SEQUENCES}, got {self.sequences}")
        if len(self.shape) != 3 or len(self.spacing) != 3 or min(self.shape) < 1 or min(self.spacing) <= 0:
            raise ValueError(
                f"shape and spacing need three positive values, got {self.shape}, {self.spacing}"
            )


def chaos_ground_truth(label: np.ndarray) -> np.ndarray:
    """CHAOS grey values (uint8) from a phantom label map; the kidneys are split by image side."""
    grey = np.zeros(label.shape, dtype=np.uint8)
    grey[label == LABELS["liver"]] = GREY["liver"]
    grey[label == LABELS["spleen"]] = GREY["spleen"]
    columns = np.arange(label.shape[-1])
    patient_right = columns < label.shape[-1] / 2  # image left is the patient's right
    kidneys = label == LABELS["kidneys"]
    grey[kidneys & patient_right] = GREY["right_kidney"]
    grey[kidneys & ~patient_right] = GREY["left_kidney"]
    return grey


def write_dicom_slice(
    path: str, pixels: np.ndarray, position, spacing_hw, series_uid: str, number: int
) -> None:
    """One MR slice as a DICOM file (16-bit unsigned, explicit VR little endian), written atomically."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(s) for s in spacing_hw]
    ds.ImagePositionPatient = [float(p) for p in position]
    ds.ImageOrientationPatient = IMAGE_ORIENTATION
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_png(path: str, grey: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").save(tmp, format="PNG")


def _to_uint16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def write_series(
    folder: str,
    volumes: dict[str, np.ndarray],
    grey: np.ndarray | None,
    spacing,
    origin,
    series_number: int,
    reversed_names: bool,
) -> None:
    """One sequence of one case: ``DICOM_anon[/<phase>]/*.dcm`` (+ ``Ground/*.png``) under `folder`.

    `volumes` maps a DICOM sub-folder ("" for T2SPIR, "InPhase" / "OutPhase" for T1DUAL) to a
    (slices, rows, columns) volume; slice k lies at origin + k * spacing[0] along the slice normal.
    With `reversed_names` file name k holds slice (num_slices - 1 - k).
    """
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    num_slices = next(iter(volumes.values())).shape[0]
    order = list(range(num_slices))[::-1] if reversed_names else list(range(num_slices))
    for phase_index, (phase, volume) in enumerate(volumes.items()):
        dicom_folder = os.path.join(tmp, "DICOM_anon", phase)
        os.makedirs(dicom_folder)
        series_uid = generate_uid()
        for k, z in enumerate(order):
            position = (origin[0], origin[1], origin[2] + z * spacing[0])
            name = f"IMG-{series_number + phase_index:04d}-{k + 1:05d}.dcm"
            write_dicom_slice(
                os.path.join(dicom_folder, name), volume[z], position, spacing[1:], series_uid, k + 1
            )
    if grey is not None:
        os.makedirs(os.path.join(tmp, "Ground"))
        for k, z in enumerate(order):
            write_png(os.path.join(tmp, "Ground", f"IMG-{series_number:04d}-{k + 1:05d}.png"), grey[z])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(tmp, folder)


def make_case(
    chaos_id: int, config: ChaosPhantomConfig, seed: int
) -> dict[str, tuple[dict, np.ndarray, tuple]]:
    """{sequence: (volumes by DICOM sub-folder, ground-truth grey stack, origin)} of one case.

    Seeded by (seed, chaos_id) alone, so a case is the same whichever set it is written into.
    """
    rng = np.random.default_rng([seed, chaos_id])
    phantom_config = PhantomConfig(shape=config.shape, spacing=config.spacing, modality="MR", num_channels=2)
    series = {}
    for sequence in SEQUENCES:  # both drawn always, so a case does not depend on `config.sequences`
        image, label, _ = make_phantom(rng, phantom_config)
        t1, t2 = image
        origin = tuple(rng.uniform(-150, 150, size=3))
        if sequence == "T1DUAL":
            factor = np.where(
                label == LABELS["liver"], OUT_PHASE_FACTOR["liver"], OUT_PHASE_FACTOR["default"]
            )
            out_phase = t1 * factor + rng.normal(0.0, 5.0, size=t1.shape)
            volumes = {"InPhase": _to_uint16(t1), "OutPhase": _to_uint16(out_phase)}
        else:
            volumes = {"": _to_uint16(t2)}
        series[sequence] = (volumes, chaos_ground_truth(label), origin)
    return series


def write_case(
    set_folder: str, chaos_id: int, config: ChaosPhantomConfig, seed: int, with_ground: bool
) -> None:
    pending = [
        s
        for s in config.sequences
        if not os.path.isdir(os.path.join(set_folder, "MR", str(chaos_id), s, "DICOM_anon"))
        or (with_ground and not os.path.isdir(os.path.join(set_folder, "MR", str(chaos_id), s, "Ground")))
    ]
    if not pending:
        return
    case = make_case(chaos_id, config, seed)
    for sequence in pending:
        volumes, grey, origin = case[sequence]
        write_series(
            os.path.join(set_folder, "MR", str(chaos_id), sequence),
            volumes,
            grey if with_ground else None,
            config.spacing,
            origin,
            series_number=2 if sequence == "T2SPIR" else 4,  # as in the CHAOS file names
            reversed_names=sequence == "T1DUAL" and chaos_id % 2 == 1,
        )


def write_chaos_phantoms(
    root: str, num_train: int = 4, num_test: int = 2, config: ChaosPhantomConfig | None = None, seed: int = 0
) -> dict[str, str]:
    """Write ``Train_Sets``, ``Test_Sets`` and ``Test_Sets_reference`` under `root`; returns their paths.

    Training cases get CHAOS ids 1..num_train, test cases the ids after them.
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    config = config or ChaosPhantomConfig()
    folders = {name: os.path.join(root, name) for name in ("Train_Sets", "Test_Sets", "Test_Sets_reference")}
    for chaos_id in range(1, num_train + 1):
        write_case(folders["Train_Sets"], chaos_id, config, seed, with_ground=True)
    for chaos_id in range(num_train + 1, num_train + num_test + 1):
        write_case(folders["Test_Sets"], chaos_id, config, seed, with_ground=False)
        write_case(folders["Test_Sets_reference"], chaos_id, config, seed, with_ground=True)
    return folders


def main(argv: list[str] | None = None) -> None:
    defaults = ChaosPhantomConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="folder to write Train_Sets, Test_Sets and Test_Sets_reference into")
    parser.add_argument("--num_train", type=int, default=4, help="training cases (default: 4)")
    parser.add_argument("--num_test", type=int, default=2, help="test cases (default: 2)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=list(defaults.shape), metavar=("SLICES", "ROWS", "COLS")
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=list(defaults.spacing), metavar=("SD", "SH", "SW")
    )
    parser.add_argument("--sequences", nargs="+", choices=SEQUENCES, default=list(SEQUENCES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = ChaosPhantomConfig(tuple(args.shape), tuple(args.spacing), tuple(args.sequences))
    except ValueError as error:
        parser.error(str(error))
    for name, folder in write_chaos_phantoms(
        args.output, args.num_train, args.num_test, config, args.seed
    ).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
