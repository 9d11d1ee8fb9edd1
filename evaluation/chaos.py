"""CHAOS challenge tools: convert the download to nnU-Net, export predictions as a submission, score locally.

    pumit_chaos convert CHAOS_FOLDER NNUNET_RAW [--t1dual_id 301] [--t2spir_id 302] [--ct_id 303] [-np N]
    pumit_chaos export SUBMISSION_FOLDER --pred DATASET_FOLDER PRED_FOLDER [--pred ...] [--zip submission.zip]
    pumit_chaos score RESULTS_FOLDER CHAOS_FOLDER [-o scores.json]

``CHAOS_FOLDER`` holds ``MR/<id>/...`` and / or ``CT/<id>/...`` as in the CHAOS download (the training or the
test set; cases without ``Ground`` folders go to ``imagesTs``). ``convert`` writes up to three nnU-Net raw
datasets: ``Dataset301_CHAOS_MR_T1DUAL`` (in-phase ``_0000`` and out-phase ``_0001``, one ground truth),
``Dataset302_CHAOS_MR_T2SPIR`` and ``Dataset303_CHAOS_CT``. Each converted case keeps the DICOM files'
file-name order as its slice order (never ITK's position order) and gets a record
``<dataset>/chaos_mapping/<case>.json`` naming those files, which ``export`` uses to write exactly one PNG
per DICOM file, in that order, with the DICOM's rows and columns.

``export`` takes nnU-Net predictions of converted cases (``nnUNetv2_predict`` on ``imagesTs``) and writes
``Task1``..``Task5`` as the available modalities allow (CT -> Task2; MR -> Tasks 3 and 5; both -> all five),
MR grey values 63 / 126 / 189 / 252 (liver only, 63, in Tasks 1 and 3), CT liver 255, and a zip with the
Task folders at its root. A predicted label that no CHAOS organ of the modality has is an error naming the
file (``--allow_unknown_labels`` exports it as background and lists it in ``export_summary.json``); an
existing output folder or zip is replaced only with ``--overwrite``. ``score`` compares a results tree with
the ground-truth PNG stacks under the official CHAOS conventions (``metrics`` module, convention ``chaos``)
and scores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import zipfile
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from pumit_seg.atomic import atomic_folder, atomic_path, write_grey_png_atomic, write_json_atomic
from pumit_seg.cli_checks import check_output_path, exit_on_bad_input, int_in_range
from pumit_seg.data.readers import read_image
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
)
from pumit_seg.evaluation.metrics import chaos_scores, compute_label_metrics

FILE_ENDING = ".nii.gz"
MAPPING_FOLDER = "chaos_mapping"
DEFAULT_DATASET_IDS = {"T1DUAL": 301, "T2SPIR": 302, "CT": 303}
JOINT_MR = "MR"  # dataset key of --joint_mr: T1DUAL and T2SPIR in one dataset
DEFAULT_JOINT_MR_ID = 304
JOINT_MR_NUM_CHANNELS = 2
DATASET_NAMES = {
    "T1DUAL": "CHAOS_MR_T1DUAL",
    "T2SPIR": "CHAOS_MR_T2SPIR",
    "CT": "CHAOS_CT",
    JOINT_MR: "CHAOS_MR",
}
SUMMARY_FILE = "conversion_summary.json"
MAX_PROCESSES = 256
# nnU-Net picks the normalisation by channel name: "CT" -> CT normalisation, anything else z-score
CHANNEL_NAMES = {
    "T1DUAL": {"0": "T1_InPhase", "1": "T1_OutPhase"},
    "T2SPIR": {"0": "T2SPIR"},
    "CT": {"0": "CT"},
    JOINT_MR: {"0": "T1_InPhase_or_T2SPIR", "1": "T1_OutPhase_or_T2SPIR"},
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


def find_cases(chaos_root: str, skip_incomplete: bool = False) -> tuple[list[ChaosCase], list[str]]:
    """Every CT and MR series under `chaos_root` (a CHAOS training or test folder), and the skipped ones.

    Every patient folder must hold complete series: MR both sequences (T1DUAL with both phases), CT its
    DICOM folder; and either every series has a Ground folder (training set) or none has (test set).
    Anything else is an error naming the missing folder, unless `skip_incomplete`, which skips those
    series and returns them (as "folder: what is missing") to be listed in the conversion summary.
    """
    cases, problems = [], []
    for modality, sequences in (("MR", MR_SEQUENCES), ("CT", ("CT",))):
        modality_folder = os.path.join(chaos_root, modality)
        if not os.path.isdir(modality_folder):
            continue
        for chaos_id in _sorted_ids(modality_folder):
            for sequence in sequences:
                ground, dicom_folders = reference_folders(chaos_root, modality, chaos_id, sequence)
                missing = [f for f in dicom_folders if not os.path.isdir(f)]
                if missing:
                    problems.append(f"{missing[0]}: DICOM folder missing")
                    continue
                cases.append(
                    ChaosCase(
                        modality, sequence, chaos_id, dicom_folders, ground if os.path.isdir(ground) else None
                    )
                )
    if any(c.ground_folder is not None for c in cases):  # a training set: every series needs its Ground
        for case in [c for c in cases if c.ground_folder is None]:
            ground, _ = reference_folders(chaos_root, case.modality, case.chaos_id, case.sequence)
            problems.append(f"{ground}: Ground folder missing (other series of this folder have one)")
            cases.remove(case)
    if problems and not skip_incomplete:
        raise FileNotFoundError(
            f"incomplete CHAOS folder {chaos_root}: " + "; ".join(problems) + " (pass --skip_incomplete to "
            "convert the complete series only; the skipped ones are then listed in conversion_summary.json)"
        )
    if not cases:
        raise FileNotFoundError(
            f"no CHAOS series under {chaos_root}: expected MR/<id>/T1DUAL/DICOM_anon/InPhase, "
            "MR/<id>/T2SPIR/DICOM_anon or CT/<id>/DICOM_anon"
        )
    return cases, problems


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


def joint_case_name(case: ChaosCase) -> str:
    return f"{case.case_name}_{case.sequence}"


def dataset_folder_name(sequence: str, dataset_id: int) -> str:
    return f"Dataset{dataset_id:03d}_{DATASET_NAMES[sequence]}"


def convert_case(case: ChaosCase, dataset_folder: str, chaos_root: str, joint_mr: bool = False) -> dict:
    """Convert one series; returns (and writes) its mapping record.

    With `joint_mr` (one MR dataset of both sequences) the case is named ``CHAOS_<id>_<sequence>`` and a
    T2SPIR series is written twice, so that both sequences have the two channels of T1DUAL."""
    channels, geometry = [], None
    dicom_folders = list(case.dicom_folders)
    if joint_mr and len(dicom_folders) == 1:
        dicom_folders = dicom_folders * JOINT_MR_NUM_CHANNELS  # replicated, as the reference trained
    for folder in dicom_folders:
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
    name = joint_case_name(case) if joint_mr else case.case_name
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
        "dataset": JOINT_MR if joint_mr and case.modality == "MR" else case.sequence,
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
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    modality = "CT" if sequence == "CT" else "MR"
    labels = {"background": 0, **{organ: values[0] for organ, values in organs_of(modality).items()}}
    labels_folder = os.path.join(dataset_folder, "labelsTr")
    num_training = len(sorted_files(labels_folder, FILE_ENDING)) if os.path.isdir(labels_folder) else 0
    if sequence == JOINT_MR:
        description = "CHAOS MR, T1DUAL (in / out phase) and T2SPIR (replicated to 2 channels) in one dataset"
    else:
        description = f"CHAOS {modality} {sequence if modality == 'MR' else ''}".strip()
    # nnU-Net's own writer; the folder is being built beside its place, so the file appears atomically with it
    generate_dataset_json(
        dataset_folder,
        channel_names=CHANNEL_NAMES[sequence],
        labels=labels,
        num_training_cases=num_training,
        file_ending=FILE_ENDING,
        dataset_name=DATASET_NAMES[sequence],
        reference="CHAOS challenge, https://chaos.grand-challenge.org",
        description=description + "; slices in DICOM file-name order, see chaos_mapping/",
        license="see the CHAOS challenge's data terms",
        converted_by="pumit_chaos convert",
    )


SPLIT_FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs",)}


def _clear_split(dataset_folder: str, split: str) -> None:
    """Remove one split's images, labels and records (a re-conversion replaces them, nothing stale survives)."""
    for sub in SPLIT_FOLDERS[split]:
        shutil.rmtree(os.path.join(dataset_folder, sub), ignore_errors=True)
    mapping = os.path.join(dataset_folder, MAPPING_FOLDER)
    if os.path.isdir(mapping):
        for name in os.listdir(mapping):
            with open(os.path.join(mapping, name)) as f:
                if json.load(f).get("split") == split:
                    os.remove(os.path.join(mapping, name))


def convert(
    chaos_root: str,
    nnunet_raw: str,
    dataset_ids: dict | None = None,
    num_processes: int = 1,
    skip_incomplete: bool = False,
    joint_mr: bool = False,
) -> dict:
    """Convert every series under `chaos_root`; returns {dataset key: dataset folder}.

    Dataset keys: ``T1DUAL``, ``T2SPIR``, ``CT``, or with `joint_mr` ``MR`` (both sequences, 2 channels)
    and ``CT``. Each dataset is built beside its folder and swapped in only when every dataset of this
    run is complete: a failure leaves ``nnunet_raw`` untouched. Converting into an existing dataset
    replaces the split(s) converted now (training: imagesTr / labelsTr; test: imagesTs) and keeps the
    other, so ``convert Train_Sets`` then ``convert Test_Sets`` fill one dataset.
    """
    dataset_ids = {**DEFAULT_DATASET_IDS, JOINT_MR: DEFAULT_JOINT_MR_ID, **(dataset_ids or {})}
    chaos_root = os.path.abspath(chaos_root)
    cases, skipped = find_cases(chaos_root, skip_incomplete)

    def key_of(case: ChaosCase) -> str:
        return JOINT_MR if joint_mr and case.modality == "MR" else case.sequence

    keys = sorted({key_of(c) for c in cases})
    folders = {k: os.path.join(nnunet_raw, dataset_folder_name(k, dataset_ids[k])) for k in keys}
    with contextlib.ExitStack() as stack:
        building = {k: stack.enter_context(atomic_folder(folders[k], keep_existing=True)) for k in keys}
        for key in keys:
            for split in sorted({"train" if c.ground_folder else "test" for c in cases if key_of(c) == key}):
                _clear_split(building[key], split)
        arguments = [(c, building[key_of(c)], chaos_root, joint_mr) for c in cases]
        if num_processes <= 1:
            records = [convert_case(*a) for a in tqdm(arguments, desc="CHAOS series", unit="series")]
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
                records = pool.starmap(convert_case, arguments)
        for key in keys:
            write_dataset_json(building[key], key)
            write_json_atomic(
                os.path.join(building[key], SUMMARY_FILE),
                {
                    "chaos_folder": chaos_root,
                    "converted": [r["case"] for r in records if r["dataset"] == key],
                    "skipped": skipped,
                },
            )
    for problem in skipped:
        print(f"skipped (--skip_incomplete): {problem}")
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


def read_prediction(path: str, record: dict, allow_unknown_labels: bool = False) -> tuple[np.ndarray, list]:
    """The prediction's label map and its label values that no organ of its modality has.

    A value outside the modality's organs (or a non-integer one) would silently become background in the
    submission: it is an error naming the file and the labels unless `allow_unknown_labels`."""
    labels = read_image(path).array  # a truncated or damaged prediction is an error naming the file
    expected = (record["num_slices"], record["rows"], record["columns"])
    if labels.shape != expected:
        raise ValueError(
            f"prediction {path} has shape {labels.shape}, the DICOM series {record['dicom_folders'][0]} "
            f"has {expected} (slices, rows, columns)"
        )
    known = {0, *(label for label, *_ in organs_of(record["modality"]).values())}
    unknown = sorted(v for v in np.unique(labels).tolist() if v not in known)
    if unknown and not allow_unknown_labels:
        shown = ", ".join(f"{v:g}" for v in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise ValueError(
            f"prediction {path} holds label {shown}, not a CHAOS {record['modality']} label "
            f"(known: {', '.join(map(str, sorted(known)))}); pass --allow_unknown_labels to export such voxels "
            "as background (they are then listed in export_summary.json)"
        )
    return labels, [int(v) if float(v).is_integer() else float(v) for v in unknown]


def dataset_records(dataset_folder: str) -> dict[str, dict]:
    """{case: record} of every converted case of a dataset (its chaos_mapping folder)."""
    mapping = os.path.join(dataset_folder, MAPPING_FOLDER)
    if not os.path.isdir(mapping):
        raise FileNotFoundError(
            f"{mapping} does not exist; was {dataset_folder} written by pumit_chaos convert?"
        )
    return {
        n[: -len(".json")]: load_record(dataset_folder, n[: -len(".json")])
        for n in sorted(os.listdir(mapping))
        if n.endswith(".json")
    }


def export_submission(
    predictions: list[tuple[str, str]],
    output_folder: str,
    zip_file: str | None = None,
    allow_missing: bool = False,
    allow_unknown_labels: bool = False,
) -> list[int]:
    """Write the Task folders for [(converted dataset folder, nnU-Net prediction folder), ...]; returns the tasks.

    Every test case of each dataset (its imagesTs) must have a prediction, or the export fails naming the
    missing ones (`allow_missing` exports the rest and lists them in ``export_summary.json``). The whole
    output folder is built beside its place and swapped in when complete (with the zip): a failure leaves
    an earlier submission as it was, and a new one holds no file of an earlier export. A prediction label
    that no organ of its modality has is an error naming the file (`allow_unknown_labels` exports it as
    background and lists it in ``export_summary.json``).
    """
    if zip_file and os.path.abspath(zip_file).startswith(os.path.abspath(output_folder) + os.sep):
        raise ValueError(
            f"--zip {zip_file} lies inside the output folder {output_folder}, which is replaced as a whole"
        )
    items, missing = [], []
    for dataset_folder, prediction_folder in predictions:
        records = dataset_records(dataset_folder)
        if not os.path.isdir(prediction_folder):
            raise FileNotFoundError(f"prediction folder {prediction_folder} does not exist")
        names = sorted(
            n for n in os.listdir(prediction_folder) if n.endswith(FILE_ENDING) and not n.startswith(".")
        )
        predicted = {name[: -len(FILE_ENDING)] for name in names}
        missing += [
            f"{case} ({os.path.join(prediction_folder, case + FILE_ENDING)})"
            for case, record in records.items()
            if record["split"] == "test" and case not in predicted
        ]
        for name in names:
            items.append(
                (
                    os.path.join(prediction_folder, name),
                    load_record(dataset_folder, name[: -len(FILE_ENDING)]),
                )
            )
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"no prediction for test case(s) {', '.join(missing)}; a submission must cover every test case "
            "(pass --allow_missing to export the others; they are then listed in export_summary.json)"
        )
    if not items:
        raise FileNotFoundError(f"no predictions ending in {FILE_ENDING} in {[p for _, p in predictions]}")
    tasks = tasks_for({record["modality"] for _, record in items})
    unknown_labels = {}
    with atomic_folder(output_folder) as building:
        for path, record in tqdm(items, desc="CHAOS export", unit="case"):
            labels, unknown = read_prediction(path, record, allow_unknown_labels)
            if unknown:
                unknown_labels[path] = unknown
            names = png_names(len(labels))
            for task in tasks:
                liver_only, needed = TASKS[task]
                if record["modality"] not in needed:
                    continue
                folder = results_folder(os.path.join(building, f"Task{task}"), record)
                os.makedirs(folder)
                grey = labels_to_grey(labels, record["modality"], liver_only)
                for name, slice_grey in zip(names, grey, strict=True):
                    write_grey_png_atomic(os.path.join(folder, name), slice_grey)
        write_json_atomic(
            os.path.join(building, "export_summary.json"),
            {
                "exported": [p for p, _ in items],
                "missing_predictions": missing,
                "unknown_labels": unknown_labels,
                "tasks": tasks,
            },
        )
        if zip_file:
            write_zip(building, [f"Task{t}" for t in tasks], zip_file)
    for case in missing:
        print(f"not exported (--allow_missing): {case}")
    for path, unknown in unknown_labels.items():
        print(f"unknown labels exported as background (--allow_unknown_labels): {path}: {unknown}")
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
    """CHAOS metrics and scores per organ of one series; an organ absent from both masks has no row."""
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
        convention="chaos",
        index_to_mm=geometry.index_to_mm(),  # the full inter-slice vector, tilted or not, as CHAOS does
    )
    rows = []
    for organ, (label, *_) in organs.items():
        m = metrics[label]
        if m["n_ref"] == 0 and m["n_pred"] == 0:
            continue  # absent from both: nothing to score, left out of the mean (not a 0)
        values = {"DICE": m["Dice"], "RAVD": m["RAVD"], "ASSD": m["ASSD"], "MSSD": m["HD"]}
        rows.append({"organ": organ, **values, **chaos_scores(*values.values())})
    return rows


def expected_series(chaos_root: str, modalities) -> list[tuple[str, str, str]]:
    """(modality, chaos id, sequence) of every series with a ground truth under `chaos_root`."""
    cases, _ = find_cases(chaos_root, skip_incomplete=True)
    return [
        (c.modality, c.chaos_id, c.sequence) for c in cases if c.ground_folder and c.modality in modalities
    ]


def score_results(
    results_root: str, chaos_root: str, output_file: str | None = None, allow_missing: bool = False
) -> dict:
    """Score every Task folder of a results tree against the CHAOS ground truths; returns {task: {...}}.

    A task's score is the mean of the per-series, per-organ scores (each the mean of the four metric
    scores); metrics are averaged the same way. A Task folder must hold every series of its modalities
    that has a ground truth under `chaos_root`, or scoring fails naming the missing ones
    (`allow_missing` scores the others and lists them under ``missing``).
    """
    tasks = [t for t in TASKS if os.path.isdir(os.path.join(results_root, f"Task{t}"))]
    if not tasks:
        raise FileNotFoundError(f"no Task1..Task5 folders in {results_root}")
    scores, all_missing = {}, []
    for task in tasks:
        liver_only, modalities = TASKS[task]
        task_folder = os.path.join(results_root, f"Task{task}")
        found = find_results(task_folder)
        present = {(m, i, s) for m, i, s, _ in found}
        missing = [
            os.path.join(f"Task{task}", *((m, i, "Results") if m == "CT" else (m, i, s, "Results")))
            for m, i, s in expected_series(chaos_root, modalities)
            if (m, i, s) not in present
        ]
        all_missing += missing
        rows = []
        for modality, chaos_id, sequence, folder in found:
            ground, dicom_folders = reference_folders(chaos_root, modality, chaos_id, sequence)
            if not os.path.isdir(ground):
                raise FileNotFoundError(f"{folder} has no ground truth: {ground} does not exist")
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
        scores[f"Task{task}"] = {
            "series": rows,
            "mean": mean,
            "score": mean.get("score", float("nan")),
            "missing": missing,
        }
    if all_missing and not allow_missing:
        raise FileNotFoundError(
            f"{results_root} lacks series that have a ground truth in {chaos_root}: {', '.join(all_missing)} "
            "(pass --allow_missing to score the others; they are then listed under 'missing')"
        )
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
            type=int_in_range(1, 999),
            default=dataset_id,
            help=f"dataset id (default {dataset_id})",
        )
    p.add_argument(
        "--joint_mr",
        action="store_true",
        help="one MR dataset as the paper trained: T1DUAL (in / out phase) and T2SPIR (replicated to 2 channels)",
    )
    p.add_argument("--joint-mr", dest="joint_mr", action="store_true", help=argparse.SUPPRESS)  # older spelling
    p.add_argument(
        "--mr_id",
        type=int_in_range(1, 999),
        default=DEFAULT_JOINT_MR_ID,
        help=f"dataset id of the --joint_mr dataset (default {DEFAULT_JOINT_MR_ID})",
    )
    p.add_argument(
        "--skip_incomplete",
        action="store_true",
        help="skip series with a missing DICOM or Ground folder (listed in conversion_summary.json) instead of failing",
    )
    p.add_argument(
        "-np", type=int_in_range(1, MAX_PROCESSES), default=1, help="worker processes (default 1: in-process)"
    )

    p = commands.add_parser(
        "export", help="nnU-Net predictions of converted cases -> CHAOS submission tree + zip"
    )
    p.add_argument("output_folder", help="folder to write Task1..Task5 into (replaced as a whole)")
    p.add_argument(
        "--pred",
        nargs=2,
        action="append",
        required=True,
        metavar=("DATASET_FOLDER", "PRED_FOLDER"),
        help="a converted dataset folder (with chaos_mapping/) and a folder of its predictions; repeat per dataset",
    )
    p.add_argument("--zip", default=None, help="also write this zip file (Task folders at its root)")
    p.add_argument(
        "--allow_missing",
        action="store_true",
        help="export even if test cases have no prediction (listed in export_summary.json)",
    )
    p.add_argument(
        "--allow_unknown_labels",
        action="store_true",
        help="export prediction labels that no CHAOS organ has as background instead of failing "
        "(listed in export_summary.json)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder and --zip file"
    )

    p = commands.add_parser("score", help="score a results tree (Task folders) against CHAOS ground truths")
    p.add_argument("results_folder", help="folder holding Task1..Task5")
    p.add_argument("chaos_folder", help="CHAOS training folder with the Ground PNGs and DICOM_anon folders")
    p.add_argument("-o", default=None, help="write the scores to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.add_argument(
        "--allow_missing",
        action="store_true",
        help="score even if series with a ground truth have no results (listed under 'missing')",
    )

    args = parser.parse_args(argv)
    with exit_on_bad_input(parser):
        if args.command == "convert":
            # the datasets are updated in place (a conversion replaces the splits it converts)
            check_output_path(args.nnunet_raw, is_dir=True, overwrite=True, inputs=[args.chaos_folder],
                              option="NNUNET_RAW")  # fmt: skip
            ids = {sequence: getattr(args, f"{sequence.lower()}_id") for sequence in DEFAULT_DATASET_IDS}
            ids[JOINT_MR] = args.mr_id
            folders = convert(
                args.chaos_folder, args.nnunet_raw, ids, args.np, args.skip_incomplete, args.joint_mr
            )
            for key, folder in folders.items():
                print(f"{key}: {folder}")
        elif args.command == "export":
            inputs = [folder for pair in args.pred for folder in pair]
            check_output_path(args.output_folder, is_dir=True, overwrite=args.overwrite, inputs=inputs,
                              option="OUTPUT_FOLDER", replaced=True)  # fmt: skip
            if args.zip:
                check_output_path(args.zip, overwrite=args.overwrite, inputs=inputs, option="--zip")
            tasks = export_submission(
                [tuple(p) for p in args.pred],
                args.output_folder,
                args.zip,
                args.allow_missing,
                args.allow_unknown_labels,
            )
            print(
                f"wrote {', '.join(f'Task{t}' for t in tasks)} into {args.output_folder}"
                + (f" and {args.zip}" if args.zip else "")
            )
        else:
            if args.o:
                check_output_path(args.o, overwrite=args.overwrite,
                                  inputs=[args.results_folder, args.chaos_folder])  # fmt: skip
            scores = score_results(args.results_folder, args.chaos_folder, args.o, args.allow_missing)
            for task, result in scores.items():
                mean = result["mean"]
                if not mean:
                    print(f"{task}: nothing to score")
                    continue
                print(
                    f"{task}: score {result['score']:.2f}  DICE {mean['DICE']:.4f}  RAVD {mean['RAVD']:.3f}%  "
                    f"ASSD {mean['ASSD']:.3f} mm  MSSD {mean['MSSD']:.3f} mm  ({len(result['series'])} organ series)"
                    + (f"  MISSING {', '.join(result['missing'])}" if result["missing"] else "")
                )


if __name__ == "__main__":
    main()
