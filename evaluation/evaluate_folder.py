"""Evaluate a folder of predictions against a folder of references, nnU-Net style, with distance metrics.

    pumit_evaluate REF_FOLDER PRED_FOLDER -djfile dataset.json [-o summary.json] [--convention monai|chaos] [-np N]

Modelled on ``nnunetv2.evaluation.evaluate_predictions``: files are matched by name (the file ending comes
from dataset.json), read with the project's one reader (``pumit_seg.data.readers``: truncated files and
NaN voxels are errors naming the file), labels or regions and
the ignore label come from nnU-Net's ``LabelManager``, and ``summary.json`` has nnU-Net's layout
(``metric_per_case``, ``mean``, ``foreground_mean``) with our metric keys (see ``metrics.METRIC_KEYS``).
A ``summary.csv`` with one row per case and label (and the means) is written next to it.

Every label value in a reference or a prediction must be one of dataset.json's labels (the ignore label
included): an unknown one is an error naming the file and the label, never scored as background; with
``--allow_unknown_labels`` such voxels count as background and the files and labels are listed under
``unknown_labels`` in summary.json. An existing output needs ``--overwrite``; an output that is one of the
inputs, or cannot be written, is refused before any case is read.

Spacing comes from the reference image. Predictions must have the reference's shape, spacing, origin and
direction; anything else is refused with an error naming both files. Images whose first spatial axis has
size 1 (nnU-Net's representation of 2D data, spacing 999 on that axis) are evaluated as 2D.
Means use ``np.nanmean`` as nnU-Net does; inf (an organ missed entirely under the ``monai`` convention) makes
the mean inf, which is written as ``Infinity`` in the JSON.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, subfiles
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key, save_summary_json
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from pumit_seg.atomic import atomic_path
from pumit_seg.cli_checks import check_output_path, exit_on_bad_input, float_in_range, int_in_range
from pumit_seg.data.readers import MedicalImage, read_image
from pumit_seg.evaluation.metrics import (
    CONVENTIONS,
    COUNT_KEYS,
    DEFAULT_NSD_TOLERANCE_MM,
    METRIC_KEYS,
    check_convention,
    compute_label_metrics,
)

MAX_PROCESSES = 256  # -np beyond this is a typo
GEOMETRY_TOLERANCE = 1e-4  # mm (and direction cosines): header round-off, not real differences


class GeometryMismatchError(ValueError):
    """Reference and prediction do not share shape, spacing, origin or direction."""


def check_same_geometry(reference: MedicalImage, prediction: MedicalImage) -> None:
    """Raise GeometryMismatchError naming both files unless shapes and headers agree."""
    if reference.array.shape != prediction.array.shape:
        raise GeometryMismatchError(
            f"prediction {prediction.path} has shape {prediction.array.shape}, "
            f"reference {reference.path} has shape {reference.array.shape}"
        )
    for key in ("spacing", "origin", "direction"):
        value_ref = np.asarray(getattr(reference, key), dtype=float)
        value_pred = np.asarray(getattr(prediction, key), dtype=float)
        if not np.allclose(value_pred, value_ref, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            raise GeometryMismatchError(
                f"prediction {prediction.path} has {key} {value_pred.ravel().tolist()}, "
                f"reference {reference.path} has {key} {value_ref.ravel().tolist()}"
            )


def _as_label_map(seg: np.ndarray, filename: str) -> np.ndarray:
    if seg.ndim not in (2, 3):
        raise ValueError(
            f"{filename} has {seg.ndim} axes {seg.shape}; a segmentation is one 2D or 3D label map"
        )
    if not np.isfinite(seg).all():
        raise ValueError(f"{filename} contains NaN or inf values; it is not a segmentation")
    labels = np.rint(seg)
    if not np.array_equal(labels, seg):
        raise ValueError(f"{filename} contains non-integer values; it is not a segmentation")
    return labels.astype(np.int32)


class UnknownLabelError(ValueError):
    """A segmentation holds a label value that dataset.json does not define."""


def unknown_labels(seg: np.ndarray, known_labels) -> list[int]:
    """The label values of `seg` that are not in `known_labels`, sorted."""
    return sorted(set(np.unique(seg).tolist()).difference(int(k) for k in known_labels))


def check_known_labels(
    seg: np.ndarray, known_labels, filename: str, source: str = "dataset.json"
) -> list[int]:
    """Raise UnknownLabelError naming `filename` and the labels of `seg` missing from `known_labels`."""
    unknown = unknown_labels(seg, known_labels)
    if unknown:
        raise UnknownLabelError(
            f"{filename} holds label {', '.join(map(str, unknown))}, not defined in {source} "
            f"(known: {', '.join(map(str, sorted(int(k) for k in known_labels)))}); pass --allow_unknown_labels "
            "to count such voxels as background (they are then listed in summary.json)"
        )
    return unknown


def evaluate_case(
    reference_file: str,
    prediction_file: str,
    labels_or_regions: list,
    convention: str = "monai",
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    ignore_label: int | None = None,
    known_labels=None,
    allow_unknown_labels: bool = False,
) -> dict:
    """Metrics of one case: {'reference_file', 'prediction_file', 'spacing', 'metrics': {label: {...}}}.

    Both files go through `pumit_seg.data.readers.read_image`, so a truncated file or NaN voxels are an
    error naming the file, never zeros scored as background. With `known_labels` (every label value of
    dataset.json) a value outside them is an `UnknownLabelError` naming the file, unless
    `allow_unknown_labels`: then it counts as background and the result lists it under 'unknown_labels'
    ({file: [labels]})."""
    reference = read_image(reference_file)
    prediction = read_image(prediction_file)
    for image in (reference, prediction):
        if image.num_channels != 1:
            raise ValueError(
                f"{image.path} has {image.num_channels} channels per voxel; a segmentation has one"
            )
    check_same_geometry(reference, prediction)
    seg_ref = _as_label_map(reference.array, reference_file)
    seg_pred = _as_label_map(prediction.array, prediction_file)
    unknown = {}
    if known_labels is not None:
        for seg, filename in ((seg_ref, reference_file), (seg_pred, prediction_file)):
            labels = unknown_labels(seg, known_labels)
            if labels and not allow_unknown_labels:
                check_known_labels(seg, known_labels, filename)
            if labels:
                unknown[filename] = labels
    spacing = [float(s) for s in reference.spacing]
    if seg_ref.ndim == 3 and seg_ref.shape[0] == 1:  # nnU-Net's 2D layout: evaluate in-plane only
        seg_ref, seg_pred, spacing = seg_ref[0], seg_pred[0], spacing[1:]
    metrics = compute_label_metrics(
        seg_ref, seg_pred, labels_or_regions, spacing, convention, nsd_tolerance_mm, ignore_label
    )
    return {
        "reference_file": reference_file,
        "prediction_file": prediction_file,
        "spacing": spacing,
        "metrics": metrics,
        "unknown_labels": unknown,
    }


def match_files(
    folder_ref: str, folder_pred: str, file_ending: str, allow_missing: bool = False
) -> list[tuple[str, str]]:
    """(reference, prediction) pairs matched by file name, as nnU-Net does."""
    names_pred = subfiles(folder_pred, suffix=file_ending, join=False)
    names_ref = set(subfiles(folder_ref, suffix=file_ending, join=False))
    if not names_pred:
        raise FileNotFoundError(f"no prediction files ending in {file_ending!r} in {folder_pred}")
    without_reference = [n for n in names_pred if n not in names_ref]
    if without_reference:
        raise FileNotFoundError(f"predictions without a reference in {folder_ref}: {without_reference}")
    missing = sorted(names_ref.difference(names_pred))
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"references without a prediction in {folder_pred}: {missing} (pass --allow_missing to evaluate only the present ones)"
        )
    return [(os.path.join(folder_ref, n), os.path.join(folder_pred, n)) for n in names_pred]


def missing_predictions(folder_ref: str, folder_pred: str, file_ending: str) -> list[str]:
    names_pred = set(subfiles(folder_pred, suffix=file_ending, join=False))
    return sorted(n for n in subfiles(folder_ref, suffix=file_ending, join=False) if n not in names_pred)


def summarize(results: list[dict], labels_or_regions: list) -> dict:
    """nnU-Net's summary: per-label nanmean over cases, and the mean of those over the foreground labels."""
    metric_names = list(METRIC_KEYS) + list(COUNT_KEYS)
    means = {}
    for label in labels_or_regions:
        means[label] = {}
        for name in metric_names:
            values = np.array([case["metrics"][label][name] for case in results], dtype=float)
            means[label][name] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    foreground_mean = {}
    for name in metric_names:
        values = [means[label][name] for label in labels_or_regions if label not in (0, "0")]
        foreground_mean[name] = float(np.mean(values)) if values else float("nan")
    return {"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean}


def write_summary_csv(summary: dict, csv_file: str) -> None:
    """One row per case and label, then one 'mean' row per label and the 'foreground_mean' row."""
    columns = list(METRIC_KEYS) + list(COUNT_KEYS)

    with atomic_path(csv_file) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", *columns])
        for case in summary["metric_per_case"]:
            name = os.path.basename(case["prediction_file"])
            for label, metrics in case["metrics"].items():
                writer.writerow([name, label_or_region_to_key(label), *[metrics[c] for c in columns]])
        for label, metrics in summary["mean"].items():
            writer.writerow(["mean", label_or_region_to_key(label), *[metrics[c] for c in columns]])
        writer.writerow(["foreground_mean", "", *[summary["foreground_mean"][c] for c in columns]])


def evaluate_folder(
    folder_ref: str,
    folder_pred: str,
    dataset_json: str | dict,
    output_file: str | None = None,
    convention: str = "monai",
    num_processes: int = default_num_processes,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    allow_missing: bool = False,
    allow_unknown_labels: bool = False,
) -> dict:
    """Evaluate every prediction in `folder_pred`; write summary.json (+ .csv) unless output_file is ''.

    `output_file` defaults to ``folder_pred/summary.json``. Returns the summary (integer label keys).
    A label value that dataset.json does not define, in a reference or a prediction, is an
    `UnknownLabelError` naming the file; with `allow_unknown_labels` it counts as background and
    ``summary['unknown_labels']`` lists {file: [labels]}.
    """
    check_convention(convention)
    source = dataset_json if not isinstance(dataset_json, dict) else "dataset.json"
    if not isinstance(dataset_json, dict):
        if not os.path.isfile(dataset_json):
            raise FileNotFoundError(f"dataset.json {dataset_json} does not exist")
        try:
            dataset_json = load_json(dataset_json)
        except ValueError as error:
            raise ValueError(f"{source} is not valid JSON ({error})") from None
    missing_keys = [k for k in ("file_ending", "labels") if k not in dataset_json]
    if missing_keys:
        raise ValueError(f"{source} has no {' or '.join(missing_keys)}; is it an nnU-Net dataset.json?")
    file_ending = dataset_json["file_ending"]
    pairs = match_files(folder_ref, folder_pred, file_ending, allow_missing)
    label_manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    labels_or_regions = (
        label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    )
    known_labels = [int(k) for k in label_manager.all_labels]
    if label_manager.ignore_label is not None:
        known_labels.append(int(label_manager.ignore_label))
    arguments = [
        (
            ref,
            pred,
            labels_or_regions,
            convention,
            nsd_tolerance_mm,
            label_manager.ignore_label,
            known_labels,
            allow_unknown_labels,
        )
        for ref, pred in pairs
    ]
    if num_processes <= 1:
        results = [evaluate_case(*a) for a in arguments]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
            results = pool.starmap(evaluate_case, arguments)
    summary = summarize(results, labels_or_regions)
    # cases skipped with --allow_missing are named in the summary, so a partial evaluation cannot pass as complete
    summary["references_without_prediction"] = missing_predictions(folder_ref, folder_pred, file_ending)
    summary["unknown_labels"] = {
        file: labels for case in results for file, labels in case["unknown_labels"].items()
    }
    summary["convention"] = convention
    summary["nsd_tolerance_mm"] = nsd_tolerance_mm
    recursive_fix_for_json_export(summary)
    if output_file is None:
        output_file = os.path.join(folder_pred, "summary.json")
    if output_file:
        if not output_file.endswith(".json"):
            raise ValueError(f"output file must end with .json, got {output_file}")
        with atomic_path(output_file) as tmp:
            save_summary_json(summary, tmp)
        write_summary_csv(summary, output_file[: -len(".json")] + ".csv")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Dice / IoU / ASSD / HD / HD95 / NSD / RAVD of an nnU-Net prediction folder (summary.json + .csv)."
    )
    parser.add_argument("ref_folder", help="folder with the reference segmentations")
    parser.add_argument("pred_folder", help="folder with the predicted segmentations (same file names)")
    parser.add_argument("-djfile", required=True, help="dataset.json of the dataset (labels, file_ending)")
    parser.add_argument("-o", default=None, help="output summary.json (default: PRED_FOLDER/summary.json)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing summary.json (and summary.csv)"
    )
    parser.add_argument(
        "--convention",
        choices=CONVENTIONS,
        default="monai",
        help="monai: distances in mm, what to report (default); paper: MONAI without spacing (voxel units), "
        "a missed organ NaN, to compare with the PUMIT paper's Table 3; chaos: the CHAOS challenge's rules",
    )
    parser.add_argument(
        "-np",
        type=int_in_range(1, MAX_PROCESSES),
        default=min(default_num_processes, MAX_PROCESSES),
        help="worker processes (1: in-process)",
    )
    parser.add_argument(
        "--nsd_tolerance",
        type=float_in_range(0.0, None, low_open=True),
        default=DEFAULT_NSD_TOLERANCE_MM,
        help="NSD tolerance in mm (voxels under --convention paper; default 1)",
    )
    parser.add_argument(
        "--allow_missing",
        action="store_true",
        help="allow references without a prediction (they are listed in summary.json)",
    )
    # nnU-Net's evaluation calls the same option --chill: accepted, not advertised
    parser.add_argument("--chill", dest="allow_missing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--allow_unknown_labels",
        action="store_true",
        help="count label values that dataset.json does not define as background instead of failing "
        "(the files and labels are listed in summary.json)",
    )
    args = parser.parse_args(argv)
    with exit_on_bad_input(parser):
        # before any case is read: the outputs must be writable, new (or --overwrite) and none of the inputs
        output = args.o if args.o is not None else os.path.join(args.pred_folder, "summary.json")
        if output:  # -o '' writes nothing
            if not output.endswith(".json"):
                raise ValueError(f"-o {output}: the output file must end with .json")
            inputs = (args.ref_folder, args.pred_folder, args.djfile)
            option = "-o" if args.o is not None else "the default output"
            check_output_path(output, overwrite=args.overwrite, inputs=inputs, option=option)
            table = output[: -len(".json")] + ".csv"
            check_output_path(table, overwrite=args.overwrite, inputs=inputs, option="the table")
        summary = evaluate_folder(
            args.ref_folder,
            args.pred_folder,
            args.djfile,
            args.o,
            args.convention,
            args.np,
            args.nsd_tolerance,
            args.allow_missing,
            args.allow_unknown_labels,
        )
    foreground = summary["foreground_mean"]
    print(" ".join(f"{k} {foreground[k]:.4f}" for k in METRIC_KEYS))
    if summary["references_without_prediction"]:
        print(
            f"not evaluated (no prediction, --allow_missing): {', '.join(summary['references_without_prediction'])}"
        )
    for file, labels in summary["unknown_labels"].items():
        print(f"unknown labels counted as background (--allow_unknown_labels): {file}: {labels}")


if __name__ == "__main__":
    main()
