"""Pre-training crops and loader: batch layout, crop sizes from aniso_d, zoom keeping aniso_d, exact
resampling, determinism across worker processes, exact resume, validation batches."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from pumit_seg.data.prepare import prepare_store
from pumit_seg.data.pretrain_loader import (
    CropConfig,
    PretrainCropDataset,
    _resample,
    build_pretrain_loader,
    crop_depth,
    validation_batches,
)
from pumit_seg.data.store import PretrainStore
from pumit_seg.models.sac import aniso_d_from_spacing
from pumit_seg.phantoms.pretrain import DEFAULT_DATASETS, write_pretrain_corpus

NAMES = ("ct_iso", "mr_sagittal", "mr_nrrd", "xray_png", "fundus_png")
CROP = CropConfig(in_plane=32, depth_units=2, zoom_p=0.5, rotate_p=0.5, gamma_p=0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    datasets = tuple(
        dataclasses.replace(d, num_images=3, shape=(max(d.shape[0] // 2, 1), 40, 36))
        for d in DEFAULT_DATASETS
        if d.name in NAMES
    )
    config = write_pretrain_corpus(str(root / "corpus"), datasets=datasets)
    prepare_store(config, str(root / "store"), progress=False)
    return PretrainStore(root / "store")


def test_batch_layout_and_crop_sizes(store):
    loader = build_pretrain_loader(store, CROP, 3, num_workers=0, seed=0)
    seen = set()
    for batch in itertools.islice(iter(loader), 12):
        image, aniso_d = batch["image"], batch["aniso_d"]
        rows = store.table.loc[batch["keys"]]
        assert (rows.aniso_d == aniso_d).all() and (rows.split == "train").all()
        two_d = bool((rows.shape_d == 1).all())
        assert image.shape == (3, 3, crop_depth(CROP, aniso_d, two_d), 32, 32)
        assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
        assert image.abs().sum() > 0
        for sample, channels in zip(image, rows.channels, strict=True):
            if channels == 1:  # grey replicated to 3 channels
                assert torch.equal(sample[0], sample[1]) and torch.equal(sample[0], sample[2])
        seen.add(aniso_d)
    assert {0, 5} <= seen and crop_depth(CROP, 0, False) == 32 and crop_depth(CROP, 3, False) == 4


def test_zoom_keeps_the_batch_aniso_d(store):
    dataset = PretrainCropDataset(store, dataclasses.replace(CROP, zoom_p=1.0))
    rng = np.random.default_rng(0)
    for spacing in [
        (1.0, 0.9, 0.9),
        (1.9, 1.0, 1.0),
        (2.0, 1.0, 1.0),
        (4.0, 0.8, 0.8),
        (7.9, 1.0, 1.0),
        (40.0, 1.0, 1.0),
    ]:
        aniso_d = aniso_d_from_spacing(spacing)
        for _ in range(200):
            zoom, _ = dataset._draw_spatial(rng, np.array(spacing), aniso_d, two_d=False)
            after = np.array(spacing) / zoom
            assert aniso_d_from_spacing(after) == aniso_d
            assert CROP.zoom_range[0] <= zoom[1] <= CROP.zoom_range[1]


def test_resampling_is_exact_for_linear_images():
    """Trilinear resampling reproduces a linear image exactly: an independent check of the zoom /
    rotation geometry (crop voxel o -> source coordinate centre + R diag(1/zoom) (o - (n - 1) / 2))."""
    d, h, w = np.meshgrid(np.arange(20), np.arange(40), np.arange(50), indexing="ij")
    coefficients = (0.3, -0.2, 0.1)
    region = torch.from_numpy(
        (coefficients[0] * d + coefficients[1] * h + coefficients[2] * w + 20)[None]
    ).float()
    out_size, zoom, angle = np.array([6, 10, 12]), np.array([1.3, 0.8, 0.8]), math.radians(25)
    low, centre = np.array([0, 0, 0]), np.array([10.0, 20.0, 25.0])
    got = _resample(region, low, centre, out_size, zoom, angle)[0].double()
    od, oh, ow = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in out_size], indexing="ij")
    sd, sh, sw = od / zoom[0], oh / zoom[1], ow / zoom[2]
    source = (
        sd + centre[0] - 0.5,
        math.cos(angle) * sh - math.sin(angle) * sw + centre[1] - 0.5,
        math.sin(angle) * sh + math.cos(angle) * sw + centre[2] - 0.5,
    )
    expected = sum(c * s for c, s in zip(coefficients, source, strict=True)) + 20
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-3)


def test_same_batches_with_workers_and_exact_resume(store):
    reference = list(itertools.islice(iter(build_pretrain_loader(store, CROP, 2, num_workers=0, seed=5)), 6))
    loader = build_pretrain_loader(store, CROP, 2, num_workers=2, seed=5)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    assert state["next_batch"] == 3
    resumed = build_pretrain_loader(store, CROP, 2, num_workers=0, seed=5)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(iter(resumed), 3))
    for a, b in zip(reference, first + rest, strict=True):
        assert a["keys"] == b["keys"] and a["aniso_d"] == b["aniso_d"]
        assert torch.equal(a["image"], b["image"])


def test_validation_batches_are_centre_crops_of_held_out_images(store):
    batches = validation_batches(store, CROP, batch_size=2)
    again = validation_batches(store, CROP, batch_size=2)
    val = store.table[store.table.split == "val"]
    assert sorted(k for b in batches for k in b["keys"]) == sorted(val.key)
    for a, b in zip(batches, again, strict=True):
        assert torch.equal(a["image"], b["image"])
        rows = val.loc[a["keys"]]
        assert (rows.aniso_d == a["aniso_d"]).all() and rows.shape_d.eq(1).nunique() == 1
    # a 2D held-out image: the centre crop equals the stored pixels, zero-padded around
    batch = next(b for b in batches if b["image"].shape[2] == 1)
    key = batch["keys"][0]
    _, h, w = store.table.at[key, "shape"]
    stored = torch.from_numpy(store.read(key))
    top, left = (h - 32) // 2, (w - 32) // 2
    window = stored[:, :, max(top, 0) : top + 32, max(left, 0) : left + 32]
    crop = batch["image"][0][: stored.shape[0], :, max(-top, 0) :, max(-left, 0) :]
    assert torch.equal(crop[:, :, : window.shape[2], : window.shape[3]], window)
