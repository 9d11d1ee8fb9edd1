"""CHAOS challenge tools: convert the download to nnU-Net, export predictions as a submission, score locally.

    pumit_chaos convert CHAOS_FOLDER NNUNET_RAW [--t1dual_id 301] [--t2spir_id 302] [--ct_id 303] [-np N]
    pumit_chaos export SUBMISSION_FOLDER --pred DATASET_FOLDER PRED_FOLDER [--pred ...] [--zip submission.zip]
    pumit_chaos score RESULTS_FOLDER CHAOS_FOLDER [-o scores.json]

``CHAOS_FOLDER`` holds ``MR/<id>/...`` and / or ``CT/<id>/...`` as in SPEC section 10 (the training or the
test set; cases without ``Ground`` folders go to ``imagesTs``). ``convert`` writes up to three nnU-Net raw
datasets: ``Dataset301_CHAOS_MR_T1DUAL`` (in-phase ``_0000`` and out-phase ``_0001``, one ground truth),
``Dataset302_CHAOS_MR_T2SPIR`` and ``Dataset303_CHAOS_CT``. Each converted case keeps the DICOM files'
file-name order as its slice order (never ITK's position order) and gets a record
``<dataset>/chaos_mapping/<case>.json`` naming those files, which ``export`` uses to write exactly one PNG
per DICOM file, in that order, with the DICOM's rows and columns.

``export`` takes nnU-Net predictions of converted cases (``nnUNetv2_predict`` on ``imagesTs``) and writes
``Task1``..``Task5`` as the available modalities allow (CT -> Task2; MR -> Tasks 3 and 5; both -> all five),
MR grey values 63 / 126 / 189 / 252 (liver only, 63, in Tasks 1 and 3), CT liver 255, and a zip with the
Task folders at its root. ``score`` compares a results tree with the ground-truth PNG stacks under the
official CHAOS conventions (``metrics`` module, convention ``chaos``) and scores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import zipfile
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pumit_seg.evaluation.chaos_io import (
    MR_SEQUENCES,
    T1DUAL_PHASES,
    DicomGeometry,
    grey_to_labels,
    labels_to_grey,
    organs_of,
    read_dicom_geometry,
    read_dicom_series,
    read_png_stack,
    sorted_files,
    write_png,
)
from pumit_seg.evaluation.metrics import chaos_scores, compute_label_metrics

from pumit_seg.atomic import atomic_path, write_json_atomic

FILE_ENDING = ".nii.gz"
MAPPING_FOLDER = "chaos_mapping"
DEFAULT_DATASET_IDS = {"T1DUAL": 301, "T2SPIR": 302, "CT": 303}
DATASET_NAMES = {"T1DUAL": "CHAOS_MR_T1DUAL", "T2SPIR": "CHAOS_MR_T2SPIR", "CT": "CHAOS_CT"}
# nnU-Net picks the normalisation by channel name: "CT" -> CT normalisation, anything else z-score
CHANNEL_NAMES = {
    "T1DUAL": {"0": "T1_InPhase", "1": "T1_OutPhase"},
    "T2SPIR": {"0": "T2SPIR"},
    "CT": {"0": "CT"},
}
# task: (liver only?, modalities it needs)
TASKS = {
    1: (True, ("CT", "MR")),
    2: (True, ("CT",)),
    3: (True, ("MR",)),
    4: (False, ("CT", "MR")),
    5: (False, ("MR",)),
}


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class ChaosCase:
    """One series of the CHAOS layout: CT, or an MR sequence (T1DUAL / T2SPIR) of one patient."""

    modality: str  # "CT" or "MR"
    sequence: str  # "CT", "T1DUAL" or "T2SPIR" (also the key of the converted dataset)
    chaos_id: str
    dicom_folders: list[str]  # one per channel; the first defines the geometry
    ground_folder: str | None  # None in test sets

    @property
    def case_name(self) -> str:
        return case_name(self.chaos_id)


def case_name(chaos_id: str) -> str:
    return f"CHAOS_{int(chaos_id):03d}" if chaos_id.isdigit() else f"CHAOS_{chaos_id}"


def _sorted_ids(folder: str) -> list[str]:
    ids = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)) and not n.startswith(".")]
    return sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))


def reference_folders(chaos_root: str, modality: str, chaos_id: str, sequence: str) -> tuple[str, list[str]]:
    """(Ground folder, DICOM folders in channel order) of one series in the CHAOS layout."""
    if modality == "CT":
        base = os.path.join(chaos_root, "CT", chaos_id)
        return os.path.join(base, "Ground"), [os.path.join(base, "DICOM_anon")]
    base = os.path.join(chaos_root, "MR", chaos_id, sequence)
    dicom = os.path.join(base, "DICOM_anon")
    if sequence == "T1DUAL":
        return os.path.join(base, "Ground"), [os.path.join(dicom, phase) for phase in T1DUAL_PHASES]
    return os.path.join(base, "Ground"), [dicom]


def find_cases(chaos_root: str) -> list[ChaosCase]:
    """Every CT and MR series under `chaos_root` (a CHAOS training or test folder)."""
    cases = []
    for modality, sequences in (("MR", MR_SEQUENCES), ("CT", ("CT",))):
        modality_folder = os.path.join(chaos_root, modality)
        if not os.path.isdir(modality_folder):
            continue
        for chaos_id in _sorted_ids(modality_folder):
            for sequence in sequences:
                ground, dicom_folders = reference_folders(chaos_root, modality, chaos_id, sequence)
                if not all(os.path.isdir(f) for f in dicom_folders):
                    continue
                cases.append(
                    ChaosCase(
                        modality, sequence, chaos_id, dicom_folders, ground if os.path.isdir(ground) else None
                    )
                )
    if not cases:
        raise FileNotFoundError(
            f"no CHAOS series under {chaos_root}: expected MR/<id>/T1DUAL/DICOM_anon/InPhase, "
            "MR/<id>/T2SPIR/DICOM_anon or CT/<id>/DICOM_anon"
        )
    return cases


# ---------------------------------------------------------------------------------------------- convert


def write_nifti(array: np.ndarray, geometry: DicomGeometry, path: str) -> None:
    """Write a (slice, row, column) array with the series geometry, atomically."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(geometry.spacing_zyx)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, useCompression=True)


def _image_dtype(pixels: np.ndarray) -> np.ndarray:
    # integer grey values (raw MR, CT in HU) are stored as int16 when they fit, others as float32
    if np.array_equal(pixels, np.rint(pixels)) and pixels.min() >= -32768 and pixels.max() <= 32767:
        return pixels.astype(np.int16)
    return pixels.astype(np.float32)


def dataset_folder_name(sequence: str, dataset_id: int) -> str:
    return f"Dataset{dataset_id:03d}_{DATASET_NAMES[sequence]}"


def convert_case(case: ChaosCase, dataset_folder: str, chaos_root: str) -> dict:
    """Convert one series; returns (and writes) its mapping record."""
    channels, geometry = [], None
    for folder in case.dicom_folders:
        pixels, channel_geometry = read_dicom_series(folder)
        if geometry is None:
            geometry = channel_geometry
        elif pixels.shape != channels[0].shape:
            raise ValueError(
                f"{folder} has {pixels.shape} (slices, rows, columns), {case.dicom_folders[0]} has {channels[0].shape}"
            )
        channels.append(_image_dtype(pixels))
    split = "train" if case.ground_folder is not None else "test"
    images_folder = os.path.join(dataset_folder, "imagesTr" if split == "train" else "imagesTs")
    os.makedirs(images_folder, exist_ok=True)
    name = case.case_name
    record_path = os.path.join(dataset_folder, MAPPING_FOLDER, f"{name}.json")
    source = os.path.relpath(case.dicom_folders[0], chaos_root)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            existing = json.load(f)
        if existing["split"] != split:
            raise ValueError(
                f"{record_path} already records {name} from the {existing['split']} set; CHAOS id {case.chaos_id} of "
                f"{chaos_root} would overwrite it (convert training and test sets into different datasets)"
            )
    for channel, pixels in enumerate(channels):
        write_nifti(pixels, geometry, os.path.join(images_folder, f"{name}_{channel:04d}{FILE_ENDING}"))
    ground_files = None
    if case.ground_folder is not None:
        grey, ground_files = read_png_stack(case.ground_folder)
        expected = (len(geometry.files), geometry.rows, geometry.columns)
        if grey.shape != expected:
            raise ValueError(
                f"{case.ground_folder} holds {grey.shape} (PNGs, rows, columns); the DICOM series "
                f"{case.dicom_folders[0]} has {expected}"
            )
        labels_folder = os.path.join(dataset_folder, "labelsTr")
        os.makedirs(labels_folder, exist_ok=True)
        write_nifti(
            grey_to_labels(grey, case.modality), geometry, os.path.join(labels_folder, f"{name}{FILE_ENDING}")
        )
    record = {
        "case": name,
        "modality": case.modality,
        "sequence": case.sequence,
        "chaos_id": case.chaos_id,
        "split": split,
        "dicom_folders": [os.path.relpath(f, chaos_root) for f in case.dicom_folders],
        "source": source,
        "ground_files": ground_files,
        **geometry.to_json(),
    }
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    write_json_atomic(record_path, record)
    return record


def write_dataset_json(dataset_folder: str, sequence: str) -> None:
    modality = "CT" if sequence == "CT" else "MR"
    labels = {"background": 0, **{organ: values[0] for organ, values in organs_of(modality).items()}}
    labels_folder = os.path.join(dataset_folder, "labelsTr")
    num_training = len(sorted_files(labels_folder, FILE_ENDING)) if os.path.isdir(labels_folder) else 0
    write_json_atomic(
        os.path.join(dataset_folder, "dataset.json"),
        {
            "channel_names": CHANNEL_NAMES[sequence],
            "labels": labels,
            "numTraining": num_training,
            "file_ending": FILE_ENDING,
            "name": DATASET_NAMES[sequence],
            "reference": "CHAOS challenge, https://chaos.grand-challenge.org",
            "description": f"CHAOS {modality} {sequence if modality == 'MR' else ''}".strip()
            + "; slices in DICOM file-name order, see chaos_mapping/",
        },
    )


def convert(
    chaos_root: str, nnunet_raw: str, dataset_ids: dict | None = None, num_processes: int = 1
) -> dict:
    """Convert every series under `chaos_root`; returns {sequence: dataset folder}."""
    dataset_ids = {**DEFAULT_DATASET_IDS, **(dataset_ids or {})}
    chaos_root = os.path.abspath(chaos_root)
    cases = find_cases(chaos_root)
    folders = {
        c.sequence: os.path.join(nnunet_raw, dataset_folder_name(c.sequence, dataset_ids[c.sequence]))
        for c in cases
    }
    arguments = [(c, folders[c.sequence], chaos_root) for c in cases]
    if num_processes <= 1:
        for a in arguments:
            convert_case(*a)
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
            pool.starmap(convert_case, arguments)
    for sequence, folder in folders.items():
        write_dataset_json(folder, sequence)
    return folders


# ----------------------------------------------------------------------------------------------- export


def load_record(dataset_folder: str, case: str) -> dict:
    path = os.path.join(dataset_folder, MAPPING_FOLDER, f"{case}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no CHAOS mapping record {path} for prediction {case}; was {dataset_folder} written by pumit_chaos convert?"
        )
    with open(path) as f:
        return json.load(f)


def tasks_for(modalities: set[str]) -> list[int]:
    """The tasks a set of predicted modalities can fill."""
    return [task for task, (_, needed) in TASKS.items() if all(m in modalities for m in needed)]


def results_folder(task_folder: str, record: dict) -> str:
    if record["modality"] == "CT":
        return os.path.join(task_folder, "CT", record["chaos_id"], "Results")
    return os.path.join(task_folder, "MR", record["chaos_id"], record["sequence"], "Results")


def png_names(num_slices: int) -> list[str]:
    width = max(3, len(str(num_slices - 1)))
    return [f"img{k:0{width}d}.png" for k in range(num_slices)]


def read_prediction(path: str, record: dict) -> np.ndarray:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(path))
    expected = (record["num_slices"], record["rows"], record["columns"])
    if labels.shape != expected:
        raise ValueError(
            f"prediction {path} has shape {labels.shape}, the DICOM series {record['dicom_folders'][0]} "
            f"has {expected} (slices, rows, columns)"
        )
    return labels


def export_submission(
    predictions: list[tuple[str, str]], output_folder: str, zip_file: str | None = None
) -> list[int]:
    """Write the Task folders for [(converted dataset folder, nnU-Net prediction folder), ...]; returns the tasks."""
    items = []
    for dataset_folder, prediction_folder in predictions:
        for name in sorted_files(prediction_folder, FILE_ENDING):
            record = load_record(dataset_folder, name[: -len(FILE_ENDING)])
            items.append((os.path.join(prediction_folder, name), record))
    tasks = tasks_for({record["modality"] for _, record in items})
    for path, record in items:
        labels = read_prediction(path, record)
        names = png_names(len(labels))
        for task in tasks:
            liver_only, needed = TASKS[task]
            if record["modality"] not in needed:
                continue
            folder = results_folder(os.path.join(output_folder, f"Task{task}"), record)
            if os.path.isdir(folder):
                shutil.rmtree(folder)  # stale slices of an earlier export must not survive
            os.makedirs(folder)
            grey = labels_to_grey(labels, record["modality"], liver_only)
            for name, slice_grey in zip(names, grey, strict=True):
                write_png(os.path.join(folder, name), slice_grey)
    if zip_file:
        write_zip(output_folder, [f"Task{t}" for t in tasks], zip_file)
    return tasks


def write_zip(output_folder: str, task_folders: list[str], zip_file: str) -> None:
    """Zip with the Task folders at its root, written atomically."""
    with atomic_path(zip_file) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for task_folder in task_folders:
            for root, dirs, files in os.walk(os.path.join(output_folder, task_folder)):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(root, name)
                    archive.write(path, os.path.relpath(path, output_folder))


# ------------------------------------------------------------------------------------------------ score


def find_results(task_folder: str) -> list[tuple[str, str, str, str]]:
    """(modality, chaos id, sequence, Results folder) of every series in a Task folder."""
    found = []
    ct_folder = os.path.join(task_folder, "CT")
    if os.path.isdir(ct_folder):
        for chaos_id in _sorted_ids(ct_folder):
            found.append(("CT", chaos_id, "CT", os.path.join(ct_folder, chaos_id, "Results")))
    mr_folder = os.path.join(task_folder, "MR")
    if os.path.isdir(mr_folder):
        for chaos_id in _sorted_ids(mr_folder):
            for sequence in MR_SEQUENCES:
                folder = os.path.join(mr_folder, chaos_id, sequence, "Results")
                if os.path.isdir(folder):
                    found.append(("MR", chaos_id, sequence, folder))
    return found


def score_series(results: str, ground: str, dicom: str, modality: str, liver_only: bool) -> list[dict]:
    """CHAOS metrics and scores per organ of one series."""
    reference_grey, _ = read_png_stack(ground)
    result_grey, _ = read_png_stack(results)
    if result_grey.shape != reference_grey.shape:
        raise ValueError(
            f"{results} holds {result_grey.shape} (PNGs, rows, columns), {ground} {reference_grey.shape}"
        )
    geometry = read_dicom_geometry(dicom)
    if len(geometry.files) != len(reference_grey):
        raise ValueError(
            f"{ground} holds {len(reference_grey)} PNGs, {dicom} {len(geometry.files)} DICOM files"
        )
    organs = {o: v for o, v in organs_of(modality).items() if o == "liver" or not liver_only}
    metrics = compute_label_metrics(
        grey_to_labels(reference_grey, modality),
        grey_to_labels(result_grey, modality),
        [label for label, *_ in organs.values()],
        geometry.spacing_zyx,
        convention="chaos",
    )
    rows = []
    for organ, (label, *_) in organs.items():
        m = metrics[label]
        values = {"DICE": m["Dice"], "RAVD": m["RAVD"], "ASSD": m["ASSD"], "MSSD": m["HD"]}
        rows.append({"organ": organ, **values, **chaos_scores(*values.values())})
    return rows


def score_results(results_root: str, chaos_root: str, output_file: str | None = None) -> dict:
    """Score every Task folder of a results tree against the CHAOS ground truths; returns {task: {...}}.

    A task's score is the mean of the per-series, per-organ scores (each the mean of the four metric
    scores); metrics are averaged the same way.
    """
    tasks = [t for t in TASKS if os.path.isdir(os.path.join(results_root, f"Task{t}"))]
    if not tasks:
        raise FileNotFoundError(f"no Task1..Task5 folders in {results_root}")
    scores = {}
    for task in tasks:
        liver_only, _ = TASKS[task]
        rows = []
        for modality, chaos_id, sequence, folder in find_results(os.path.join(results_root, f"Task{task}")):
            ground, dicom_folders = reference_folders(chaos_root, modality, chaos_id, sequence)
            for row in score_series(folder, ground, dicom_folders[0], modality, liver_only):
                rows.append({"modality": modality, "chaos_id": chaos_id, "sequence": sequence, **row})
        keys = [
            "DICE",
            "RAVD",
            "ASSD",
            "MSSD",
            "DICE_score",
            "RAVD_score",
            "ASSD_score",
            "MSSD_score",
            "score",
        ]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}
        scores[f"Task{task}"] = {"series": rows, "mean": mean, "score": mean.get("score", float("nan"))}
    if output_file:
        directory = os.path.dirname(os.path.abspath(output_file))
        os.makedirs(directory, exist_ok=True)
        write_json_atomic(os.path.abspath(output_file), scores)
    return scores


# -------------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="CHAOS challenge tools (convert / export / score).")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="CHAOS training or test folder -> nnU-Net raw datasets")
    p.add_argument("chaos_folder", help="folder holding MR/<id>/... and/or CT/<id>/...")
    p.add_argument("nnunet_raw", help="nnU-Net raw folder (nnUNet_raw) to write the datasets into")
    for sequence, dataset_id in DEFAULT_DATASET_IDS.items():
        p.add_argument(
            f"--{sequence.lower()}_id",
            type=int,
            default=dataset_id,
            help=f"dataset id (default {dataset_id})",
        )
    p.add_argument("-np", type=int, default=1, help="worker processes (default 1: in-process)")

    p = commands.add_parser(
        "export", help="nnU-Net predictions of converted cases -> CHAOS submission tree + zip"
    )
    p.add_argument("output_folder", help="folder to write Task1..Task5 into")
    p.add_argument(
        "--pred",
        nargs=2,
        action="append",
        required=True,
        metavar=("DATASET_FOLDER", "PRED_FOLDER"),
        help="a converted dataset folder (with chaos_mapping/) and a folder of its predictions; repeat per dataset",
    )
    p.add_argument("--zip", default=None, help="also write this zip file (Task folders at its root)")

    p = commands.add_parser("score", help="score a results tree (Task folders) against CHAOS ground truths")
    p.add_argument("results_folder", help="folder holding Task1..Task5")
    p.add_argument("chaos_folder", help="CHAOS training folder with the Ground PNGs and DICOM_anon folders")
    p.add_argument("-o", default=None, help="write the scores to this JSON file")

    args = parser.parse_args(argv)
    if args.command == "convert":
        ids = {sequence: getattr(args, f"{sequence.lower()}_id") for sequence in DEFAULT_DATASET_IDS}
        for sequence, folder in convert(args.chaos_folder, args.nnunet_raw, ids, args.np).items():
            print(f"{sequence}: {folder}")
    elif args.command == "export":
        tasks = export_submission([tuple(p) for p in args.pred], args.output_folder, args.zip)
        print(
            f"wrote {', '.join(f'Task{t}' for t in tasks)} into {args.output_folder}"
            + (f" and {args.zip}" if args.zip else "")
        )
    else:
        scores = score_results(args.results_folder, args.chaos_folder, args.o)
        for task, result in scores.items():
            mean = result["mean"]
            print(
                f"{task}: score {result['score']:.2f}  DICE {mean['DICE']:.4f}  RAVD {mean['RAVD']:.3f}%  "
                f"ASSD {mean['ASSD']:.3f} mm  MSSD {mean['MSSD']:.3f} mm  ({len(result['series'])} organ series)"
            )


if __name__ == "__main__":
    main()
