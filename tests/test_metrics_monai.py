"""The `monai` convention equals MONAI's own metric classes (same masks, same spacing)."""

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    DiceMetric,
    HausdorffDistanceMetric,
    MeanIoU,
    SurfaceDiceMetric,
    SurfaceDistanceMetric,
)
from scipy import ndimage

from pumit_seg.evaluation.metrics import compute_label_metrics, compute_metrics, surface_distances

TOLERANCE = 1e-6  # MONAI returns float32; we compute in float64
NSD_TOLERANCE_MM = 1.5
DISTANCE_KEYS = ("HD", "HD95", "ASSD", "NSD")


def monai_metrics(seg_ref, seg_pred, labels, spacing) -> dict[str, np.ndarray]:
    """MONAI's values per label (background excluded), from one-hot float tensors as MONAI expects."""

    def one_hot(seg):
        return torch.stack([torch.as_tensor(seg == label) for label in [0, *labels]]).float()[None]

    pred, ref = one_hot(seg_pred), one_hot(seg_ref)
    spacing = list(spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks, which some cases test on purpose
        values = {
            "Dice": DiceMetric(include_background=False)(pred, ref),
            "IoU": MeanIoU(include_background=False)(pred, ref),
            "HD": HausdorffDistanceMetric(include_background=False)(pred, ref, spacing=spacing),
            "HD95": HausdorffDistanceMetric(include_background=False, percentile=95)(
                pred, ref, spacing=spacing
            ),
            "ASSD": SurfaceDistanceMetric(include_background=False, symmetric=True)(
                pred, ref, spacing=spacing
            ),
            "NSD": SurfaceDiceMetric([NSD_TOLERANCE_MM] * len(labels), include_background=False)(
                pred, ref, spacing=spacing
            ),
        }
    return {k: v[0].numpy().astype(np.float64) for k, v in values.items()}


def assert_equal_to_monai(seg_ref, seg_pred, labels, spacing):
    ours = compute_label_metrics(seg_ref, seg_pred, labels, spacing, "monai", NSD_TOLERANCE_MM)
    reference = monai_metrics(seg_ref, seg_pred, labels, spacing)
    for key, values in reference.items():
        np.testing.assert_allclose(
            [ours[label][key] for label in labels], values, rtol=TOLERANCE, atol=TOLERANCE, err_msg=key
        )
    return ours


def random_blobs(shape, num_labels, seed):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    thresholds = np.quantile(field, np.linspace(0.45, 0.9, num_labels))
    return np.digitize(field, thresholds).astype(np.int16)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_anisotropic(seed):
    seg_ref = random_blobs((24, 40, 36), 3, seed)
    seg_pred = random_blobs((24, 40, 36), 3, seed + 10)
    seg_pred[seg_ref == 2] = 2  # overlap, so distances range from 0 to far
    ours = assert_equal_to_monai(seg_ref, seg_pred, [1, 2, 3], (2.5, 0.8, 0.7))
    assert all(0 < ours[label]["Dice"] < 1 for label in (1, 2, 3))


def test_organs_touching_the_volume_edge():
    seg_ref = np.zeros((12, 20, 18), np.uint8)
    seg_ref[:5, :8, 3:10] = 1  # touches three faces of the volume
    seg_ref[6:, 10:, 10:] = 2  # touches the opposite faces
    seg_pred = np.zeros_like(seg_ref)
    seg_pred[:4, :9, 4:10] = 1
    seg_pred[7:, 12:, 9:] = 2
    ours = assert_equal_to_monai(seg_ref, seg_pred, [1, 2], (3.0, 1.0, 0.75))
    # faces on the volume edge are surface in this convention: the edge slice is all surface
    distances = surface_distances(seg_ref == 1, seg_ref == 1, (3.0, 1.0, 0.75), "monai")
    assert distances.ref_to_pred.size == np.count_nonzero(seg_ref == 1) - 3 * 6 * 5  # interior 3x6x5 block
    assert ours[1]["HD"] > 0


def test_2d_masks():
    seg_ref = random_blobs((48, 40), 2, 3)
    seg_pred = np.roll(seg_ref, 3, axis=0)
    assert_equal_to_monai(seg_ref, seg_pred, [1, 2], (0.6, 1.1))


@pytest.mark.parametrize("empty", ["reference", "prediction", "both"])
def test_empty_masks(empty):
    blob = np.zeros((10, 12, 14), np.uint8)
    blob[3:7, 2:9, 4:11] = 1
    empty_volume = np.zeros_like(blob)
    seg_ref = empty_volume if empty in ("reference", "both") else blob
    seg_pred = empty_volume if empty in ("prediction", "both") else blob
    ours = assert_equal_to_monai(seg_ref, seg_pred, [1], (2.0, 1.0, 1.0))[1]
    if empty == "both":
        assert all(np.isnan(ours[k]) for k in ("Dice", "HD", "HD95", "ASSD", "NSD"))
    else:
        assert np.isinf(ours["HD"]) and np.isinf(ours["ASSD"]) and np.isnan(ours["HD95"]) and ours["NSD"] == 0


def test_one_label_empty_among_others():
    seg_ref = random_blobs((16, 20, 20), 3, 5)
    seg_pred = seg_ref.copy()
    seg_pred[seg_pred == 3] = 1  # label 3 missed entirely
    ours = assert_equal_to_monai(seg_ref, seg_pred, [1, 2, 3], (1.5, 0.9, 0.9))
    assert ours[2]["Dice"] == 1 and ours[2]["HD"] == 0


def test_bounding_box_equals_full_volume():
    """Crops are an optimisation only: embedding the masks in a larger volume changes nothing."""
    seg_ref = random_blobs((14, 18, 16), 2, 7)
    seg_pred = np.roll(seg_ref, 2, axis=2)
    seg_pred[:, :, :2] = 0  # keep the edge behaviour identical after embedding
    seg_ref[:, :, :2] = 0
    for label in (1, 2):
        small = compute_metrics(seg_ref == label, seg_pred == label, (2.0, 1.0, 0.5))
        big_ref, big_pred = np.zeros((30, 40, 50), bool), np.zeros((30, 40, 50), bool)
        big_ref[5:19, 7:25, 9:25] = seg_ref == label
        big_pred[5:19, 7:25, 9:25] = seg_pred == label
        big = compute_metrics(big_ref, big_pred, (2.0, 1.0, 0.5))
        inner = compute_metrics(seg_ref == label, seg_pred == label, (2.0, 1.0, 0.5), box=(slice(None),) * 3)
        for key in ("Dice", "HD", "HD95", "ASSD", "NSD", "RAVD"):
            assert small[key] == big[key] == inner[key], key


def test_regions_and_ignore_label():
    seg_ref = random_blobs((12, 16, 16), 3, 9)
    seg_pred = random_blobs((12, 16, 16), 3, 19)
    ours = compute_label_metrics(seg_ref, seg_pred, [(1, 2), 3], (1.0, 1.0, 1.0))
    union = compute_metrics(np.isin(seg_ref, [1, 2]), np.isin(seg_pred, [1, 2]), (1.0, 1.0, 1.0))
    assert ours[(1, 2)] == union
    # ignore label 3: prediction voxels there are removed before scoring label 1
    ignored = compute_label_metrics(seg_ref, seg_pred, [1], (1.0, 1.0, 1.0), ignore_label=3)[1]
    expected = compute_metrics(seg_ref == 1, (seg_pred == 1) & (seg_ref != 3), (1.0, 1.0, 1.0))
    assert ignored == expected


def test_paper_convention_is_monai_without_spacing_and_missed_organs_nan():
    seg_ref = random_blobs((16, 24, 20), 3, 5)
    seg_pred = random_blobs((16, 24, 20), 3, 15)
    seg_pred[seg_pred == 3] = 0  # organ 3 missed entirely: MONAI gives inf, the paper convention NaN
    spacing = (3.0, 0.75, 0.75)
    ours = compute_label_metrics(seg_ref, seg_pred, [1, 2, 3], spacing, "paper", NSD_TOLERANCE_MM)
    voxels = monai_metrics(seg_ref, seg_pred, [1, 2, 3], (1.0, 1.0, 1.0))  # MONAI without spacing
    assert np.isinf(voxels["HD"][2]) and np.isinf(voxels["ASSD"][2])
    for key in ("Dice", "IoU", "HD", "HD95", "ASSD", "NSD"):
        expected = np.where(np.isinf(voxels[key]), np.nan, voxels[key])
        np.testing.assert_allclose(
            [ours[label][key] for label in (1, 2, 3)], expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=key
        )
    in_mm = compute_label_metrics(seg_ref, seg_pred, [1, 2, 3], spacing, "monai", NSD_TOLERANCE_MM)
    assert ours[1]["HD"] != pytest.approx(in_mm[1]["HD"])  # really voxel units, not mm
    assert ours[1]["volume_ref_mm3"] == in_mm[1]["volume_ref_mm3"]  # volumes stay in mm^3
