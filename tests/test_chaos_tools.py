"""CHAOS round trip on a synthetic tree: convert -> (labels as prediction) -> export -> PNGs equal -> score."""

import json
import os
import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from pumit_seg.evaluation import chaos
from pumit_seg.evaluation.chaos_io import grey_to_labels, labels_to_grey, read_png_stack
from pumit_seg.phantoms.chaos import tiny_chaos_series, write_chaos_tree
from pumit_seg.phantoms.dicom import write_dicom_series


@pytest.fixture(scope="module")
def chaos_tree(tmp_path_factory):
    """The tiny CHAOS tree: MR case 1 (T1DUAL, whose file names run against the slice position, and T2SPIR)
    and CT case 2, with ground truths holding grey values off the submitted ones and stray values."""
    return write_chaos_tree(str(tmp_path_factory.mktemp("chaos") / "Train_Sets"), tiny_chaos_series())


@pytest.fixture(scope="module")
def converted(chaos_tree, tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("nnUNet_raw"))
    chaos.main(["convert", chaos_tree, raw])
    return raw


def test_convert_layout_and_geometry(chaos_tree, converted):
    t1 = os.path.join(converted, "Dataset301_CHAOS_MR_T1DUAL")
    dataset = json.load(open(os.path.join(t1, "dataset.json")))
    assert dataset["channel_names"] == {"0": "T1_InPhase", "1": "T1_OutPhase"}
    assert dataset["labels"] == {
        "background": 0,
        "liver": 1,
        "right_kidney": 2,
        "left_kidney": 3,
        "spleen": 4,
    }
    assert dataset["numTraining"] == 1
    assert sorted(os.listdir(os.path.join(t1, "imagesTr"))) == [
        "CHAOS_001_0000.nii.gz",
        "CHAOS_001_0001.nii.gz",
    ]
    ct_dataset = json.load(open(os.path.join(converted, "Dataset303_CHAOS_CT", "dataset.json")))
    assert ct_dataset["channel_names"] == {"0": "CT"} and ct_dataset["labels"] == {
        "background": 0,
        "liver": 1,
    }

    # slice k is DICOM file k in name order, and sits at that file's ImagePositionPatient
    image = sitk.ReadImage(os.path.join(t1, "imagesTr", "CHAOS_001_0000.nii.gz"))
    dicom_folder = os.path.join(chaos_tree, "MR", "1", "T1DUAL", "DICOM_anon", "InPhase")
    files = sorted(os.listdir(dicom_folder))
    array = sitk.GetArrayFromImage(image)
    assert image.GetSpacing() == pytest.approx(
        (0.8, 0.9, 4.5)
    )  # columns, rows, slice step (not SliceThickness)
    for k, name in enumerate(files):
        ds = pydicom.dcmread(os.path.join(dicom_folder, name))
        np.testing.assert_array_equal(array[k], ds.pixel_array)
        assert image.TransformIndexToPhysicalPoint((0, 0, k)) == pytest.approx(
            [float(v) for v in ds.ImagePositionPatient]
        )
        assert image.TransformIndexToPhysicalPoint((1, 0, 0))[0] - image.GetOrigin()[0] == pytest.approx(0.8)
    out_phase = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(t1, "imagesTr", "CHAOS_001_0001.nii.gz")))
    np.testing.assert_array_equal(out_phase, array // 2)

    ct_image = sitk.GetArrayFromImage(
        sitk.ReadImage(os.path.join(converted, "Dataset303_CHAOS_CT", "imagesTr", "CHAOS_002_0000.nii.gz"))
    )
    assert ct_image.min() >= 1000 - 1024 and ct_image.max() < 1300 - 1024  # Hounsfield units

    record = json.load(open(os.path.join(t1, "chaos_mapping", "CHAOS_001.json")))
    assert record["dicom_files"] == files and (record["rows"], record["columns"], record["num_slices"]) == (
        18,
        20,
        6,
    )

    labels = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(t1, "labelsTr", "CHAOS_001.nii.gz")))
    grey, _ = read_png_stack(os.path.join(chaos_tree, "MR", "1", "T1DUAL", "Ground"))
    np.testing.assert_array_equal(labels, grey_to_labels(grey, "MR"))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_round_trip_export_and_score(chaos_tree, converted, tmp_path):
    predictions = []
    for sequence in ("T1DUAL", "T2SPIR", "CT"):
        dataset = os.path.join(
            converted, chaos.dataset_folder_name(sequence, chaos.DEFAULT_DATASET_IDS[sequence])
        )
        predictions += [
            "--pred",
            dataset,
            os.path.join(dataset, "labelsTr"),
        ]  # the labels play the prediction
    submission, zip_file = str(tmp_path / "submission"), str(tmp_path / "submission.zip")
    chaos.main(["export", submission, *predictions, "--zip", zip_file])
    assert sorted(os.listdir(submission)) == [f"Task{t}" for t in range(1, 6)] + ["export_summary.json"]

    series = {
        ("MR", "T1DUAL"): (os.path.join(chaos_tree, "MR", "1", "T1DUAL", "Ground"), "MR/1/T1DUAL/Results"),
        ("MR", "T2SPIR"): (os.path.join(chaos_tree, "MR", "1", "T2SPIR", "Ground"), "MR/1/T2SPIR/Results"),
        ("CT", "CT"): (os.path.join(chaos_tree, "CT", "2", "Ground"), "CT/2/Results"),
    }
    for task, (liver_only, modalities) in chaos.TASKS.items():
        for (modality, _), (ground, results) in series.items():
            folder = os.path.join(submission, f"Task{task}", results)
            if modality not in modalities:
                assert not os.path.exists(folder)
                continue
            reference, _ = read_png_stack(ground)
            exported, names = read_png_stack(folder)
            assert names == sorted(names) and len(names) == len(reference)
            expected = labels_to_grey(grey_to_labels(reference, modality), modality, liver_only)
            np.testing.assert_array_equal(
                exported, expected
            )  # slice for slice, rows and columns of the DICOM
    with zipfile.ZipFile(zip_file) as archive:
        members = archive.namelist()
    assert "Task5/MR/1/T1DUAL/Results/img000.png" in members and all(m.startswith("Task") for m in members)
    assert len(members) == sum(len(files) for _, _, files in os.walk(submission)) - 1  # not the summary

    scores_file = str(tmp_path / "scores.json")
    chaos.main(["score", submission, chaos_tree, "-o", scores_file])
    scores = json.load(open(scores_file))
    assert sorted(scores) == [f"Task{t}" for t in range(1, 6)]
    assert len(scores["Task5"]["series"]) == 8 and len(scores["Task2"]["series"]) == 1
    for task in scores.values():
        for row in task["series"]:
            assert row["DICE"] == 1 and row["RAVD"] == 0 and row["ASSD"] == 0 and row["MSSD"] == 0
        assert task["score"] == 100


def test_score_of_an_imperfect_result(chaos_tree, converted, tmp_path):
    dataset = os.path.join(converted, "Dataset302_CHAOS_MR_T2SPIR")
    submission = str(tmp_path / "submission")
    chaos.export_submission([(dataset, os.path.join(dataset, "labelsTr"))], submission)
    assert sorted(os.listdir(submission)) == ["Task3", "Task5", "export_summary.json"]  # MR only
    # erase the liver on the first result slice
    first = os.path.join(submission, "Task3", "MR", "1", "T2SPIR", "Results", "img000.png")
    Image.fromarray(np.zeros((18, 20), np.uint8), mode="L").save(first)
    with pytest.raises(FileNotFoundError, match="Task3/MR/1/T1DUAL/Results"):
        chaos.score_results(submission, chaos_tree)  # T1DUAL has a ground truth but no results
    scores = chaos.score_results(submission, chaos_tree, allow_missing=True)
    assert scores["Task3"]["missing"] == ["Task3/MR/1/T1DUAL/Results"]
    row = scores["Task3"]["series"][0]
    ref = (
        grey_to_labels(read_png_stack(os.path.join(chaos_tree, "MR", "1", "T2SPIR", "Ground"))[0], "MR") == 1
    )
    seg = ref.copy()
    seg[0] = False
    assert row["DICE"] == pytest.approx(2 * seg.sum() / (ref.sum() + seg.sum()))
    assert row["RAVD"] == pytest.approx((ref.sum() - seg.sum()) / ref.sum() * 100)
    assert row["MSSD"] == pytest.approx(
        6.0
    )  # the erased slice's centre lies one slice step (6 mm) from the new rim
    assert 0 < row["ASSD"] < 6 and scores["Task5"]["score"] == 100


def test_clear_errors(chaos_tree, converted, tmp_path):
    dataset = os.path.join(converted, "Dataset303_CHAOS_CT")
    wrong = tmp_path / "pred"
    wrong.mkdir()
    sitk.WriteImage(sitk.Image(20, 18, 3, sitk.sitkUInt8), str(wrong / "CHAOS_002.nii.gz"))
    with pytest.raises(ValueError, match="CHAOS_002.nii.gz has shape"):
        chaos.export_submission([(dataset, str(wrong))], str(tmp_path / "out"))
    sitk.WriteImage(sitk.Image(20, 18, 4, sitk.sitkUInt8), str(wrong / "CHAOS_077.nii.gz"))
    with pytest.raises(FileNotFoundError, match="CHAOS_077"):
        chaos.export_submission([(dataset, str(wrong))], str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no CHAOS series"):
        chaos.convert(str(tmp_path), str(tmp_path / "raw"))


def test_joint_mr_dataset_export_and_score(tmp_path):
    train = write_chaos_tree(str(tmp_path / "Train_Sets"), tiny_chaos_series(mr_ids=("1", "3"), ct_ids=()))
    test = write_chaos_tree(
        str(tmp_path / "Test_Sets"), tiny_chaos_series(mr_ids=("7",), ct_ids=()), with_ground=False
    )
    raw = tmp_path / "raw"
    chaos.main(["convert", train, str(raw), "--joint_mr"])
    chaos.main(["convert", test, str(raw), "--joint_mr"])
    folder = raw / "Dataset304_CHAOS_MR"
    assert sorted(os.listdir(raw)) == ["Dataset304_CHAOS_MR"]  # one MR dataset, no per-sequence ones
    dataset = json.load(open(folder / "dataset.json"))
    assert len(dataset["channel_names"]) == 2 and dataset["numTraining"] == 4  # 2 patients x 2 sequences
    names = sorted(os.listdir(folder / "imagesTr"))
    assert names[:4] == [
        "CHAOS_001_T1DUAL_0000.nii.gz",
        "CHAOS_001_T1DUAL_0001.nii.gz",
        "CHAOS_001_T2SPIR_0000.nii.gz",
        "CHAOS_001_T2SPIR_0001.nii.gz",
    ]
    t2 = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"CHAOS_001_T2SPIR_000{c}.nii.gz")))
        for c in (0, 1)
    ]
    np.testing.assert_array_equal(t2[0], t2[1])  # T2SPIR replicated to the two channels
    t1 = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"CHAOS_001_T1DUAL_000{c}.nii.gz")))
        for c in (0, 1)
    ]
    np.testing.assert_array_equal(t1[1], t1[0] // 2)  # in phase, out phase
    assert sorted(os.listdir(folder / "imagesTs")) == [
        "CHAOS_007_T1DUAL_0000.nii.gz",
        "CHAOS_007_T1DUAL_0001.nii.gz",
        "CHAOS_007_T2SPIR_0000.nii.gz",
        "CHAOS_007_T2SPIR_0001.nii.gz",
    ]
    # export the training labels as predictions (the test case 7 then lacks one: allowed and listed)
    submission = tmp_path / "submission"
    with pytest.raises(FileNotFoundError, match="CHAOS_007_T1DUAL"):
        chaos.export_submission([(str(folder), str(folder / "labelsTr"))], str(submission))
    assert not submission.exists()
    chaos.export_submission([(str(folder), str(folder / "labelsTr"))], str(submission), allow_missing=True)
    summary = json.load(open(submission / "export_summary.json"))
    assert len(summary["missing_predictions"]) == 2 and summary["tasks"] == [3, 5]
    scores = chaos.score_results(str(submission), train)
    assert len(scores["Task5"]["series"]) == 2 * 2 * 4 and scores["Task5"]["score"] == 100


def test_export_into_a_used_folder_leaves_no_stale_file(chaos_tree, converted, tmp_path):
    dataset = os.path.join(converted, "Dataset302_CHAOS_MR_T2SPIR")
    submission = tmp_path / "submission"
    chaos.export_submission([(dataset, os.path.join(dataset, "labelsTr"))], str(submission))
    stale = submission / "Task5" / "MR" / "1" / "T2SPIR" / "Results" / "img999.png"
    stale.write_bytes(b"an earlier run's slice")
    (submission / "Task9").mkdir()
    chaos.export_submission([(dataset, os.path.join(dataset, "labelsTr"))], str(submission))
    assert not stale.exists() and not (submission / "Task9").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["submission"]  # no temporary folder left


def official_chaos_surface_distances(reference, result, index_to_mm):
    """ASSD / MSSD as the official CHAOS code computes them: erosion with border_value 1, voxel centres mapped
    by its affine, nearest neighbours by k-d tree (written out independently of pumit's metrics module)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    structure = ndimage.generate_binary_structure(3, 1)
    points = []
    for mask in (reference, result):
        border = mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=1)
        points.append(np.argwhere(border) @ np.asarray(index_to_mm).T)
    to_ref = cKDTree(points[0]).query(points[1])[0]
    to_seg = cKDTree(points[1]).query(points[0])[0]
    pooled = np.concatenate([to_ref, to_seg])
    return pooled.mean(), pooled.max()


def test_chaos_scoring_rules(tmp_path):
    rows, columns, num_slices = 14, 16, 6
    # a series whose slices are tilted against their plane: each file moves 3 mm along z and 1.5 mm along x
    positions = [(1.5 * k, 0.0, 3.0 * k) for k in range(num_slices)]
    names = [f"IMG-{k:04d}.dcm" for k in range(num_slices)]
    dicom = tmp_path / "DICOM_anon"
    write_dicom_series(str(dicom), np.zeros((num_slices, rows, columns)), positions, names)
    reference = np.zeros((num_slices, rows, columns), np.uint8)
    reference[1:5, 3:10, 4:12] = 63  # liver; the kidneys and the spleen are absent from both masks
    result = np.zeros_like(reference)
    result[2:6, 4:11, 4:12] = 63
    for folder, grey in (("Ground", reference), ("Results", result)):
        (tmp_path / folder).mkdir()
        for k in range(num_slices):
            if folder == "Results":  # a palette PNG whose palette is grey: read as its grey value, 63
                image = Image.fromarray((grey[k] > 0).astype(np.uint8), mode="P")
                image.putpalette([0, 0, 0, 63, 63, 63] + [0] * 762)
            else:
                image = Image.fromarray(grey[k], mode="L")
            image.save(tmp_path / folder / f"img{k:03d}.png")
    rows_out = chaos.score_series(
        str(tmp_path / "Results"), str(tmp_path / "Ground"), str(dicom), "MR", False
    )
    assert [r["organ"] for r in rows_out] == ["liver"]  # absent organs are left out, not scored 0
    ref_mask, seg_mask = reference > 0, result > 0
    assert rows_out[0]["DICE"] == pytest.approx(
        2 * (ref_mask & seg_mask).sum() / (ref_mask.sum() + seg_mask.sum())
    )
    # the official affine: full inter-slice vector; row index x X x PixelSpacing[0]; column index x Y x [1]
    index_to_mm = np.array([[1.5, 0.9, 0.0], [0.0, 0.0, 0.8], [3.0, 0.0, 0.0]])
    assd, mssd = official_chaos_surface_distances(ref_mask, seg_mask, index_to_mm)
    assert rows_out[0]["ASSD"] == pytest.approx(assd) and rows_out[0]["MSSD"] == pytest.approx(mssd)
    step = np.linalg.norm([1.5, 0.0, 3.0])  # what a spacing-only grid (step along the normal) would use
    orthogonal = np.array([[0.0, 0.9, 0.0], [0.0, 0.0, 0.8], [step, 0.0, 0.0]])
    assd_projected, _ = official_chaos_surface_distances(ref_mask, seg_mask, orthogonal)
    assert abs(assd - assd_projected) > 1e-2  # the tilt matters: a step-only grid would differ


def test_incomplete_series_fail_or_are_skipped_and_listed(tmp_path):
    import shutil

    root = write_chaos_tree(str(tmp_path / "Train_Sets"), tiny_chaos_series(mr_ids=("1", "2"), ct_ids=()))
    shutil.rmtree(os.path.join(root, "MR", "2", "T1DUAL", "DICOM_anon", "OutPhase"))
    shutil.rmtree(os.path.join(root, "MR", "1", "T2SPIR", "Ground"))
    raw = tmp_path / "raw"
    with pytest.raises(
        FileNotFoundError, match="MR/2/T1DUAL/DICOM_anon/OutPhase: DICOM folder missing.*MR/1/T2SPIR/Ground"
    ):
        chaos.convert(root, str(raw))
    assert not raw.exists()
    chaos.convert(root, str(raw), skip_incomplete=True)
    t1 = json.load(open(raw / "Dataset301_CHAOS_MR_T1DUAL" / "conversion_summary.json"))
    assert t1["converted"] == ["CHAOS_001"] and len(t1["skipped"]) == 2
    assert sorted(os.listdir(raw / "Dataset302_CHAOS_MR_T2SPIR" / "labelsTr")) == ["CHAOS_002.nii.gz"]
