"""The `chaos` convention: hand-computed cases, the official code's algorithm, and the score formula."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from pumit_seg.evaluation.metrics import chaos_scores, compute_label_metrics, compute_metrics

SPACING = (2.0, 1.0, 1.0)  # slice step 2 mm, pixels 1 mm


def block(slices, shape=(4, 5, 5)):
    """A 3x3 in-plane block (rows 1-3, columns 1-3) on the given slices."""
    mask = np.zeros(shape, bool)
    mask[slices, 1:4, 1:4] = True
    return mask


def test_organ_cut_by_first_slice():
    # Reference: slices 0-1, prediction: slices 0-2, both cut by the first slice. With the outside counting
    # as foreground, the centre voxel on slice 0 is not surface (reference: 17 of 18 voxels are surface;
    # prediction: 25 of 27, the centres of slices 0 and 1 are interior).
    # prediction -> reference: 16 voxels on slices 0-1 lie on the reference surface (0 mm); the 9 voxels of
    # slice 2 are one slice (2 mm) away. Reference -> prediction: 16 zeros, and the centre of slice 1 is 1 mm
    # from the prediction's rim. Pooled: 42 distances summing to 9 * 2 + 1 = 19.
    ref, pred = block(slice(0, 2)), block(slice(0, 3))
    m = compute_metrics(ref, pred, SPACING, "chaos")
    assert m["Dice"] == pytest.approx(2 * 18 / (18 + 27))
    assert m["RAVD"] == pytest.approx(50.0)
    assert m["ASSD"] == pytest.approx(19 / 42)
    assert m["HD"] == pytest.approx(2.0)
    assert (m["n_ref"], m["n_pred"], m["TP"]) == (18, 27, 18)
    assert m["volume_ref_mm3"] == pytest.approx(36.0)
    # the monai convention counts the cut face as surface: every voxel of the reference is surface there,
    # so the centre of slice 0 adds one more zero distance (it is on the prediction's cut face too)
    monai = compute_metrics(ref, pred, SPACING, "monai")
    assert monai["ASSD"] == pytest.approx(19 / 44)


def test_distances_inside_the_volume_equal_monai():
    # away from the volume edge both conventions agree
    ref, pred = block(slice(1, 2), (5, 7, 7)), block(slice(2, 4), (5, 7, 7))
    chaos, monai = compute_metrics(ref, pred, SPACING, "chaos"), compute_metrics(ref, pred, SPACING, "monai")
    for key in ("ASSD", "HD", "HD95", "Dice", "RAVD"):
        assert chaos[key] == pytest.approx(monai[key])


@pytest.mark.parametrize("empty", ["prediction", "reference"])
def test_empty_mask_scores_the_worst_distance(empty):
    ref = block(slice(0, 2))
    nothing = np.zeros_like(ref)
    diagonal = math.sqrt((3 * 2.0) ** 2 + (4 * 1.0) ** 2 + (4 * 1.0) ** 2)
    m = compute_metrics(
        nothing if empty == "reference" else ref, nothing if empty == "prediction" else ref, SPACING, "chaos"
    )
    assert m["Dice"] == 0
    assert m["ASSD"] == pytest.approx(diagonal) and m["HD"] == pytest.approx(diagonal)
    assert m["RAVD"] == (100.0 if empty == "prediction" else math.inf)
    scores = chaos_scores(m["Dice"], m["RAVD"], m["ASSD"], m["HD"])
    assert scores["DICE_score"] == 0 and scores["RAVD_score"] == 0
    assert scores["MSSD_score"] == pytest.approx(
        100 - 5 / 3 * diagonal
    )  # a tiny volume: the diagonal is short


def test_worst_distance_is_the_whole_volume_diagonal_for_label_maps():
    seg_ref = np.zeros((10, 30, 20), np.uint8)
    seg_ref[2:4, 3:6, 3:6] = 1
    seg_ref[6:8, 20:25, 10:15] = 2
    seg_pred = np.where(seg_ref == 2, 2, 0)  # liver missed
    m = compute_label_metrics(seg_ref, seg_pred, [1, 2], SPACING, "chaos")
    diagonal = math.sqrt((9 * 2.0) ** 2 + 29**2 + 19**2)
    assert m[1]["ASSD"] == pytest.approx(diagonal) and m[1]["HD"] == pytest.approx(diagonal)
    assert m[2]["Dice"] == 1 and m[2]["ASSD"] == 0 and m[2]["HD"] == 0


def test_both_empty_is_nan():
    nothing = np.zeros((3, 4, 4), bool)
    m = compute_metrics(nothing, nothing, SPACING, "chaos")
    assert all(math.isnan(m[k]) for k in ("Dice", "RAVD", "ASSD", "HD"))


def official_chaos_ssd(ref, seg, spacing):
    """The official CHAOS SSD (border by erosion with border_value=1, cKDTree in mm, pooled mean and max)."""
    structure = ndimage.generate_binary_structure(3, 1)
    ref_border = ref ^ ndimage.binary_erosion(ref, structure=structure, border_value=1)
    seg_border = seg ^ ndimage.binary_erosion(seg, structure=structure, border_value=1)
    ref_points = np.argwhere(ref_border) * np.asarray(spacing)
    seg_points = np.argwhere(seg_border) * np.asarray(spacing)
    seg_to_ref, _ = cKDTree(ref_points).query(seg_points)
    ref_to_seg, _ = cKDTree(seg_points).query(ref_points)
    assd = (seg_to_ref.sum() + ref_to_seg.sum()) / (len(seg_to_ref) + len(ref_to_seg))
    return assd, np.concatenate([seg_to_ref, ref_to_seg]).max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_official_algorithm_on_blobs_touching_the_edges(seed):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(14, 30, 26)), 2.5)
    ref = field > 0.02
    seg = ndimage.shift(field, (0, 1.5, -1), order=1, mode="nearest") > 0.0
    spacing = (3.1, 0.74, 0.74)
    assd, mssd = official_chaos_ssd(ref, seg, spacing)
    m = compute_metrics(ref, seg, spacing, "chaos")
    assert m["ASSD"] == pytest.approx(assd, rel=1e-12)
    assert m["HD"] == pytest.approx(mssd, rel=1e-12)
    assert m["Dice"] == pytest.approx(2 * (ref & seg).sum() / (ref.sum() + seg.sum()))
    assert m["RAVD"] == pytest.approx(abs(int(ref.sum()) - int(seg.sum())) / ref.sum() * 100)


def test_score_formula():
    s = chaos_scores(dice=0.9, ravd=2.0, assd=3.0, mssd=30.0)
    assert s["DICE_score"] == pytest.approx(90.0)
    assert s["RAVD_score"] == pytest.approx(60.0)
    assert s["ASSD_score"] == pytest.approx(80.0)
    assert s["MSSD_score"] == pytest.approx(50.0)
    assert s["score"] == pytest.approx((90 + 60 + 80 + 50) / 4)
    # thresholds: Dice below 0.8, RAVD above 5 %, ASSD above 15 mm, MSSD above 60 mm all score 0
    low = chaos_scores(dice=0.79, ravd=5.01, assd=15.01, mssd=60.01)
    assert low == {"DICE_score": 0, "RAVD_score": 0, "ASSD_score": 0, "MSSD_score": 0, "score": 0}
    edge = chaos_scores(dice=0.8, ravd=5.0, assd=15.0, mssd=60.0)
    assert edge["DICE_score"] == pytest.approx(80.0) and edge["score"] == pytest.approx(20.0)
    # the hand-computed case of test_organ_cut_by_first_slice
    cut = chaos_scores(0.8, 50.0, 19 / 42, 2.0)
    assert cut["score"] == pytest.approx((80 + 0 + (100 - 20 / 3 * 19 / 42) + (100 - 10 / 3)) / 4)
