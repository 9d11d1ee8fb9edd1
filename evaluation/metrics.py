"""Per-label segmentation metrics with voxel spacing in mm: Dice, IoU, ASSD, HD, HD95, NSD, RAVD, volumes.

Three conventions (docs/method.md, "Metric conventions"), picked with ``convention=``:

``"monai"``
    Equal to MONAI 1.6's ``DiceMetric``, ``MeanIoU``, ``HausdorffDistanceMetric`` (with and without
    ``percentile=95``), ``SurfaceDistanceMetric(symmetric=True)`` and ``SurfaceDiceMetric`` (voxel counting,
    ``use_subvoxels=False``), all with their default ``ignore_empty`` behaviour:

    * surface = mask XOR its 6-connected erosion, the outside of the volume counting as background
      (faces on the volume edge are surface);
    * HD = max over both directed maxima; HD95 = max of the two directed 95th percentiles (linear
      interpolation); ASSD = mean of the pooled distances of both directions; NSD = share of surface voxels
      of both masks within the tolerance;
    * empty reference: Dice, IoU, RAVD NaN; empty prediction: Dice 0. One mask empty: HD and ASSD inf,
      HD95 NaN (MONAI's ``torch.quantile`` of infinite distances), NSD 0. Both empty: every metric NaN.

``"paper"``
    What the PUMIT reference code reported for BTCV (the paper's Table 3): MONAI's
    ``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` called *without* ``spacing``, so ASSD, HD and
    HD95 are in voxel units (NSD's tolerance too), and a missed organ (one mask empty: inf in MONAI) is NaN,
    which the means then leave out. Dice, IoU, RAVD and the volumes are as ``monai``. Use it only to compare
    with the paper; voxel units mix 3 mm slices with 0.75 mm pixels and dropping missed organs flatters the
    mean, so report ``monai``.

``"chaos"``
    The official CHAOS challenge evaluation code:

    * surface = mask XOR its 6-connected erosion with ``border_value=1``: the outside counts as
      foreground, so faces cut by the volume edge are not surface (an organ cut by the first slice has no
      surface on that slice);
    * ASSD = mean of the pooled distances of both directions; MSSD (reported as ``HD``) = their maximum;
      HD95 and NSD are computed the same way on these surfaces as extras (CHAOS does not define them);
    * one mask empty: every distance is the worst one, the volume diagonal in mm (the distance between
      the two farthest voxel centres), never NaN or inf; Dice 0; RAVD 100 for an empty prediction;
    * both empty: NaN (the organ is absent, there is nothing to score).
    :func:`chaos_scores` turns DICE / RAVD / ASSD / MSSD into the challenge's 0-100 scores.

How it is computed (the same for both conventions): the two masks are cut to the bounding box of their
union padded by one voxel (clipped at the volume edge, where the erosion's ``border_value`` then decides, as
on the full volume), the two surfaces are extracted there, and one exact Euclidean distance transform per
direction (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``, as its nearest-voxel feature
transform, evaluated at the other surface's voxels only) gives every surface voxel's distance in mm to the
other surface. Every distance metric reuses these two arrays, so the results equal the full-volume
computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CONVENTIONS = ("monai", "paper", "chaos")
DEFAULT_NSD_TOLERANCE_MM = 1.0
HD_PERCENTILE = 95.0
METRIC_KEYS = ("Dice", "IoU", "ASSD", "HD", "HD95", "NSD", "RAVD")
COUNT_KEYS = ("n_ref", "n_pred", "TP", "volume_ref_mm3", "volume_pred_mm3")
GRID_ORTHOGONALITY_TOLERANCE = 1e-6  # |cos| between grid axes below which the grid counts as a box grid


@dataclass
class SurfaceDistances:
    """Distances in mm from every surface voxel of one mask to the nearest surface voxel of the other."""

    pred_to_ref: np.ndarray  # one entry per prediction surface voxel (float64)
    ref_to_pred: np.ndarray  # one entry per reference surface voxel (float64)

    @property
    def pooled(self) -> np.ndarray:
        return np.concatenate([self.pred_to_ref, self.ref_to_pred])


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown surface convention {convention!r}; choose one of {CONVENTIONS}")
    return convention


def as_spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Spacing per spatial axis in mm (None -> 1 mm; a number -> isotropic)."""
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries, the masks have {ndim} dimensions")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be finite and positive, got {spacing}")
    return spacing


def orthogonal_grid_spacing(index_to_mm: np.ndarray, tolerance: float = GRID_ORTHOGONALITY_TOLERANCE):
    """Spacing per axis when the index -> mm map's columns are orthogonal (a rotated box grid), else None."""
    gram = index_to_mm.T @ index_to_mm
    lengths = np.sqrt(np.diag(gram))
    off_diagonal = gram - np.diag(np.diag(gram))
    if np.all(np.abs(off_diagonal) <= tolerance * np.outer(lengths, lengths)):
        return tuple(float(v) for v in lengths)
    return None


def grid_diagonal_mm(shape: Sequence[int], index_to_mm: np.ndarray) -> float:
    """Largest distance between two voxel centres of a volume on a (possibly sheared) grid."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(len(shape), -1)
    return float(np.linalg.norm(index_to_mm @ corners, axis=0).max())  # corner offsets from corner 0


def distances_on_grid(
    surface_from: np.ndarray, surface_to: np.ndarray, index_to_mm: np.ndarray
) -> np.ndarray:
    """Like `distances_to_surface` for a sheared grid (slices tilted against their plane): voxel centres
    mapped to mm by `index_to_mm` and nearest neighbours found with a k-d tree, as the CHAOS code does."""
    from scipy.spatial import cKDTree

    if not surface_to.any():
        return np.full(int(np.count_nonzero(surface_from)), np.inf)
    tree = cKDTree(np.argwhere(surface_to) @ index_to_mm.T)
    distances, _ = tree.query(np.argwhere(surface_from) @ index_to_mm.T)
    return np.asarray(distances, dtype=np.float64)


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Distance between the two farthest voxel centres of the volume: CHAOS's worst surface distance."""
    return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a binary mask as slices, None when the mask is empty."""
    boxes = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return boxes[0] if boxes else None


def union_box(box_a: tuple[slice, ...] | None, box_b: tuple[slice, ...] | None, shape, margin: int = 1):
    """Union of two boxes (either may be None), padded by `margin` voxels and clipped to the volume."""
    boxes = [b for b in (box_a, box_b) if b is not None]
    if not boxes:
        return None
    return tuple(
        slice(
            max(min(b[d].start for b in boxes) - margin, 0),
            min(max(b[d].stop for b in boxes) + margin, shape[d]),
        )
        for d in range(len(shape))
    )


def surface(mask: np.ndarray, convention: str) -> np.ndarray:
    """Surface voxels: the mask minus its 6-connected (face-connected) erosion.

    ``monai`` (and ``paper``) erode with the outside as background (volume-edge faces are surface),
    ``chaos`` with the outside as foreground (``border_value=1``, as the official CHAOS code).
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    border_value = 1 if check_convention(convention) == "chaos" else 0
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=border_value)


def distances_to_surface(
    surface_from: np.ndarray, surface_to: np.ndarray, spacing, feature_buffer: np.ndarray | None = None
) -> np.ndarray:
    """Distance in mm from each voxel of `surface_from` to the nearest voxel of `surface_to`.

    One Euclidean feature transform of ``~surface_to`` (scipy's exact EDT with ``sampling=spacing``) finds
    every voxel's nearest `surface_to` voxel; distances are then evaluated at the `surface_from` voxels only,
    with scipy's own formula, instead of over the whole box. `feature_buffer` (int32, shape
    ``(ndim, *shape)``) may be passed to reuse memory between calls.
    """
    if not surface_to.any():
        return np.full(int(np.count_nonzero(surface_from)), np.inf)
    nearest = ndimage.distance_transform_edt(
        ~surface_to, sampling=spacing, return_distances=False, return_indices=True, indices=feature_buffer
    )
    if nearest is None:
        nearest = feature_buffer
    points = np.nonzero(surface_from)
    squared = np.zeros(points[0].shape, dtype=np.float64)
    for axis, (coordinates, step) in enumerate(zip(points, spacing, strict=True)):
        offset = (nearest[axis][points] - coordinates).astype(np.float64) * step
        squared += offset * offset
    return np.sqrt(squared)


def surface_distances(
    mask_ref: np.ndarray,
    mask_pred: np.ndarray,
    spacing=None,
    convention: str = "monai",
    box=None,
    index_to_mm: np.ndarray | None = None,
) -> SurfaceDistances:
    """Both directed surface-distance arrays, computed on the padded bounding box of the two masks.

    `box` (optional) is the union bounding box already padded by one voxel, e.g. from
    :func:`compute_label_metrics`, which finds all labels' boxes in one pass. An empty mask has no surface
    voxels; the distances towards it are inf.
    """
    spacing = as_spacing(spacing, mask_ref.ndim)
    if box is None:
        box = union_box(bounding_box(mask_ref), bounding_box(mask_pred), mask_ref.shape)
    if box is None:
        return SurfaceDistances(np.zeros(0), np.zeros(0))
    ref_surface = surface(mask_ref[box], convention)
    pred_surface = surface(mask_pred[box], convention)
    if index_to_mm is not None:  # a sheared grid: no EDT, nearest neighbours in mm
        return SurfaceDistances(
            pred_to_ref=distances_on_grid(pred_surface, ref_surface, index_to_mm),
            ref_to_pred=distances_on_grid(ref_surface, pred_surface, index_to_mm),
        )
    feature_buffer = np.empty((ref_surface.ndim, *ref_surface.shape), dtype=np.int32)
    return SurfaceDistances(
        pred_to_ref=distances_to_surface(pred_surface, ref_surface, spacing, feature_buffer),
        ref_to_pred=distances_to_surface(ref_surface, pred_surface, spacing, feature_buffer),
    )


def _hd_percentile(distances: np.ndarray, percentile: float) -> float:
    # MONAI: torch.quantile (linear interpolation) of a directed distance array; NaN when it holds inf,
    # which only happens when the other mask is empty (torch.lerp(inf, inf) is NaN).
    if distances.size == 0:
        return math.nan
    if np.isinf(distances).any():
        return math.nan
    return float(np.percentile(distances, percentile))


def distance_metrics(
    distances: SurfaceDistances,
    n_ref: int,
    n_pred: int,
    convention: str,
    nsd_tolerance_mm: float,
    worst_distance_mm: float,
) -> dict[str, float]:
    """ASSD, HD, HD95 and NSD from the two directed distance arrays (see the module doc for empties)."""
    if n_ref == 0 and n_pred == 0:
        return {"ASSD": math.nan, "HD": math.nan, "HD95": math.nan, "NSD": math.nan}
    if convention == "chaos" and (n_ref == 0 or n_pred == 0):
        worst = float(worst_distance_mm)
        return {"ASSD": worst, "HD": worst, "HD95": worst, "NSD": 0.0}
    pooled = distances.pooled
    directed = [_hd_percentile(d, HD_PERCENTILE) for d in (distances.pred_to_ref, distances.ref_to_pred)]
    hd95 = math.nan if any(math.isnan(v) for v in directed) else max(directed)  # NaN wins, as in torch.max
    # MONAI compares float32 distances with the tolerance; do the same so borderline voxels agree.
    within = np.count_nonzero(pooled.astype(np.float32) <= np.float32(nsd_tolerance_mm))
    return {
        "ASSD": float(pooled.mean()),
        "HD": float(pooled.max()),
        "HD95": hd95,
        "NSD": within / pooled.size,
    }


def overlap_metrics(n_ref: int, n_pred: int, tp: int, convention: str) -> dict[str, float]:
    """Dice, IoU, RAVD (in %) from voxel counts."""
    if n_ref == 0:
        # MONAI ignore_empty=True: NaN whenever the reference is empty. CHAOS: 0/0 is NaN, and an
        # organ predicted where the reference has none has Dice 0 and infinite relative volume error.
        if convention == "chaos" and n_pred > 0:
            return {"Dice": 0.0, "IoU": 0.0, "RAVD": math.inf}
        return {"Dice": math.nan, "IoU": math.nan, "RAVD": math.nan}
    return {
        "Dice": 2.0 * tp / (n_ref + n_pred),
        "IoU": tp / (n_ref + n_pred - tp),
        "RAVD": abs(n_pred - n_ref) / n_ref * 100.0,
    }


def compute_metrics(
    mask_ref: np.ndarray,
    mask_pred: np.ndarray,
    spacing=None,
    convention: str = "monai",
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    box=None,
    worst_distance_mm: float | None = None,
    index_to_mm: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one binary reference / prediction pair (2D or 3D, same shape), spacing in mm.

    Returns ``Dice, IoU, ASSD, HD, HD95, NSD, RAVD`` plus counts ``n_ref, n_pred, TP`` and volumes
    ``volume_ref_mm3, volume_pred_mm3``. See the module doc for the conventions and empty masks.
    `box`: the union bounding box padded by one voxel if already known; `worst_distance_mm`: the
    ``chaos`` distance for one empty mask (default: the diagonal of these masks' volume; pass the whole
    image's diagonal when the masks are crops). `index_to_mm`: a non-orthogonal (sheared) 3x3 map from
    index steps to mm, e.g. slices tilted against their plane; `spacing` is then ignored.
    """
    check_convention(convention)
    mask_ref = np.asarray(mask_ref, dtype=bool)
    mask_pred = np.asarray(mask_pred, dtype=bool)
    if mask_ref.shape != mask_pred.shape:
        raise ValueError(f"reference shape {mask_ref.shape} and prediction shape {mask_pred.shape} differ")
    spacing = as_spacing(spacing, mask_ref.ndim)
    if box is None:
        box = union_box(bounding_box(mask_ref), bounding_box(mask_pred), mask_ref.shape)
    if box is None:
        n_ref = n_pred = tp = 0
    else:
        ref_crop, pred_crop = mask_ref[box], mask_pred[box]
        n_ref, n_pred = int(np.count_nonzero(ref_crop)), int(np.count_nonzero(pred_crop))
        tp = int(np.count_nonzero(ref_crop & pred_crop))
    # the paper convention measures distances in voxels (MONAI called without spacing)
    distance_spacing = (1.0,) * mask_ref.ndim if convention == "paper" else spacing
    distances = surface_distances(mask_ref, mask_pred, distance_spacing, convention, box, index_to_mm)
    voxel_volume = float(np.prod(spacing)) if index_to_mm is None else abs(float(np.linalg.det(index_to_mm)))
    surface_metrics = distance_metrics(
        distances,
        n_ref,
        n_pred,
        convention,
        nsd_tolerance_mm,
        volume_diagonal_mm(mask_ref.shape, spacing) if worst_distance_mm is None else worst_distance_mm,
    )
    if convention == "paper":  # the reference's set_nan: a missed organ is NaN, left out of the means
        surface_metrics = {k: math.nan if math.isinf(v) else v for k, v in surface_metrics.items()}
    return {
        **overlap_metrics(n_ref, n_pred, tp, convention),
        **surface_metrics,
        "n_ref": n_ref,
        "n_pred": n_pred,
        "TP": tp,
        "volume_ref_mm3": n_ref * voxel_volume,
        "volume_pred_mm3": n_pred * voxel_volume,
    }


def region_or_label_to_mask(segmentation: np.ndarray, region_or_label) -> np.ndarray:
    """Binary mask of a label (int) or a region (tuple of labels), as nnU-Net does."""
    if np.isscalar(region_or_label):
        return segmentation == region_or_label
    return np.isin(segmentation, np.asarray(region_or_label))


def _label_boxes(segmentation: np.ndarray, labels) -> dict[int, tuple[slice, ...] | None]:
    """Bounding boxes of all positive integer labels in one pass over the volume."""
    positive = [label for label in labels if np.isscalar(label) and int(label) > 0]
    if not positive or segmentation.dtype.kind not in "iub":
        return {}
    max_label = max(int(label) for label in positive)
    # find_objects wants non-negative integers; labels above max_label are irrelevant here
    clipped = np.where((segmentation > 0) & (segmentation <= max_label), segmentation, 0).astype(np.int32)
    boxes = ndimage.find_objects(clipped, max_label=max_label)
    return {label: boxes[int(label) - 1] for label in positive}


def compute_label_metrics(
    seg_ref: np.ndarray,
    seg_pred: np.ndarray,
    labels_or_regions: Sequence,
    spacing=None,
    convention: str = "monai",
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    ignore_label: int | None = None,
    index_to_mm: np.ndarray | None = None,
) -> dict:
    """Metrics for every label (int) or region (tuple of ints) of two label maps of equal shape.

    `index_to_mm` (optional, 3D): the (3, 3) map from index steps (columns: axis 0, 1, 2) to mm, for grids
    that `spacing` cannot describe (the CHAOS code's tilted slice vector). An orthogonal map is the same
    as spacing = its column lengths and takes the fast path; a sheared one uses nearest neighbours in mm.

    Bounding boxes of all integer labels are found in one pass over each volume; each label is then
    evaluated on its own padded box only. With `ignore_label`, prediction voxels where the reference holds
    the ignore label are removed before evaluating (nnU-Net's TP / FP / FN counts exclude them the same way).
    """
    check_convention(convention)
    seg_ref = np.asarray(seg_ref)
    seg_pred = np.asarray(seg_pred)
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(f"reference shape {seg_ref.shape} and prediction shape {seg_pred.shape} differ")
    grid = None
    if index_to_mm is not None:
        index_to_mm = np.asarray(index_to_mm, dtype=float)
        if index_to_mm.shape != (seg_ref.ndim, seg_ref.ndim) or not np.all(np.isfinite(index_to_mm)):
            raise ValueError(
                f"index_to_mm must be a finite {seg_ref.ndim}x{seg_ref.ndim} matrix, got {index_to_mm}"
            )
        spacing = orthogonal_grid_spacing(index_to_mm)
        grid = index_to_mm if spacing is None else None
    spacing = as_spacing(spacing, seg_ref.ndim)
    ignore_mask = seg_ref == ignore_label if ignore_label is not None else None
    if ignore_mask is not None and ignore_mask.any():
        seg_pred = np.where(ignore_mask, 0, seg_pred)
    ref_boxes = _label_boxes(seg_ref, labels_or_regions)
    pred_boxes = _label_boxes(seg_pred, labels_or_regions)
    worst_distance = (
        volume_diagonal_mm(seg_ref.shape, spacing) if grid is None else grid_diagonal_mm(seg_ref.shape, grid)
    )
    empty = np.zeros((1,) * seg_ref.ndim, dtype=bool)
    results = {}
    for label in labels_or_regions:
        if label in ref_boxes:
            box = union_box(ref_boxes[label], pred_boxes[label], seg_ref.shape)
            if box is None:  # absent from both volumes
                mask_ref = mask_pred = empty
            else:
                mask_ref, mask_pred = seg_ref[box] == label, seg_pred[box] == label
        else:
            mask_ref, mask_pred = (
                region_or_label_to_mask(seg_ref, label),
                region_or_label_to_mask(seg_pred, label),
            )
            box = union_box(bounding_box(mask_ref), bounding_box(mask_pred), seg_ref.shape)
            mask_ref, mask_pred = (mask_ref[box], mask_pred[box]) if box is not None else (empty, empty)
        # the crops already are the padded union boxes (the whole crop, or nothing when both are empty)
        crop_box = tuple(slice(None) for _ in range(seg_ref.ndim)) if box is not None else None
        results[label] = compute_metrics(
            mask_ref,
            mask_pred,
            spacing,
            convention,
            nsd_tolerance_mm,
            box=crop_box,
            worst_distance_mm=worst_distance,
            index_to_mm=grid,
        )
    return results


def chaos_scores(dice: float, ravd: float, assd: float, mssd: float) -> dict[str, float]:
    """The CHAOS challenge scores (0-100) of one organ in one case, and their mean (``score``).

    DICE: 0 if Dice < 0.8 else 100 * Dice; RAVD (%): 0 if > 5 else 100 - 20 * RAVD; ASSD (mm): 0 if > 15
    else 100 - 20/3 * ASSD; MSSD (mm): 0 if > 60 else 100 - 5/3 * MSSD. A NaN or inf metric scores 0.
    """
    dice_score = 0.0 if not dice >= 0.8 else 100.0 * dice
    ravd_score = 0.0 if not ravd <= 5.0 else 100.0 - 20.0 * ravd
    assd_score = 0.0 if not assd <= 15.0 else 100.0 - (20.0 / 3.0) * assd
    mssd_score = 0.0 if not mssd <= 60.0 else 100.0 - (5.0 / 3.0) * mssd
    return {
        "DICE_score": dice_score,
        "RAVD_score": ravd_score,
        "ASSD_score": assd_score,
        "MSSD_score": mssd_score,
        "score": (dice_score + ravd_score + assd_score + mssd_score) / 4.0,
    }
