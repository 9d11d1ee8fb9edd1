"""Evaluate a folder of predictions against a folder of references, nnU-Net style, with distance metrics.

    pumit_evaluate REF_FOLDER PRED_FOLDER -djfile dataset.json [-o summary.json] [--convention monai|chaos] [-np N]

Modelled on ``nnunetv2.evaluation.evaluate_predictions``: files are matched by name (the file ending comes
from dataset.json), read with the dataset's reader / writer (SimpleITKIO for NIfTI), labels or regions and
the ignore label come from nnU-Net's ``LabelManager``, and ``summary.json`` has nnU-Net's layout
(``metric_per_case``, ``mean``, ``foreground_mean``) with our metric keys (see ``metrics.METRIC_KEYS``).
A ``summary.csv`` with one row per case and label (and the means) is written next to it.

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
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from pumit_seg.evaluation.metrics import (
    CONVENTIONS,
    COUNT_KEYS,
    DEFAULT_NSD_TOLERANCE_MM,
    METRIC_KEYS,
    check_convention,
    compute_label_metrics,
)

from pumit_seg.atomic import atomic_path

GEOMETRY_TOLERANCE = 1e-4  # mm (and direction cosines): header round-off, not real differences


class GeometryMismatchError(ValueError):
    """Reference and prediction do not share shape, spacing, origin or direction."""


def _geometry(properties: dict) -> dict:
    sitk_stuff = properties.get("sitk_stuff")
    if sitk_stuff is not None:
        return {k: np.asarray(sitk_stuff[k], dtype=float) for k in ("spacing", "origin", "direction")}
    return {"spacing": np.asarray(properties["spacing"], dtype=float)}


def check_same_geometry(reference_file: str, prediction_file: str, seg_ref, props_ref, seg_pred, props_pred):
    """Raise GeometryMismatchError naming both files unless shapes and headers agree."""
    if seg_ref.shape != seg_pred.shape:
        raise GeometryMismatchError(
            f"prediction {prediction_file} has shape {seg_pred.shape[1:]}, "
            f"reference {reference_file} has shape {seg_ref.shape[1:]}"
        )
    geometry_ref, geometry_pred = _geometry(props_ref), _geometry(props_pred)
    for key, value_ref in geometry_ref.items():
        value_pred = geometry_pred.get(key)
        if value_pred is None or value_pred.shape != value_ref.shape:
            raise GeometryMismatchError(
                f"prediction {prediction_file} has no {key} comparable to {reference_file}"
            )
        if not np.allclose(value_pred, value_ref, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            raise GeometryMismatchError(
                f"prediction {prediction_file} has {key} {value_pred.tolist()}, "
                f"reference {reference_file} has {key} {value_ref.tolist()}"
            )


def _as_label_map(seg: np.ndarray, filename: str) -> np.ndarray:
    if not np.isfinite(seg).all():
        raise ValueError(f"{filename} contains NaN or inf values; it is not a segmentation")
    labels = np.rint(seg)
    if not np.array_equal(labels, seg):
        raise ValueError(f"{filename} contains non-integer values; it is not a segmentation")
    return labels.astype(np.int32)


def evaluate_case(
    reference_file: str,
    prediction_file: str,
    reader_writer: BaseReaderWriter,
    labels_or_regions: list,
    convention: str = "monai",
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    ignore_label: int | None = None,
) -> dict:
    """Metrics of one case: {'reference_file', 'prediction_file', 'spacing', 'metrics': {label: {...}}}."""
    seg_ref, props_ref = reader_writer.read_seg(reference_file)
    seg_pred, props_pred = reader_writer.read_seg(prediction_file)
    check_same_geometry(reference_file, prediction_file, seg_ref, props_ref, seg_pred, props_pred)
    seg_ref = _as_label_map(seg_ref[0], reference_file)
    seg_pred = _as_label_map(seg_pred[0], prediction_file)
    spacing = [float(s) for s in props_ref["spacing"]]
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
    }


def match_files(
    folder_ref: str, folder_pred: str, file_ending: str, chill: bool = False
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
    if missing and not chill:
        raise FileNotFoundError(
            f"references without a prediction in {folder_pred}: {missing} (pass --chill to evaluate only the present ones)"
        )
    return [(os.path.join(folder_ref, n), os.path.join(folder_pred, n)) for n in names_pred]


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
    chill: bool = False,
) -> dict:
    """Evaluate every prediction in `folder_pred`; write summary.json (+ .csv) unless output_file is ''.

    `output_file` defaults to ``folder_pred/summary.json``. Returns the summary (integer label keys).
    """
    check_convention(convention)
    if not isinstance(dataset_json, dict):
        dataset_json = load_json(dataset_json)
    file_ending = dataset_json["file_ending"]
    pairs = match_files(folder_ref, folder_pred, file_ending, chill)
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, pairs[0][0])()
    label_manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    labels_or_regions = (
        label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    )
    arguments = [
        (
            ref,
            pred,
            reader_writer,
            labels_or_regions,
            convention,
            nsd_tolerance_mm,
            label_manager.ignore_label,
        )
        for ref, pred in pairs
    ]
    if num_processes <= 1:
        results = [evaluate_case(*a) for a in arguments]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
            results = pool.starmap(evaluate_case, arguments)
    summary = summarize(results, labels_or_regions)
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
        "--convention", choices=CONVENTIONS, default="monai", help="surface convention (default monai)"
    )
    parser.add_argument(
        "-np", type=int, default=default_num_processes, help="worker processes (1: in-process)"
    )
    parser.add_argument(
        "--nsd_tolerance",
        type=float,
        default=DEFAULT_NSD_TOLERANCE_MM,
        help="NSD tolerance in mm (default 1)",
    )
    parser.add_argument("--chill", action="store_true", help="allow references without a prediction")
    args = parser.parse_args(argv)
    summary = evaluate_folder(
        args.ref_folder,
        args.pred_folder,
        args.djfile,
        args.o,
        args.convention,
        args.np,
        args.nsd_tolerance,
        args.chill,
    )
    foreground = summary["foreground_mean"]
    print(" ".join(f"{k} {foreground[k]:.4f}" for k in METRIC_KEYS))


if __name__ == "__main__":
    main()
