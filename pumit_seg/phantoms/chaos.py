"""Synthetic trees in the CHAOS layout: DICOM series and ground-truth PNG stacks (docs/evaluation.md, "CHAOS").

CHAOS distributes its data as::

    SET/MR/<id>/T1DUAL/DICOM_anon/InPhase/*.dcm   (and OutPhase/)
    SET/MR/<id>/T1DUAL/Ground/*.png               one ground truth for both phases
    SET/MR/<id>/T2SPIR/DICOM_anon/*.dcm
    SET/MR/<id>/T2SPIR/Ground/*.png
    SET/CT/<id>/DICOM_anon/*.dcm
    SET/CT/<id>/Ground/*.png

where slice k of a ground-truth stack belongs to DICOM file k in file-name order, whatever the slice
positions. Test sets have no Ground folders. `write_chaos_tree` writes such a tree from `ChaosSeries`
(what one series holds), and two makers of series feed it:

* `make_case` / `write_chaos_phantoms`: the abdomen phantoms of `pumit_seg.phantoms.abdomen` (MR contrast,
  smooth bias field) as MR cases, so ``pumit_chaos convert / export / score`` run on them exactly as on
  the download. ``ROOT/Train_Sets``, ``ROOT/Test_Sets`` and ``ROOT/Test_Sets_reference`` (the test cases
  with Ground, for a local score). Ground truths use the CHAOS grey values (liver 63, right kidney 126,
  left kidney 189, spleen 252); the phantom's aorta is left unlabelled, as CHAOS labels no vessels. The
  patient's right is on the image left (columns run to the patient's left), so the liver and the right
  kidney lie at low column indices.
* `tiny_chaos_series`: a few-kilobyte tree of noise images and box organs for the tests of the CHAOS
  tools.

    python -m pumit_seg.phantoms.chaos OUT --num_train 4 --num_test 2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pumit_seg.atomic import atomic_folder, write_grey_png_atomic
from pumit_seg.cli_checks import float_in_range
from pumit_seg.phantoms.abdomen import LABELS, PhantomConfig, make_phantom
from pumit_seg.phantoms.dicom import write_dicom_series

SEQUENCES = ("T1DUAL", "T2SPIR")
SERIES_NUMBER = {"T1DUAL": 4, "T2SPIR": 2}  # the <series> of the CHAOS MR file names IMG-<series>-<number>
# CHAOS ground-truth grey values (the challenge's convention)
GREY = {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}
# Out-of-phase T1 darkens voxels holding both fat and water; the phantom's liver plays the fatty organ.
OUT_PHASE_FACTOR = {"liver": 0.6, "default": 0.9}


# ------------------------------------------------------------------------------------- the writer


@dataclass
class ChaosSeries:
    """One series of a CHAOS tree: where it lies, its DICOM stacks and its ground truth.

    Slice k of every stack is file k of its names and lies at positions[k]; the phases of T1DUAL share the
    positions and the ground truth.
    """

    folder: str  # under the set folder: "MR/<id>/<sequence>" or "CT/<id>"
    dicom: dict[str, np.ndarray]  # sub-folder of DICOM_anon ("" for none) -> (slices, rows, columns)
    dicom_names: dict[str, list[str]]  # sub-folder of DICOM_anon -> file names
    positions: list  # ImagePositionPatient of file k
    ground: np.ndarray  # CHAOS grey values, uint8 (slices, rows, columns)
    ground_names: list[str]
    dicom_options: dict = field(default_factory=dict)  # further `write_dicom_slice` options


def write_chaos_tree(set_folder: str, series: Iterable[ChaosSeries], with_ground: bool = True) -> str:
    """Write every series under `set_folder`, with its Ground folder unless `with_ground` is False (a test
    set); returns `set_folder`.

    Each series is built in a temporary sibling folder and renamed into place, replacing what was there,
    so an interrupted run never leaves a half-written series.
    """
    for one in series:
        with atomic_folder(os.path.join(set_folder, one.folder)) as folder:
            for sub_folder, volume in one.dicom.items():
                dicom_folder = os.path.join(folder, "DICOM_anon", sub_folder)
                names = one.dicom_names[sub_folder]
                write_dicom_series(dicom_folder, volume, one.positions, names, **one.dicom_options)
            if with_ground:
                for grey, name in zip(one.ground, one.ground_names, strict=True):
                    write_grey_png_atomic(os.path.join(folder, "Ground", name), grey)
    return set_folder


def image_names(series_number: int, count: int, suffix: str, first: int = 1) -> list[str]:
    """CHAOS MR file names IMG-<series>-<number>, numbered from `first`."""
    return [f"IMG-{series_number:04d}-{first + k:05d}{suffix}" for k in range(count)]


# ------------------------------------------------------------------------- the demo's phantom sets


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


def _to_uint16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def make_case(chaos_id: int, config: ChaosPhantomConfig, seed: int) -> dict[str, ChaosSeries]:
    """Both MR series of one phantom case, by sequence.

    Seeded by (seed, chaos_id) alone, so a case is the same whichever set it is written into. Slice k lies
    at origin + k * spacing[0] along the slice normal. Like some real CHAOS series, the T1DUAL series of
    odd ids has file names that run against the slice position (file k holds slice num_slices - 1 - k),
    which readers that sort by position would reverse.
    """
    rng = np.random.default_rng([seed, chaos_id])
    phantom_config = PhantomConfig(shape=config.shape, spacing=config.spacing, modality="MR", num_channels=2)
    case = {}
    for sequence in SEQUENCES:  # both drawn always, so a case does not depend on `config.sequences`
        image, label, _ = make_phantom(rng, phantom_config)
        t1, t2 = image
        origin = rng.uniform(-150, 150, size=3)
        if sequence == "T1DUAL":
            factor = np.where(
                label == LABELS["liver"], OUT_PHASE_FACTOR["liver"], OUT_PHASE_FACTOR["default"]
            )
            out_phase = t1 * factor + rng.normal(0.0, 5.0, size=t1.shape)
            volumes = {"InPhase": _to_uint16(t1), "OutPhase": _to_uint16(out_phase)}
        else:
            volumes = {"": _to_uint16(t2)}
        num_slices = label.shape[0]
        slice_of_file = np.arange(num_slices)
        if sequence == "T1DUAL" and chaos_id % 2 == 1:
            slice_of_file = slice_of_file[::-1]
        series_number = SERIES_NUMBER[sequence]
        case[sequence] = ChaosSeries(
            folder=os.path.join("MR", str(chaos_id), sequence),
            dicom={sub_folder: volume[slice_of_file] for sub_folder, volume in volumes.items()},
            dicom_names={  # the out phase is the next series: IMG-0005
                sub_folder: image_names(series_number + index, num_slices, ".dcm")
                for index, sub_folder in enumerate(volumes)
            },
            positions=[(origin[0], origin[1], origin[2] + z * config.spacing[0]) for z in slice_of_file],
            ground=chaos_ground_truth(label)[slice_of_file],
            ground_names=image_names(series_number, num_slices, ".png"),
            dicom_options={"pixel_spacing": config.spacing[1:], "slice_thickness": None},
        )
    return case


def write_case(
    set_folder: str, chaos_id: int, config: ChaosPhantomConfig, seed: int, with_ground: bool
) -> None:
    """The case's series of `config.sequences`; a series already present is kept (the generator is
    seeded, so it would be written identically)."""
    case_folder = os.path.join(set_folder, "MR", str(chaos_id))
    pending = [
        s
        for s in config.sequences
        if not os.path.isdir(os.path.join(case_folder, s, "DICOM_anon"))
        or (with_ground and not os.path.isdir(os.path.join(case_folder, s, "Ground")))
    ]
    if not pending:
        return
    case = make_case(chaos_id, config, seed)
    write_chaos_tree(set_folder, [case[sequence] for sequence in pending], with_ground)


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


# ---------------------------------------------------------------------------- the tests' tiny tree


def _tiny_mr_ground_truth(num_slices: int, rows: int, columns: int) -> np.ndarray:
    """Box organs in CHAOS MR grey values. As in real ground truths, not every grey value is the one a
    submission writes: readers must map the organs' grey-value ranges, and ignore values outside them."""
    grey = np.zeros((num_slices, rows, columns), np.uint8)
    grey[:, 2 : rows // 2, 2 : columns // 2] = GREY["liver"]  # cut by the first and the last slice
    grey[1:-1, rows // 2 + 2 : rows - 2, 3:7] = 120  # right kidney: inside its range (110-135), not 126
    grey[1:, rows // 2 + 2 : rows - 2, columns // 2 + 2 : columns - 2] = GREY["left_kidney"]
    grey[: num_slices // 2, 3:6, columns // 2 + 2 : columns - 2] = 250  # spleen: inside 240-255, not 252
    grey[:, -1, ::3] = 30  # stray grey values outside every organ's range: background
    return grey


def tiny_chaos_series(
    mr_ids=("1",), ct_ids=("2",), rows: int = 18, columns: int = 20, seed: int = 0
) -> list[ChaosSeries]:
    """The series of a tiny CHAOS download (noise images, box organs), for tests of the CHAOS tools.

    MR <id>: T1DUAL (6 slices, out phase = in phase // 2) has file names running against the slice
    position, as some real series do; T2SPIR (5 slices) runs with them. CT <id>: 4 slices, Hounsfield
    units through RescaleIntercept, liver ground truth 255 with one pixel of 1 (any non-zero grey is
    liver). Every DICOM keeps the misleading default SliceThickness of `write_dicom_slice`.
    """
    rng = np.random.default_rng(seed)
    series = []
    for chaos_id in mr_ids:
        t1_slices, t2_slices = 6, 5
        in_phase = rng.integers(0, 900, (t1_slices, rows, columns))
        series.append(
            ChaosSeries(
                folder=os.path.join("MR", str(chaos_id), "T1DUAL"),
                dicom={"InPhase": in_phase, "OutPhase": in_phase // 2},
                dicom_names={
                    "InPhase": image_names(SERIES_NUMBER["T1DUAL"], t1_slices, ".dcm"),
                    "OutPhase": image_names(SERIES_NUMBER["T1DUAL"], t1_slices, ".dcm", first=100),
                },
                positions=[(-10.0, 20.0, 30.0 - 4.5 * k) for k in range(t1_slices)],  # file 1 lies highest
                ground=_tiny_mr_ground_truth(t1_slices, rows, columns),
                ground_names=image_names(SERIES_NUMBER["T1DUAL"], t1_slices, ".png"),
            )
        )
        series.append(
            ChaosSeries(
                folder=os.path.join("MR", str(chaos_id), "T2SPIR"),
                dicom={"": rng.integers(0, 900, (t2_slices, rows, columns))},
                dicom_names={"": image_names(SERIES_NUMBER["T2SPIR"], t2_slices, ".dcm")},
                positions=[(-10.0, 20.0, 3.0 + 6.0 * k) for k in range(t2_slices)],
                ground=_tiny_mr_ground_truth(t2_slices, rows, columns),
                ground_names=image_names(SERIES_NUMBER["T2SPIR"], t2_slices, ".png"),
            )
        )
    for chaos_id in ct_ids:
        ct_slices = 4
        ground = np.zeros((ct_slices, rows, columns), np.uint8)
        ground[:3, 4 : rows - 4, 3 : columns // 2] = 255
        ground[3, 5, 5] = 1
        series.append(
            ChaosSeries(
                folder=os.path.join("CT", str(chaos_id)),
                dicom={"": 1000 + rng.integers(0, 300, (ct_slices, rows, columns))},
                dicom_names={"": [f"i{k:04d},0000b.dcm" for k in range(ct_slices)]},
                positions=[(0.0, 0.0, -2.5 * k) for k in range(ct_slices)],
                ground=ground,
                ground_names=[f"liver_GT_{k:03d}.png" for k in range(ct_slices)],
                dicom_options={"modality": "CT", "intercept": -1024.0},
            )
        )
    return series


def main(argv: list[str] | None = None) -> None:
    defaults = ChaosPhantomConfig()
    parser = argparse.ArgumentParser(
        description="Write synthetic CHAOS-layout MR sets: DICOM series and ground-truth PNG stacks."
    )
    parser.add_argument("output", help="folder to write Train_Sets, Test_Sets and Test_Sets_reference into")
    parser.add_argument("--num_train", type=int, default=4, help="training cases (default: 4)")
    parser.add_argument("--num_test", type=int, default=2, help="test cases (default: 2)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=list(defaults.shape), metavar=("SLICES", "ROWS", "COLS")
    )
    parser.add_argument(
        "--spacing",
        type=float_in_range(0.0, None, low_open=True),
        nargs=3,
        default=list(defaults.spacing),
        metavar=("SD", "SH", "SW"),
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
