"""pumit_evaluate: folder evaluation agrees with the metric functions case by case; clear errors."""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pumit_seg.evaluation.evaluate_folder import GeometryMismatchError, evaluate_folder, main
from pumit_seg.evaluation.metrics import METRIC_KEYS, compute_label_metrics

SPACING_XYZ = (0.7, 0.8, 2.0)  # SimpleITK order; the arrays are (z, y, x)
SPACING_ZYX = SPACING_XYZ[::-1]
DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "tumour": 2},
    "numTraining": 3,
    "file_ending": ".nii.gz",
}


def blobs(seed, shape=(10, 24, 20)):
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return np.digitize(field, np.quantile(field, [0.5, 0.8])).astype(np.uint8)


def write(path, array, spacing=SPACING_XYZ, origin=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    cases = {}
    for i in range(3):
        seg_ref, seg_pred = blobs(i), blobs(i + 10)
        if i == 2:
            seg_pred[seg_pred == 2] = 0  # tumour missed: inf distances under the monai convention
        write(ref / f"case_{i}.nii.gz", seg_ref)
        write(pred / f"case_{i}.nii.gz", seg_pred)
        cases[f"case_{i}.nii.gz"] = (seg_ref, seg_pred)
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return ref, pred, tmp_path / "dataset.json", cases


@pytest.mark.parametrize("convention", ["monai", "paper", "chaos"])
def test_agrees_with_metric_functions(folders, convention, tmp_path):
    ref, pred, dataset_json, cases = folders
    output = tmp_path / f"summary_{convention}.json"
    main(
        [
            str(ref),
            str(pred),
            "-djfile",
            str(dataset_json),
            "-o",
            str(output),
            "--convention",
            convention,
            "-np",
            "1",
        ]
    )
    summary = json.loads(output.read_text())
    assert {"metric_per_case", "mean", "foreground_mean"} <= set(summary)
    assert summary["convention"] == convention and sorted(summary["mean"]) == ["1", "2"]
    per_label = {"1": [], "2": []}
    for case in summary["metric_per_case"]:
        seg_ref, seg_pred = cases[case["prediction_file"].split("/")[-1]]
        expected = compute_label_metrics(seg_ref, seg_pred, [1, 2], SPACING_ZYX, convention)
        for label in (1, 2):
            for key in METRIC_KEYS:
                value = case["metrics"][str(label)][key]
                assert value == pytest.approx(expected[label][key], nan_ok=True), key
            per_label[str(label)].append(case["metrics"][str(label)])
    for label, rows in per_label.items():
        assert summary["mean"][label]["Dice"] == pytest.approx(np.mean([r["Dice"] for r in rows]))
    assert summary["foreground_mean"]["Dice"] == pytest.approx(
        np.mean([summary["mean"][k]["Dice"] for k in ("1", "2")])
    )
    tumour_hd = summary["mean"]["2"]["HD"]
    assert math.isinf(tumour_hd) if convention == "monai" else math.isfinite(tumour_hd)
    with open(output.with_suffix(".csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["case", "label"] and len(rows) == 1 + 3 * 2 + 2 + 1


def test_multiprocessing_gives_the_same_summary(folders, tmp_path):
    ref, pred, dataset_json, _ = folders
    single = evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    multi = evaluate_folder(str(ref), str(pred), str(dataset_json), str(tmp_path / "s.json"), num_processes=2)
    assert json.dumps(single, sort_keys=True, default=str) == json.dumps(multi, sort_keys=True, default=str)
    assert not (pred / "summary.json").exists()  # '' writes nothing; the default would be pred/summary.json


def test_2d_images_are_evaluated_in_plane(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    seg_ref = blobs(3, (32, 28))
    seg_pred = np.roll(seg_ref, 2, axis=1)
    write(ref / "a.nii.gz", seg_ref, spacing=(0.5, 0.9))
    write(pred / "a.nii.gz", seg_pred, spacing=(0.5, 0.9))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    summary = evaluate_folder(str(ref), str(pred), str(tmp_path / "dataset.json"), "", num_processes=1)
    spacing = sitk.ReadImage(str(ref / "a.nii.gz")).GetSpacing()[::-1]  # float32 in the header
    expected = compute_label_metrics(seg_ref, seg_pred, [1, 2], spacing)
    assert summary["metric_per_case"][0]["metrics"][1] == expected[1]


def test_clear_errors(folders):
    ref, pred, dataset_json, cases = folders
    seg_ref, seg_pred = cases["case_1.nii.gz"]
    write(pred / "case_1.nii.gz", seg_pred, spacing=(0.7, 0.8, 2.5))
    with pytest.raises(
        GeometryMismatchError, match=r"pred/case_1.nii.gz has spacing .*reference .*ref/case_1.nii.gz"
    ):
        evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    write(pred / "case_1.nii.gz", seg_pred, origin=(0.0, 0.0, 5.0))
    with pytest.raises(GeometryMismatchError, match="has origin"):
        evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    write(pred / "case_1.nii.gz", seg_pred[:-1])
    with pytest.raises(GeometryMismatchError, match="has shape"):
        evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    (pred / "case_1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="references without a prediction .*case_1"):
        evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    summary = evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1, allow_missing=True)
    assert len(summary["metric_per_case"]) == 2


def test_nan_in_a_prediction_is_refused(tmp_path):
    # (ITK's NIfTI reader turns NaN into 0; the project's reader catches that too: tests/test_readers.py)
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    seg = blobs(4)
    nan_pred = seg.astype(np.float32)
    nan_pred[0, 0, 0] = np.nan
    write(ref / "c.mha", seg)
    write(pred / "c.mha", nan_pred)
    (tmp_path / "dataset.json").write_text(json.dumps({**DATASET_JSON, "file_ending": ".mha"}))
    with pytest.raises(ValueError, match="pred/c.mha: 1 NaN"):
        evaluate_folder(str(ref), str(pred), str(tmp_path / "dataset.json"), "", num_processes=1)


def test_unknown_labels_are_refused_or_listed(folders, tmp_path, capsys):
    ref, pred, dataset_json, cases = folders
    seg_ref, seg_pred = cases["case_1.nii.gz"]
    with_unknown = seg_pred.copy()
    with_unknown[0, :3, :3] = 7  # dataset.json knows 0, 1, 2
    write(pred / "case_1.nii.gz", with_unknown)
    with pytest.raises(ValueError, match=r"pred/case_1.nii.gz holds label 7, not defined in dataset.json"):
        evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    summary = evaluate_folder(
        str(ref), str(pred), str(dataset_json), "", num_processes=1, allow_unknown_labels=True
    )
    assert summary["unknown_labels"] == {str(pred / "case_1.nii.gz"): [7]}
    # allowed, they count as background: the scores equal those of the prediction without them
    as_background = with_unknown.copy()
    as_background[as_background == 7] = 0
    spacing = sitk.ReadImage(str(ref / "case_1.nii.gz")).GetSpacing()[::-1]
    expected = compute_label_metrics(seg_ref, as_background, [1, 2], spacing)
    assert summary["metric_per_case"][1]["metrics"][1] == expected[1]
    # the reference side too, named by its file
    write(pred / "case_1.nii.gz", seg_pred)
    reference = seg_ref.copy()
    reference[1, :2, :2] = 3
    write(ref / "case_1.nii.gz", reference)
    with pytest.raises(ValueError, match=r"ref/case_1.nii.gz holds label 3, "):
        evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    # the command line: refused, then listed in summary.json and printed
    with pytest.raises(SystemExit):
        main([str(ref), str(pred), "-djfile", str(dataset_json), "-np", "1"])
    assert "ref/case_1.nii.gz holds label 3" in capsys.readouterr().err
    main([str(ref), str(pred), "-djfile", str(dataset_json), "-np", "1", "--allow_unknown_labels"])
    assert str(ref / "case_1.nii.gz") in capsys.readouterr().out
    written = json.loads((pred / "summary.json").read_text())
    assert written["unknown_labels"] == {str(ref / "case_1.nii.gz"): [3]}


def test_ignore_label_is_known(folders):
    ref, pred, dataset_json, cases = folders
    dataset = {**DATASET_JSON, "labels": {**DATASET_JSON["labels"], "ignore": 3}}
    dataset_json.write_text(json.dumps(dataset))
    seg_ref, _ = cases["case_0.nii.gz"]
    seg_ref = seg_ref.copy()
    seg_ref[0, :2, :2] = 3
    write(ref / "case_0.nii.gz", seg_ref)
    summary = evaluate_folder(str(ref), str(pred), str(dataset_json), "", num_processes=1)
    assert summary["unknown_labels"] == {}


def test_existing_summary_needs_overwrite(folders, capsys):
    ref, pred, dataset_json, _ = folders
    arguments = [str(ref), str(pred), "-djfile", str(dataset_json), "-np", "1"]
    main(arguments)
    before = (pred / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 1
    assert "summary.json exists: pass --overwrite" in capsys.readouterr().err
    assert (pred / "summary.json").read_bytes() == before
    main([*arguments, "--overwrite"])
    # the output is never one of the inputs, even with --overwrite
    with pytest.raises(SystemExit):
        main([*arguments, "-o", str(dataset_json), "--overwrite"])
    assert "is also an input" in capsys.readouterr().err
    assert json.loads(dataset_json.read_text()) == DATASET_JSON
